"""trainer.storage against a real S3 server on loopback (moto): round trips, retries through outages
and cut connections, clear errors, and credentials that never leak into messages or logs."""

from __future__ import annotations

import io
import logging
import os
import socket
import threading
import time
import traceback
from pathlib import Path

import pytest
from s3server import ACCESS_KEY, SECRET_KEY, CuttingProxy, MotoS3, free_port, upload_tree

from trainer.storage import RetryPolicy, S3Config, S3Uri, Storage, StorageError, is_s3, use_tls

FAST = RetryPolicy(attempts=3, base_delay=0.02)


def _storage(retry: RetryPolicy = FAST, **kwargs) -> Storage:
    return Storage.from_env(retry, **kwargs)


def _proxied(port: int, retry: RetryPolicy) -> Storage:
    return Storage(S3Config(f"127.0.0.1:{port}", False, None, ACCESS_KEY, SECRET_KEY), retry)


def _full_text(e: BaseException) -> str:
    """The exception as a traceback prints it, causes included."""
    return "".join(traceback.format_exception(e))


# ---------------------------------------------------------------------------------------- locations

def test_uri_parsing_and_validation():
    assert is_s3("s3://b/k") and not is_s3("/data/s3://x") and not is_s3(Path("s3:/x"))
    u = S3Uri.parse("s3://my-bucket.v2/runs/exp/weights/last.pt")
    assert (u.bucket, u.key) == ("my-bucket.v2", "runs/exp/weights/last.pt")
    assert S3Uri.parse("s3://abc").key == "" and S3Uri.parse("s3://abc/").prefix == ""
    assert S3Uri.parse("s3://abc/runs").prefix == "runs/" and S3Uri.parse("s3://abc/runs/").prefix == "runs/"
    assert str(S3Uri.parse("s3://abc/runs").child("exp/x.csv")) == "s3://abc/runs/exp/x.csv"
    with pytest.raises(StorageError, match="empty bucket"):
        S3Uri.parse("s3:///key")
    for bad in ("s3://ab/k", "s3://Upper/k", "s3://a_b/k", "s3://-abc/k", "s3://a..b/k", "s3://192.168.1.1/k",
                "s3://" + "a" * 64 + "/k"):
        with pytest.raises(StorageError, match="invalid bucket name"):
            S3Uri.parse(bad)
    for bad in ("s3://abc//k", "s3://abc/a/../k", "s3://abc/./k", "s3://abc/a//b"):
        with pytest.raises(StorageError, match="key must not"):
            S3Uri.parse(bad)
    with pytest.raises(StorageError, match="not an s3://"):
        S3Uri.parse("/local/path")


