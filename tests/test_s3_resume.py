"""S3 reads survive a connection that breaks mid-body: a ranged GET resumes at the byte reached.

A small HTTP proxy in front of the moto server forwards every request, but answers the first
plain GET of each shard with the full Content-Length and only part of the body, then drops the
connection.
"""

from __future__ import annotations

import http.client
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import pytest

from composeae.config import DataConfig
from composeae import storage
from composeae.data.stream import eval_batches
from composeae.data.synth import generate


class CuttingProxy(ThreadingHTTPServer):
    """Forwards to `upstream`; cuts the first unranged GET of every `.tar` object mid-body."""

    daemon_threads = True

    def __init__(self, upstream: str):
        super().__init__(("127.0.0.1", 0), _Handler)
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.cut: set[str] = set()
        self.ranges: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def should_cut(self, path: str, has_range: bool) -> bool:
        with self.lock:
            if has_range or not path.split("?")[0].endswith(".tar") or path in self.cut:
                return False
            self.cut.add(path)
            return True


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: CuttingProxy

    def log_message(self, *args) -> None:
        pass

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        upstream = http.client.HTTPConnection(*self.server.upstream, timeout=30)
        # Host stays the client's: it is part of the SigV4 signature.
        upstream.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
        response = upstream.getresponse()
        payload = response.read()
        upstream.close()
        range_header = self.headers.get("Range")
        if range_header:
            with self.server.lock:
                self.server.ranges.append((self.path, range_header))
        cut = self.command == "GET" and response.status == 200 and \
            self.server.should_cut(self.path, bool(range_header))
        self.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in ("connection", "transfer-encoding", "content-length"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if cut:
            # An odd byte count: not aligned with tar blocks nor with any read size.
            self.wfile.write(payload[: len(payload) // 2 + 7])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
        elif self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward


@pytest.fixture
def proxy(s3_server, monkeypatch):
    server = CuttingProxy(s3_server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    yield server
    server.shutdown()
    server.server_close()


def test_broken_body_is_resumed_byte_exact(s3_bucket, s3_server, proxy):
    url = storage.join(s3_bucket, "blob.tar")
    payload = bytes(range(256)) * 400
    with pytest.MonkeyPatch.context() as direct:
        direct.setenv("AWS_ENDPOINT_URL", s3_server)
        storage.write_bytes(url, payload)
    reader = storage.S3RangeReader(url)
    with reader:
        data = b"".join(iter(lambda: reader.read(4096), b""))
    assert data == payload
    assert reader.resumes == 1
    assert proxy.ranges == [(f"/{url[5:]}", f"bytes={len(payload) // 2 + 7}-")]


def test_every_sample_once_when_each_shard_breaks(s3_bucket, s3_server, proxy, css_tiny):
    url = s3_bucket + "/css"
    with pytest.MonkeyPatch.context() as direct:
        direct.setenv("AWS_ENDPOINT_URL", s3_server)
        generate(url, preset="tiny", seed=0)
    data = DataConfig(url=url, image_size=32, loader_workers=0)
    ids = [i for b in eval_batches(data, "test", "gallery", 16, rank=0, world_size=1)
           for i in b["image_id"]]
    assert len(ids) == len(set(ids)) == 240
    local = DataConfig(url=css_tiny, image_size=32, loader_workers=0)
    assert ids == [i for b in eval_batches(local, "test", "gallery", 16, rank=0, world_size=1)
                   for i in b["image_id"]]
    shards = {path for path, _ in proxy.ranges}
    assert len(proxy.cut) == len(shards) >= 2
