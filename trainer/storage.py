"""S3-compatible object storage (MinIO, KFP's object store, AWS S3) through the `minio` client.

A path is either local or `s3://bucket/key`. The endpoint and credentials come from the environment
only (on a cluster, from a Kubernetes Secret)::

    S3_ENDPOINT=minio.kubeflow:9000     # or http(s)://host:port; fallbacks AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL
    AWS_ACCESS_KEY_ID=...  AWS_SECRET_ACCESS_KEY=...
    AWS_REGION=us-east-1                # optional; asked from the server when unset
    S3_USE_TLS=false                    # optional: true/false/1/0

TLS when `S3_USE_TLS` is unset follows the endpoint: `https://` on, `http://` off, and with no scheme
off for localhost / 127.0.0.1 / ::1 and on for any other host. KFP's in-cluster MinIO speaks plain
HTTP, so give it as `http://minio-service.kubeflow:9000` or set `S3_USE_TLS=false`.

Time limits, each from the environment too (seconds):

    S3_CONNECT_TIMEOUT=5    # to open a connection
    S3_READ_TIMEOUT=30      # for the server's next bytes (an endpoint that accepts and never answers)
    S3_RETRY_BUDGET=100     # for one operation, all its retries included

Transient failures (refused or reset connections, timeouts, HTTP 5xx, SlowDown, RequestTimeout,
InternalError) are retried with exponential backoff and jitter while the budget allows one more
whole attempt (connect + read timeout) after the wait; anything else fails at once with a
`StorageError` that names the endpoint and bucket/key. No message, log line or repr ever holds a
credential value. An S3 PUT (single or multipart) becomes visible only once complete, so a failed
upload never leaves half an object under its key; a retry sends the whole file again.
"""

from __future__ import annotations

import logging
import mimetypes
import os
import random
import re
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import certifi
import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError

log = logging.getLogger("trainer")

T = TypeVar("T")
SCHEME = "s3://"
ENDPOINT_VARS = ("S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
TRANSIENT_CODES = frozenset({"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable"})
CREDENTIAL_CODES = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"})
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IP = re.compile(r"^\d+\.\d+\.\d+\.\d+$")
_LOOPBACK = {"localhost", "127.0.0.1", "::1"}


class StorageError(RuntimeError):
    """An S3 location, configuration or transfer that failed; the message names endpoint and object."""


def is_s3(path: object) -> bool:
    """True for `s3://...` strings."""
    return isinstance(path, str) and path.startswith(SCHEME)


@dataclass(frozen=True)
class S3Uri:
    """`s3://bucket/key`, validated. `key` may be empty (the bucket) or end in '/' (a folder)."""

    bucket: str
    key: str = ""

    def __post_init__(self) -> None:
        if not self.bucket:
            raise StorageError("S3 location has an empty bucket name")
        if not _BUCKET.match(self.bucket) or ".." in self.bucket or _IP.match(self.bucket):
            raise StorageError(f"s3://{self.bucket}: invalid bucket name (3-63 characters of lowercase letters, "
                               "digits, '.' and '-', starting and ending with a letter or digit)")
        parts = self.key.split("/")
        if self.key.startswith("/") or any(p in (".", "..") for p in parts) or "" in parts[:-1]:
            raise StorageError(f"{self}: key must not start with '/' or hold '.', '..' or empty segments")

    @classmethod
    def parse(cls, uri: str) -> "S3Uri":
        if not is_s3(uri):
            raise StorageError(f"{uri!r} is not an s3://bucket/key location")
        bucket, _, key = uri[len(SCHEME):].partition("/")
        return cls(bucket, key)

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}"

    @property
    def prefix(self) -> str:
        """The key as a folder prefix: '' or ending in '/' (so runs/exp never matches runs/exp2)."""
        return self.key if not self.key or self.key.endswith("/") else self.key + "/"

    def child(self, relative: str) -> "S3Uri":
        return S3Uri(self.bucket, self.prefix + relative)