def test_config_from_env_names_missing_variables_and_follows_tls_rules():
    with pytest.raises(StorageError) as e:
        S3Config.from_env({"AWS_SECRET_ACCESS_KEY": SECRET_KEY})
    msg = str(e.value)
    assert "S3_ENDPOINT" in msg and "AWS_ENDPOINT_URL" in msg and "AWS_ACCESS_KEY_ID" in msg
    assert "AWS_SECRET_ACCESS_KEY" not in msg and SECRET_KEY not in msg
    with pytest.raises(StorageError, match="AWS_SECRET_ACCESS_KEY"):
        S3Config.from_env({"S3_ENDPOINT": "minio:9000", "AWS_ACCESS_KEY_ID": ACCESS_KEY})

    keys = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    cases = [  # (environment, endpoint, secure)
        ({"S3_ENDPOINT": "minio.kubeflow:9000"}, "minio.kubeflow:9000", True),
        ({"S3_ENDPOINT": "localhost:9000"}, "localhost:9000", False),
        ({"S3_ENDPOINT": "127.0.0.1:9000"}, "127.0.0.1:9000", False),
        ({"S3_ENDPOINT": "http://minio:9000/"}, "minio:9000", False),
        ({"S3_ENDPOINT": "https://localhost:9000"}, "localhost:9000", True),
        ({"S3_ENDPOINT": "https://minio:9000", "S3_USE_TLS": "0"}, "minio:9000", False),
        ({"S3_ENDPOINT": "localhost:9000", "S3_USE_TLS": "TRUE"}, "localhost:9000", True),
        ({"AWS_ENDPOINT_URL": "http://seaweed:8333"}, "seaweed:8333", False),
        ({"AWS_ENDPOINT_URL": "http://a:1", "AWS_ENDPOINT_URL_S3": "http://b:2"}, "b:2", False),
        ({"AWS_ENDPOINT_URL_S3": "http://b:2", "S3_ENDPOINT": "c:3"}, "c:3", True),
    ]
    for env, endpoint, secure in cases:
        cfg = S3Config.from_env({**keys, **env})
        assert (cfg.endpoint, cfg.secure) == (endpoint, secure), env
    assert S3Config.from_env({**keys, "S3_ENDPOINT": "m:1", "AWS_REGION": "eu-west-1"}).region == "eu-west-1"
    with pytest.raises(StorageError, match="S3_USE_TLS='yes'"):
        S3Config.from_env({**keys, "S3_ENDPOINT": "m:1", "S3_USE_TLS": "yes"})
    for bad in ("ftp://m:1", "http://m:1/bucket", "http://"):
        with pytest.raises(StorageError, match="must look like host:port"):
            S3Config.from_env({**keys, "S3_ENDPOINT": bad})
    assert use_tls("", "", "[::1]:9000") is False
    cfg = S3Config.from_env({**keys, "S3_ENDPOINT": "m:1"})
    assert SECRET_KEY not in repr(cfg) and ACCESS_KEY not in repr(cfg)
    assert SECRET_KEY not in repr(Storage(cfg)) and "https://m:1" in repr(Storage(cfg))


