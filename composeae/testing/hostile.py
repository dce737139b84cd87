"""Hostile and careless clients of a running search service (`composeae serve`): raw sockets
that send what a well-behaved HTTP library never would, for the serving tests.

Every function returns the HTTP status the service answered with, or 0 when the connection
closed without an answer (which is not a server error: the client broke the protocol).
"""

from __future__ import annotations

import io
import json
import random
import select
import socket
import struct
import time
import zlib


def _status(sock: socket.socket, timeout: float) -> int:
    """The status code of the answer on `sock`, 0 if it closes or says nothing in `timeout`."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError:  # reset or timed out
        pass
    parts = data.split(b" ", 2)
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return int(parts[1])
    return 0


def head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close",
             *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def raw(port: int, data: bytes, timeout: float = 30.0) -> int:
    """Send `data` as the whole request and read the answer's status."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass  # the service answered and closed before taking everything
        return _status(sock, timeout)


def chunked_flood(port: int, path: str, headers: dict[str, str], total: int,
                  chunk: int = 2**20, timeout: float = 30.0) -> tuple[int, int]:
    """POST a chunked body of up to `total` bytes, stopping as soon as an answer arrives:
    (status, bytes of body sent)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head("POST", path, {**headers, "Transfer-Encoding": "chunked"}))
        piece = f"{chunk:x}\r\n".encode() + b"[" * chunk + b"\r\n"
        try:
            while sent < total:
                if select.select([sock], [], [], 0)[0]:
                    break  # answered: stop sending
                sock.sendall(piece)
                sent += chunk
            else:
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass
        return _status(sock, timeout), sent


class SlowClients:
    """`n` connections that send their headers (declaring `declared` bytes of body) and one
    byte, then wait: a slow or stalled client. `statuses()` reads what each was answered."""

    def __init__(self, port: int, n: int, headers: dict[str, str], declared: int = 1000):
        self.socks: list[socket.socket] = []
        for _ in range(n):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.sendall(head("POST", "/search", {**headers, "Content-Type": "application/json",
                                                  "Content-Length": str(declared)}) + b"{")
            self.socks.append(sock)

    def statuses(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        return [_status(s, max(0.1, deadline - time.monotonic())) for s in self.socks]

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


def images() -> dict[str, bytes]:
    """One small picture in each format Pillow writes here (the service takes JPEG, PNG and
    WEBP only)."""
    from PIL import Image

    picture = Image.new("RGB", (24, 24), (200, 30, 30))
    found = {}
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "ICO", "PPM", "TGA", "PCX", "EPS",
                "PDF", "SGI", "DDS", "IM", "MSP", "XBM"):
        buffer = io.BytesIO()
        try:
            (picture.convert("1") if fmt in ("MSP", "XBM") else picture).save(buffer, fmt)
        except (OSError, KeyError, ValueError):
            continue  # a writer this Pillow lacks
        found[fmt] = buffer.getvalue()
    return found


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_bomb(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` grey pixels, each row compressed to almost
    nothing: a few kB that would decode to width x height bytes."""
    rows = zlib.compressobj(9)
    body = b"".join(rows.compress(b"\x00" * (width + 1)) for _ in range(min(height, 64)))
    body += rows.flush()
    return (b"\x89PNG\r\n\x1a\n"
            + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b""))


ODD_VALUES = [None, 0, -1, 1.5, True, [], {}, [1, 2], {"a": 1}, "", "x" * 600, 10**30, 1e308,
              "NaN", "\u0000", "\ud83d\ude00" * 100]
"""Values of the wrong type or size for some field of a search request."""


def odd_bodies(ref: str) -> list[tuple[str, object, dict]]:
    """(field, value, request) of search requests with each field set to each odd value (the
    other fields valid), and a few with fields missing, doubled or unknown (field "")."""
    valid = {"ref": ref, "text": "make the red circle blue", "k": 3}
    bodies: list[tuple[str, object, dict]] = []
    for field in ("ref", "text", "k", "image"):
        for value in ODD_VALUES:
            body = dict(valid, **{field: value})
            if field == "image":
                body.pop("ref")
            bodies.append((field, value, body))
    bodies += [("", None, b) for b in (dict(valid, extra=1), {"ref": ref, "image": "AAAA",
                                                              "text": "x"}, {})]
    return bodies


def deep_json(depth: int, kind: str = "list") -> bytes:
    if kind == "list":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


def random_bodies(n: int, seed: int = 0, largest: int = 65536) -> list[bytes]:
    draw = random.Random(seed)
    return [draw.randbytes(draw.randrange(0, largest)) for _ in range(n)]


def json_body(value) -> bytes:
    return json.dumps(value).encode("utf-8")


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid` in MB (from /proc, so on this machine)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024  # kB
    raise KeyError("VmRSS")
