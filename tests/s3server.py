"""A real S3 endpoint on loopback for tests: moto's threaded server, a TCP proxy that cuts connections
mid-request, and a worker for multi-process tests. moto keeps its buckets in this process, so a
server restarted on the same port serves the same objects."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from moto.server import ThreadedMotoServer

ACCESS_KEY = "kfyolo-test-access"
SECRET_KEY = "s3cr3t-value-never-logged-7f3a"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoS3:
    """moto's ThreadedMotoServer with a stop that frees the port (moto's own leaves it listening)."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self._server: ThreadedMotoServer | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "MotoS3":
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server._server.server_close()  # release the listening socket: connections are refused
            self._server = None


class CuttingProxy:
    """Forwards 127.0.0.1:port to the target port; the first `cuts` connections (all when cuts < 0)
    are closed after `after` bytes from the client, i.e. in the middle of an upload's body."""

    def __init__(self, target_port: int, after: int, cuts: int = 1):
        self.target_port, self.after, self.cuts = target_port, after, cuts
        self.cut_count = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                cut = self.cuts < 0 or self.cut_count < self.cuts
                self.cut_count += cut
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pump, args=(client, upstream, self.after if cut else None),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, None), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if limit is not None and sent + len(data) > limit:
                    dst.sendall(data[: limit - sent])
                    break  # cut: both sides see the connection drop mid-request
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self._listener.close()


def materialize_worker(uri: str, calls: str) -> str:
    """multiprocessing target: materialise a dataset, recording every object download in `calls`."""
    from trainer import storage
    from trainer.storage_sync import materialize_data

    original = storage.Storage.download_file

    def counted(self, uri, local):
        with open(calls, "a") as f:  # O_APPEND: lines from both processes interleave whole
            f.write(f"{uri}\n")
        time.sleep(0.02)  # a slower store, so the two processes surely overlap
        return original(self, uri, local)

    storage.Storage.download_file = counted
    return str(materialize_data(uri))


def upload_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