def test_missing_environment_is_a_clear_error(monkeypatch):
    for var in ("S3_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    with pytest.raises(StorageError, match=r"S3_ENDPOINT .*AWS_ACCESS_KEY_ID") as e:
        Storage.from_env()
    assert SECRET_KEY not in _full_text(e.value)


# ---------------------------------------------------------------------------------------- round trips

def test_file_round_trip_exists_and_missing_key(s3, tmp_path):
    st = _storage()
    src = tmp_path / "a.bin"
    src.write_bytes(os.urandom(3000) + b"\x00end")
    assert st.upload_file(src, "s3://kfyolo/x/a.bin") == "s3://kfyolo/x/a.bin"
    assert st.exists("s3://kfyolo/x/a.bin") and not st.exists("s3://kfyolo/x/b.bin")
    assert not st.exists("s3://kfyolo/x")  # a prefix is not an object
    info = st.stat("s3://kfyolo/x/a.bin")
    assert info.size == 3004 and info.etag
    dest = st.download_file("s3://kfyolo/x/a.bin", tmp_path / "out" / "deep" / "a.bin")
    assert dest.read_bytes() == src.read_bytes()

    started = time.monotonic()
    slow = _storage(RetryPolicy(attempts=5, base_delay=5.0))  # a retry would take seconds
    with pytest.raises(StorageError, match=r"s3://kfyolo/x/nope.bin does not exist at endpoint http://127\.0\.0\.1"):
        slow.download_file("s3://kfyolo/x/nope.bin", tmp_path / "out" / "nope.bin")
    assert time.monotonic() - started < 2.0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["deep"]  # no half or temp file left


def test_empty_file_and_empty_listing(s3, tmp_path):
    st = _storage()
    (tmp_path / "empty").write_bytes(b"")
    st.upload_file(tmp_path / "empty", "s3://kfyolo/e/empty")
    assert st.download_file("s3://kfyolo/e/empty", tmp_path / "back").read_bytes() == b""
    assert st.list("s3://kfyolo/nothing-here/") == []
    assert st.download_dir("s3://kfyolo/nothing-here", tmp_path / "none") == []
    (tmp_path / "emptydir").mkdir()
    assert st.upload_dir(tmp_path / "emptydir", "s3://kfyolo/e2") == []


def test_folder_round_trip_listing_and_only_changed_uploads(s3, tmp_path):
    st = _storage()
    files = {"results.csv": b"epoch\n0\n", "weights/last.pt": os.urandom(5000), "a/b/c/deep.txt": b"deep",
             "img.jpg": os.urandom(100)}
    upload_tree(tmp_path / "run", files)
    up = st.upload_dir(tmp_path / "run", "s3://kfyolo/runs/exp")
    assert sorted(up) == sorted(f"s3://kfyolo/runs/exp/{k}" for k in files)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("x")
    st.upload_file(tmp_path / "other" / "x", "s3://kfyolo/runs/exp2/x")  # must not match the prefix runs/exp
    st._client.put_object("kfyolo", "runs/exp/a/", io.BytesIO(b""), 0)  # a console's "new folder" marker
    assert st.list("s3://kfyolo/runs/exp") == sorted(f"runs/exp/{k}" for k in files)
    assert st.list("s3://kfyolo/runs/", recursive=False) == ["runs/exp/", "runs/exp2/"]

    back = st.download_dir("s3://kfyolo/runs/exp/", tmp_path / "back")
    assert len(back) == len(files)
    for rel, data in files.items():
        assert (tmp_path / "back" / rel).read_bytes() == data

    assert st.upload_dir(tmp_path / "run", "s3://kfyolo/runs/exp") == []  # nothing changed
    csv = tmp_path / "run" / "results.csv"
    csv.write_bytes(b"epoch\n0\n1\n")
    os.utime(tmp_path / "run" / "img.jpg", ns=(1, 2))  # same size, new mtime
    assert sorted(st.upload_dir(tmp_path / "run", "s3://kfyolo/runs/exp")) == [
        "s3://kfyolo/runs/exp/img.jpg", "s3://kfyolo/runs/exp/results.csv"]
    assert st.download_file("s3://kfyolo/runs/exp/results.csv", tmp_path / "r.csv").read_bytes() == b"epoch\n0\n1\n"
    assert len(st.upload_dir(tmp_path / "run", "s3://kfyolo/runs/exp", only_changed=False)) == len(files)
    skipped = st.upload_dir(tmp_path / "run", "s3://kfyolo/runs/copy", include=lambda p: p.suffix == ".csv")
    assert skipped == ["s3://kfyolo/runs/copy/results.csv"]


# ---------------------------------------------------------------------------------------- outages

def test_upload_survives_a_server_restart_within_the_retries(s3, tmp_path, caplog):
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(200_000))
    st = _storage(RetryPolicy(attempts=8, base_delay=0.1))
    st.exists("s3://kfyolo/warm")  # the client learnt the bucket's region while the server was up
    s3.stop()
    restarted = MotoS3(s3.port)
    timer = threading.Timer(0.4, restarted.start)
    timer.start()
    try:
        with caplog.at_level(logging.WARNING, logger="trainer"):
            st.upload_file(src, "s3://kfyolo/up/f.bin")
    finally:
        timer.join()
    try:
        assert st.download_file("s3://kfyolo/up/f.bin", tmp_path / "back").read_bytes() == src.read_bytes()
        retries = [r for r in caplog.records if "retry" in r.getMessage()]
        assert retries and "Connection refused" in retries[0].getMessage()
    finally:
        restarted.stop()


