"""Test helpers for `gs://`: a real GCS API server on loopback and a proxy in front of it that injects 5xx."""

from __future__ import annotations

import http.client
import http.server
import threading

import pytest

from lvm.data_pipeline import emulator, storage

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection", "host"}


class FaultProxy:
    """HTTP proxy on loopback to `upstream` that answers 503 to every `fail_every`-th request (0: never)."""

    def __init__(self, upstream_port: int, fail_every: int = 0):
        self.upstream_port = upstream_port
        self.fail_every = fail_every
        self.requests = 0
        self.failed = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().strip().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reply(self, status: int, headers, body: bytes):
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in HOP_HEADERS:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self):
                body = self._body()
                with proxy._lock:
                    proxy.requests += 1
                    fail = proxy.fail_every and proxy.requests % proxy.fail_every == 0
                    proxy.failed += bool(fail)
                if fail:
                    msg = b'{"error": {"code": 503, "message": "injected fault"}}'
                    self._reply(503, [("Content-Type", "application/json")], msg)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self._reply(resp.status, resp.getheaders(), data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def gcs_server(tmp_path_factory):
    """fake-gcs-server with its filesystem backend (restartable), gcsfs pointed at it; bucket `test`."""
    server = emulator.FakeGCS(root=str(tmp_path_factory.mktemp("gcs-root"))).start()
    server.create_bucket("test")
    emulator.set_environ(server.url)
    yield server
    server.stop()
    storage.reset_gcs_client()