@dataclass(frozen=True)
class S3Config:
    """Where the store is and how to sign requests. The keys never appear in the repr."""

    endpoint: str                 # host:port, no scheme
    secure: bool
    region: str | None = None
    access_key: str = field(default="", repr=False)
    secret_key: str = field(default="", repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "S3Config":
        """Read S3_ENDPOINT (or its fallbacks), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, S3_USE_TLS."""
        env = os.environ if env is None else env
        raw = next((env[v].strip() for v in ENDPOINT_VARS if env.get(v, "").strip()), "")
        missing = [] if raw else [f"{ENDPOINT_VARS[0]} (or {' / '.join(ENDPOINT_VARS[1:])})"]
        missing += [v for v in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not env.get(v)]
        if missing:
            raise StorageError(f"S3 storage needs the environment variables {', '.join(missing)} "
                               "(on a cluster: from the S3 credentials Secret)")
        endpoint, scheme = parse_endpoint(raw)
        return cls(endpoint, use_tls(env.get("S3_USE_TLS", ""), scheme, endpoint), env.get("AWS_REGION") or None,
                   env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])


def parse_endpoint(raw: str) -> tuple[str, str]:
    """'http://host:9000/' -> ('host:9000', 'http'); 'host:9000' -> ('host:9000', '')."""
    parts = urlsplit(raw if "://" in raw else f"//{raw}")
    if parts.scheme not in ("", "http", "https") or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.username:
        raise StorageError(f"S3 endpoint {raw!r} must look like host:port or http(s)://host:port")
    return parts.netloc, parts.scheme


