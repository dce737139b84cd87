"""Bounded requests: how much of a request the search service reads, for how long, and how a
body becomes a checked query. Nothing here searches; every refusal is a `Rejected` with an
HTTP status and one sentence.

- The body: its length must be declared, and a `Content-Length` above the cap is refused (413)
  before a byte is read. A body of unknown length (`Transfer-Encoding: chunked`) is refused at
  once too (411): Ray Serve's proxy forwards a request's body to the replica as fast as the
  client sends it, whatever the handler reads, until the answer goes out, so stopping to read
  at the cap does not stop the bytes (measured: three chunked 300 MB bodies read up to the cap
  still added 740 MB to the replica). A declared body is then read as a stream and reading
  stops at the cap all the same (413). The whole body must arrive within `read_timeout_s`
  (408): a client that sends headers and a byte, or declares more than it sends, frees its
  slot then instead of holding it.
- The JSON: only an object with the known fields, each of its type; nesting deep enough to
  exhaust the parser's recursion is a 400, not a crash.
- The image: base64 text no longer than the image cap allows.

The numbers are `Limits` (one frozen set per deployment). Ray Serve's own limits sit in front
of these: `max_ongoing_requests` per replica and `max_queued_requests` (see `app`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

MAX_IMAGE_BYTES = 4 * 2**20
"""Largest uploaded reference image (decoded bytes)."""
MAX_REF_CHARS = 512
"""Longest gallery id accepted as a reference (answers quote it back)."""
FIELDS = ("ref", "image", "text", "k")
"""The fields of a search request: a gallery id or base64 image bytes, the modifier text, k."""


@dataclass(frozen=True)
class Limits:
    """What one request may cost the service."""
    max_body_bytes: int = MAX_IMAGE_BYTES * 4 // 3 + 64 * 1024
    """The image in base64 (a data: URL prefix included) and the rest of the JSON."""
    read_timeout_s: float = 20.0
    """The whole body must have arrived this long after the handler started reading it."""


class Rejected(Exception):
    """A request refused with `status` and a one-sentence `message`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


async def read_body(request, limits: Limits) -> bytes:
    """The body of a Starlette `request`, read within the limits (see the module docstring)."""
    declared = request.headers.get("content-length")
    if declared is None:
        raise Rejected(411, "the request must declare its Content-Length (a body of unknown "
                            "length, such as a chunked one, is not read)")
    if declared is not None:
        if not declared.strip().isdigit():
            raise Rejected(400, "the Content-Length header is not a number")
        if int(declared) > limits.max_body_bytes:
            raise Rejected(413, f"the request body may be at most {limits.max_body_bytes} bytes "
                                f"(Content-Length says {int(declared)})")
    chunks: list[bytes] = []
    size = 0

    async def pull() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise Rejected(413, f"the request body may be at most {limits.max_body_bytes} "
                                    f"bytes")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(pull(), limits.read_timeout_s)
    except asyncio.TimeoutError:
        raise Rejected(408, f"the request body did not arrive within {limits.read_timeout_s:g} "
                            f"s") from None
    except Rejected:
        raise
    except Exception as exc:  # noqa: BLE001 - the client went away or broke the framing
        raise Rejected(400, f"the request body could not be read ({type(exc).__name__})") \
            from None
    body = b"".join(chunks)
    if declared is not None and len(body) != int(declared):
        raise Rejected(400, f"the body has {len(body)} bytes, not the {int(declared)} its "
                            f"Content-Length says")
    return body


def parse_query(body: bytes) -> dict[str, Any]:
    """The search request's fields from a JSON body: {"ref", "image" (decoded bytes), "text",
    "k"}, absent ones None (k: 10). `Rejected` (400) on anything else."""
    try:
        query = json.loads(body or b"{}")
    except RecursionError:
        raise Rejected(400, "the request body is nested too deeply to be a search request") \
            from None
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise Rejected(400, "the request body must be a JSON object") from None
    if not isinstance(query, dict):
        raise Rejected(400, "the request body must be a JSON object")
    unknown = sorted(set(query) - set(FIELDS))
    if unknown:
        raise Rejected(400, f"unknown field {unknown[0][:40]!r} (a search takes "
                            f"{', '.join(FIELDS)})")
    for name in ("ref", "text"):
        if query.get(name) is not None and not isinstance(query[name], str):
            raise Rejected(400, f"{name} must be a string")
    if len(query.get("ref") or "") > MAX_REF_CHARS:
        raise Rejected(400, f"ref is longer than a gallery id ({MAX_REF_CHARS} characters)")
    k = query.get("k", 10)
    if isinstance(k, (dict, list)) or isinstance(k, str) and len(k) > 20:
        raise Rejected(400, "k must be a whole number")
    return {"ref": query.get("ref") or None, "image": decode_image(query.get("image")),
            "text": query.get("text"), "k": k}


def decode_image(value: Any) -> bytes | None:
    """Bytes of a base64 image (a `data:` URL's prefix is skipped), None when absent."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise Rejected(400, "image must be base64 text")
    if len(value) > MAX_IMAGE_BYTES * 4 // 3 + 256:
        raise Rejected(413, f"the image is larger than {MAX_IMAGE_BYTES // 2**20} MB")
    try:
        return base64.b64decode(value.split(",", 1)[-1], validate=True)
    except (binascii.Error, ValueError):
        raise Rejected(400, "image is not valid base64") from None