def test_server_down_longer_than_the_retries_fails_naming_the_endpoint(s3, tmp_path):
    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * 1000)
    st = _storage(RetryPolicy(attempts=3, base_delay=0.02))
    st.exists("s3://kfyolo/warm")
    s3.stop()
    with pytest.raises(StorageError) as e:
        st.upload_file(src, "s3://kfyolo/up/f.bin")
    assert f"endpoint http://{s3.endpoint} unreachable or failing after 3 attempts" in str(e.value)
    assert "s3://kfyolo/up/f.bin" in str(e.value)
    s3.start()
    assert st.list("s3://kfyolo/up/") == []


@pytest.mark.parametrize("size, cut_after", [(1 << 20, 200_000), (11 << 20, 1 << 20)], ids=["single", "multipart"])
def test_cut_upload_never_leaves_a_partial_object(s3, tmp_path, size, cut_after):
    """The connection drops mid-body: retried, the whole file lands; never retried, nothing does."""
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(size))
    direct = _storage()
    once = CuttingProxy(s3.port, after=cut_after, cuts=1)
    always = CuttingProxy(s3.port, after=cut_after, cuts=-1)
    try:
        _proxied(once.port, RetryPolicy(attempts=4, base_delay=0.02)).upload_file(src, "s3://kfyolo/cut/ok.bin")
        assert once.cut_count == 1
        assert direct.stat("s3://kfyolo/cut/ok.bin").size == size
        assert direct.download_file("s3://kfyolo/cut/ok.bin", tmp_path / "ok").read_bytes() == src.read_bytes()
        with pytest.raises(StorageError, match="unreachable or failing after 2 attempts"):
            _proxied(always.port, RetryPolicy(attempts=2, base_delay=0.02)).upload_file(src, "s3://kfyolo/cut/no.bin")
        assert always.cut_count >= 2
        assert direct.list("s3://kfyolo/cut/") == ["cut/ok.bin"]
    finally:
        once.close()
        always.close()


# ---------------------------------------------------------------------------------------- clear errors

def test_missing_bucket_fails_at_once(s3, tmp_path):
    (tmp_path / "f").write_text("x")
    st = _storage(RetryPolicy(attempts=5, base_delay=5.0))
    started = time.monotonic()
    ops = [lambda: st.upload_file(tmp_path / "f", "s3://nobucket/f"), lambda: st.list("s3://nobucket/p"),
           lambda: st.download_file("s3://nobucket/f", tmp_path / "g"), lambda: st.exists("s3://nobucket/f")]
    for op in ops:
        with pytest.raises(StorageError, match=f"bucket 'nobucket' does not exist at endpoint http://{s3.endpoint}"):
            op()
    assert time.monotonic() - started < 2.0