def use_tls(flag: str, scheme: str, endpoint: str) -> bool:
    """S3_USE_TLS if set, else the endpoint's scheme, else off only for loopback hosts."""
    flag = flag.strip().lower()
    if flag:
        if flag not in ("true", "false", "1", "0"):
            raise StorageError(f"S3_USE_TLS={flag!r}: expected true, false, 1 or 0")
        return flag in ("true", "1")
    if scheme:
        return scheme == "https"
    return urlsplit(f"//{endpoint}").hostname not in _LOOPBACK


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: attempt k (0-based) waits base * 2**k * U(0.5, 1.5), capped."""

    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 20.0
    budget_s: float = 100.0  # one operation, retries included: under 2 minutes however the endpoint fails

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_delay < 0 or self.max_delay < 0 or self.budget_s <= 0:
            raise StorageError(f"{self}: needs attempts >= 1, non-negative delays and a positive budget")

    def delay(self, attempt: int) -> float:
        return min(self.max_delay, self.base_delay * 2 ** attempt) * random.uniform(0.5, 1.5)


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str


def is_transient(e: BaseException) -> bool:
    """Worth retrying: the network or the server failed, not the request."""
    if isinstance(e, urllib3.exceptions.MaxRetryError) and e.reason is not None:
        return is_transient(e.reason)
    if isinstance(e, urllib3.exceptions.SSLError):
        return False  # a TLS mismatch does not heal by waiting
    if isinstance(e, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)):
        return True
    if isinstance(e, S3Error):
        return e.code in TRANSIENT_CODES or getattr(e.response, "status", 0) >= 500
    if isinstance(e, ServerError):
        return e.status_code >= 500
    if isinstance(e, InvalidResponseError):
        return getattr(e, "_code", 0) >= 500
    return False


class Storage:
    """Transfers between local files and one S3 endpoint, with retries and clear errors."""

    def __init__(self, config: S3Config, retry: RetryPolicy = RetryPolicy(), connect_timeout: float = 5.0,
                 read_timeout: float = 30.0):
        self.config = config
        self.retry = retry
        self.attempt_s = connect_timeout + read_timeout  # the longest one attempt can hang
        # Our retry loop is the one in charge: no urllib3-level retries, short connect timeouts.
        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
                                   retries=False, maxsize=10, cert_reqs="CERT_REQUIRED",
                                   ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where())
        self._client = Minio(config.endpoint, access_key=config.access_key, secret_key=config.secret_key,
                             secure=config.secure, region=config.region, http_client=http)
        self._uploaded: dict[tuple[str, str], tuple[int, int]] = {}  # (local, uri) -> (size, mtime_ns)

    @classmethod
    def from_env(cls, retry: RetryPolicy | None = None, env: Mapping[str, str] | None = None,
                 **kwargs: float) -> "Storage":
        """A Storage for the endpoint, credentials and time limits in the environment (see the module
        docstring)."""
        env = os.environ if env is None else env
        limits = {"connect_timeout": _seconds(env, "S3_CONNECT_TIMEOUT"), "read_timeout": _seconds(env, "S3_READ_TIMEOUT")}
        kwargs = {**{k: v for k, v in limits.items() if v is not None}, **kwargs}
        budget = _seconds(env, "S3_RETRY_BUDGET")
        if retry is None:
            retry = RetryPolicy(budget_s=budget) if budget is not None else RetryPolicy()
        return cls(S3Config.from_env(env), retry, **kwargs)

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.config.secure else 'http'}://{self.config.endpoint}"

    def __repr__(self) -> str:
        return f"Storage(endpoint={self.endpoint!r}, retry={self.retry!r})"

    # ------------------------------------------------------------------------------ transfers
    def upload_file(self, local: str | Path, uri: str | S3Uri) -> str:
        """PUT one file (multipart when large); the object appears only once complete."""
        u = _uri(uri)
        content_type = mimetypes.guess_type(str(local))[0] or "application/octet-stream"
        self._call("upload", u, lambda: self._client.fput_object(u.bucket, u.key, str(local),
                                                                 content_type=content_type))
        return str(u)

    def download_file(self, uri: str | S3Uri, local: str | Path) -> Path:
        """GET one object into a temporary file beside `local`, then rename: never a half file."""
        u, local = _uri(uri), Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)

        def fetch() -> None:
            fd, tmp = tempfile.mkstemp(prefix=f".{local.name}.", suffix=".part", dir=local.parent)
            response = None
            try:
                with os.fdopen(fd, "wb") as f:
                    response = self._client.get_object(u.bucket, u.key)
                    for chunk in response.stream(1 << 20):
                        f.write(chunk)
                os.chmod(tmp, 0o644)
                os.replace(tmp, local)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            finally:
                if response is not None:
                    response.close()
                    response.release_conn()

        self._call("download", u, fetch)
        return local

    def upload_dir(self, local_dir: str | Path, uri_prefix: str | S3Uri, only_changed: bool = True,
                   include: Callable[[Path], bool] | None = None) -> list[str]:
        """Upload every file under `local_dir` (that `include` accepts) to prefix/relative/path.

        With `only_changed`, files whose size and mtime_ns are what this Storage last uploaded are
        skipped. Returns the URIs uploaded."""
        local_dir, prefix = Path(local_dir), _uri(uri_prefix)
        uploaded = []
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            if include is not None and not include(path):
                continue
            target = prefix.child(path.relative_to(local_dir).as_posix())
            st = path.stat()  # taken before the upload: a file that changes meanwhile goes again next time
            stamp, memo = (st.st_size, st.st_mtime_ns), (str(path), str(target))
            if only_changed and self._uploaded.get(memo) == stamp:
                continue
            uploaded.append(self.upload_file(path, target))
            self._uploaded[memo] = stamp
        return uploaded

    def download_dir(self, uri_prefix: str | S3Uri, local_dir: str | Path) -> list[Path]:
        """Download every object under the prefix to local_dir/relative/path."""
        prefix, local_dir = _uri(uri_prefix), Path(local_dir)
        root = local_dir.resolve()
        out = []
        for key in self.list(prefix):
            dest = local_dir / key[len(prefix.prefix):]
            if not dest.resolve().is_relative_to(root):  # a crafted key must not write outside
                raise StorageError(f"s3://{prefix.bucket}/{key}: key escapes the destination folder {local_dir}")
            out.append(self.download_file(S3Uri(prefix.bucket, key), dest))
        return out

    def list(self, uri_prefix: str | S3Uri, recursive: bool = True) -> list[str]:
        """Keys under a folder prefix, sorted. Recursive listings leave out folder markers (keys ending
        in '/', which consoles create); non-recursive ones end sub-folders with '/'."""
        u = _uri(uri_prefix)
        keys = self._call("list", u, lambda: sorted(
            o.object_name for o in self._client.list_objects(u.bucket, u.prefix, recursive=recursive)))
        return [k for k in keys if not (recursive and k.endswith("/"))]

    def stat(self, uri: str | S3Uri) -> ObjectInfo | None:
        """Size and ETag of an object, or None when there is none (a missing bucket is an error)."""
        u = _uri(uri)
        try:
            st = self._call("stat", u, lambda: self._client.stat_object(u.bucket, u.key))
        except _NotFound:
            # HEAD answers a bare 404 for a missing bucket too; tell the two apart.
            if not self._call("check bucket", u, lambda: self._client.bucket_exists(u.bucket)):
                raise StorageError(f"bucket '{u.bucket}' does not exist at endpoint {self.endpoint}") from None
            return None
        return ObjectInfo(u.key, int(st.size or 0), str(st.etag or ""))

    def exists(self, uri: str | S3Uri) -> bool:
        """True when the object exists."""
        return self.stat(uri) is not None

    # ------------------------------------------------------------------------------ retries
    def _call(self, op: str, u: S3Uri, fn: Callable[[], T]) -> T:
        """Run fn, retrying transient failures; map every failure to a StorageError."""
        started = time.monotonic()
        for attempt in range(self.retry.attempts):
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - classified right below
                if not is_transient(e):
                    raise self._permanent(op, u, e) from e
                summary = self._redact(_summary(e))
                wait = self.retry.delay(attempt)
                spent = time.monotonic() - started
                out_of_budget = spent + wait + self.attempt_s > self.retry.budget_s
                if attempt + 1 == self.retry.attempts or out_of_budget:
                    why = (f"{attempt + 1} attempt(s) in {spent:.1f}s, and another would overrun the "
                           f"{self.retry.budget_s:g}s budget (S3_RETRY_BUDGET)" if out_of_budget and
                           attempt + 1 < self.retry.attempts else f"{attempt + 1} attempts over {spent:.1f}s")
                    raise StorageError(f"{op} {u}: endpoint {self.endpoint} unreachable or failing after {why} "
                                       f"(last error: {summary})") from None
                log.warning("%s %s: %s; retry %d/%d in %.1fs", op, u, summary, attempt + 1,
                            self.retry.attempts - 1, wait)
                time.sleep(wait)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _permanent(self, op: str, u: S3Uri, e: Exception) -> StorageError:
        code = getattr(e, "code", None)
        if code == "NoSuchBucket":
            return StorageError(f"bucket '{u.bucket}' does not exist at endpoint {self.endpoint}")
        if code in CREDENTIAL_CODES:
            return StorageError(f"credentials rejected by {self.endpoint} for bucket '{u.bucket}' ({code}); "
                                "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
        if code in ("NoSuchKey", "NotFound"):
            return _NotFound(f"{u} does not exist at endpoint {self.endpoint}")
        if isinstance(e, urllib3.exceptions.HTTPError):  # TLS handshake failures
            return StorageError(f"{op} {u}: cannot talk to {self.endpoint} ({self._redact(_summary(e))}); if the "
                                "endpoint speaks plain HTTP set S3_USE_TLS=false or S3_ENDPOINT=http://...")
        return StorageError(f"{op} {u} failed at endpoint {self.endpoint}: {self._redact(_summary(e))}")

    def _redact(self, text: str) -> str:
        """Belt and braces: a server could echo a key back in an error text."""
        for secret in (self.config.secret_key, self.config.access_key):
            if len(secret) >= 4:
                text = text.replace(secret, "***")
        return text


class _NotFound(StorageError):
    """A missing object (a StorageError for callers; `stat` turns it into None)."""


def _seconds(env: Mapping[str, str], name: str) -> float | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value != value or value == float("inf"):
        raise StorageError(f"{name}={raw!r}: expected a positive number of seconds")
    return value


def _uri(uri: str | S3Uri) -> S3Uri:
    return uri if isinstance(uri, S3Uri) else S3Uri.parse(uri)


def _summary(e: BaseException) -> str:
    if isinstance(e, S3Error):
        return f"{e.code}: {e.message}"
    return f"{type(e).__name__}: {e}"