def test_unreachable_endpoint_and_silent_server_fail_after_the_retries(monkeypatch, tmp_path):
    port = free_port()  # nothing listens there
    monkeypatch.setenv("S3_ENDPOINT", f"127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.delenv("S3_USE_TLS", raising=False)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    with pytest.raises(StorageError, match=rf"endpoint http://127\.0\.0\.1:{port} unreachable .* after 3 attempts"):
        _storage().list("s3://kfyolo/runs")

    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts connections, never answers
        monkeypatch.setenv("S3_ENDPOINT", f"127.0.0.1:{silent.getsockname()[1]}")
        started = time.monotonic()
        with pytest.raises(StorageError, match="ReadTimeoutError"):
            _storage(RetryPolicy(attempts=2, base_delay=0.01), read_timeout=0.3).exists("s3://kfyolo/x")
        assert time.monotonic() - started < 5.0


def test_time_limits_come_from_the_environment_and_bound_a_silent_endpoint(monkeypatch):
    """An endpoint that accepts and never answers: the retry budget ends the operation, not the
    number of attempts (defaults: 5 s connect, 30 s read, 100 s in all)."""
    for var, value in (("AWS_ACCESS_KEY_ID", ACCESS_KEY), ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
                       ("AWS_REGION", "us-east-1"), ("S3_READ_TIMEOUT", "0.4"), ("S3_CONNECT_TIMEOUT", "0.4"),
                       ("S3_RETRY_BUDGET", "2.5")):
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("S3_USE_TLS", raising=False)
    default = Storage(S3Config("127.0.0.1:1", False, None, ACCESS_KEY, SECRET_KEY))
    assert default.retry.budget_s == 100 and default.attempt_s == 35  # under 2 minutes in all
    with socket.create_server(("127.0.0.1", 0)) as silent:
        monkeypatch.setenv("S3_ENDPOINT", f"127.0.0.1:{silent.getsockname()[1]}")
        st = Storage.from_env()
        assert st.retry.attempts == 5 and st.retry.budget_s == 2.5 and st.attempt_s == pytest.approx(0.8)
        started = time.monotonic()
        with pytest.raises(StorageError, match=r"would overrun the 2\.5s budget \(S3_RETRY_BUDGET\)"):
            st.exists("s3://kfyolo/x")
        assert time.monotonic() - started < 2.5 + 0.5
    monkeypatch.setenv("S3_READ_TIMEOUT", "soon")
    with pytest.raises(StorageError, match="S3_READ_TIMEOUT='soon': expected a positive number of seconds"):
        Storage.from_env()


def _iam_user() -> tuple[str, str]:
    """An IAM user allowed s3:* on moto, made while authentication is still off."""
    import boto3

    iam = boto3.client("iam", endpoint_url=os.environ["S3_ENDPOINT"], region_name="us-east-1",
                       aws_access_key_id="setup", aws_secret_access_key="setup")
    iam.create_user(UserName="trainer")
    iam.put_user_policy(UserName="trainer", PolicyName="s3", PolicyDocument=(
        '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}'))
    key = iam.create_access_key(UserName="trainer")["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


def test_rejected_credentials_are_named_without_their_values(s3, tmp_path, monkeypatch, caplog):
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    key_id, secret = _iam_user()
    (tmp_path / "f").write_text("x")
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto now checks every signature
    monkeypatch.setattr(ActionAuthenticatorMixin, "request_count", 0)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    _storage().upload_file(tmp_path / "f", "s3://kfyolo/ok")  # the right keys work

    wrong_secret = "wrong-" + secret[::-1]
    for kid, sec in ((key_id, wrong_secret), ("AKIAUNKNOWNKEY000000", SECRET_KEY)):
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", kid)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", sec)
        st = _storage(RetryPolicy(attempts=5, base_delay=5.0))
        for op in (lambda: st.upload_file(tmp_path / "f", "s3://kfyolo/f"), lambda: st.exists("s3://kfyolo/ok"),
                   lambda: st.download_file("s3://kfyolo/ok", tmp_path / "g")):
            with caplog.at_level(logging.DEBUG), pytest.raises(StorageError) as e:
                op()
            text = _full_text(e.value)
            assert f"credentials rejected by http://{s3.endpoint} for bucket 'kfyolo'" in str(e.value)
            assert "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY" in str(e.value)
            assert sec not in text and kid not in text
        assert sec not in caplog.text and sec not in repr(st)


def test_no_secret_in_logs_or_errors_through_retries(s3, tmp_path, caplog):
    (tmp_path / "f").write_text("x")
    st = _storage(RetryPolicy(attempts=3, base_delay=0.01))
    st.exists("s3://kfyolo/warm")
    s3.stop()
    with caplog.at_level(logging.DEBUG), pytest.raises(StorageError) as e:
        st.upload_file(tmp_path / "f", "s3://kfyolo/f")
    assert len([r for r in caplog.records if "retry" in r.getMessage()]) == 2
    for text in (caplog.text, _full_text(e.value), repr(st), repr(st.config)):
        assert SECRET_KEY not in text and ACCESS_KEY not in text


def test_redaction_scrubs_echoed_keys(s3):
    st = _storage()
    assert st._redact(f"server said {SECRET_KEY} / {ACCESS_KEY}") == "server said *** / ***"
