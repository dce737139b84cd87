"""Reading shards: tar bytes -> raw WebDataset samples, with unreadable shards skipped and counted.

What belongs here: the minimal tar reader, opening a shard URL (local, S3, other gopen schemes),
the `ShardSamples` pipeline stage that turns a stream of shard records into samples, and the
`StreamErrors` counters it (and the decoder) report to. Samples stay raw bytes here.

Python's tarfile (which webdataset's tar iterator uses) parses every header field in Python:
about 80 us per sample, a fifth of decoding a 64 px triplet. Shards are plain tar files written
by `composeae.data.writer`, so the minimal reader below does what the pipeline needs at ~4 us,
and unlike tarfile it notices truncation.
"""

from __future__ import annotations

import logging
import multiprocessing
import re
from typing import Iterator

from webdataset.gopen import gopen

from composeae import storage
from composeae.errors import UserError

log = logging.getLogger("composeae.data.stream")


class StreamErrors:
    """Shards and samples skipped because they could not be read, counted across workers.

    The counters live in shared memory, so DataLoader worker processes add to the same numbers
    the main process reads. They belong to the default multiprocessing context, the one the
    DataLoader uses.
    """

    def __init__(self) -> None:
        self._shards = multiprocessing.Value("q", 0)
        self._samples = multiprocessing.Value("q", 0)

    @property
    def shards(self) -> int:
        return self._shards.value

    @property
    def samples(self) -> int:
        return self._samples.value

    def add_shard(self) -> None:
        with self._shards.get_lock():
            self._shards.value += 1

    def add_sample(self) -> None:
        with self._samples.get_lock():
            self._samples.value += 1


class ShardSamples:
    """{"url", "count"} stream -> raw samples; unreadable shards are skipped, warned about, counted.

    A shard record's "round" (the training stream's pass over the shards) travels with each of
    its samples as "__round__".

    Samples are grouped per shard, so a truncated shard cannot leak a half sample into the next
    one. A tar cut at a member boundary reads as a shorter valid archive, so a shard is also
    failed when it yields another number of samples than the manifest's count. An endless
    stream whose shards keep failing would spin forever: after `max_failures` shards in a row
    without a sample it raises instead.
    """

    def __init__(self, errors: StreamErrors, max_failures: int | None = None):
        self.errors = errors
        self.max_failures = max_failures

    def __call__(self, shards: Iterator[dict]) -> Iterator[dict]:
        failures = 0
        for shard in shards:
            url = shard["url"]
            delivered = 0
            try:
                for sample in self._samples(url):
                    delivered += 1
                    if "round" in shard:
                        sample["__round__"] = shard["round"]
                    yield sample
                if delivered != shard["count"]:
                    raise ValueError(f"truncated: {delivered} samples, the manifest says "
                                     f"{shard['count']}")
            except Exception as exc:
                self.errors.add_shard()
                log.warning("skipping unreadable shard %s after %d samples: %s", url, delivered,
                            f"{type(exc).__name__}: {exc}")
                failures = 0 if delivered else failures + 1
                if self.max_failures is not None and failures >= self.max_failures:
                    raise UserError(f"{failures} shards in a row could not be read, the last "
                                    f"one {url}: {exc}") from exc
            else:
                failures = 0

    @staticmethod
    def _samples(url: str) -> Iterator[dict]:
        with open_shard(url) as stream:
            yield from tar_samples(stream, url)


def open_shard(url: str):
    """Local files and S3 through `storage` (large read buffers); other schemes through gopen."""
    if storage.is_s3(url) or "://" not in url and not url.startswith("pipe:"):
        return storage.open_read(url)
    return gopen(url, "rb")


_BLOCK = 512
_END_BLOCK = bytes(_BLOCK)
# WebDataset's rule: the key is the path up to the first '.' of the file name, the rest the ext.
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def tar_samples(stream, url: str) -> Iterator[dict]:
    """Samples of a WebDataset tar stream: {"__key__", "__url__", ext: bytes, ...}."""
    for sample, _ in group_samples(((name, data, None) for name, data in tar_members(stream)),
                                   url):
        yield sample


def group_samples(members, url: str) -> Iterator[tuple[dict, dict]]:
    """(name, data, extra) members -> (sample, {ext: extra}) by WebDataset's key rule; `extra`
    is what the caller tracks per member (e.g. its byte range), or None."""
    sample: dict | None = None
    extras: dict = {}
    for name, data, extra in members:
        match = _KEY_EXT.match(name)
        if match is None:
            continue
        key, ext = match.group(1), match.group(2).lower()
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield sample, extras
            sample, extras = {"__key__": key, "__url__": url}, {}
        if ext in sample:
            raise ValueError(f"{url}: {name} appears twice in one sample")
        sample[ext] = data
        extras[ext] = extra
    if sample is not None:
        yield sample, extras


def tar_members(stream) -> Iterator[tuple[str, bytes]]:
    """(name, data) of every regular file in a tar stream (ustar, PAX paths, GNU long names).

    Raises on a block that is not a tar header (a corrupt shard) and, unlike tarfile, on an
    archive that ends without its end-of-archive block (a truncated shard).
    """
    long_name = None
    while True:
        header = _read_exact(stream, _BLOCK)
        if header == _END_BLOCK:
            return
        _check_header(header)
        size = _octal(header[124:136])
        data = _read_exact(stream, size)
        _read_exact(stream, -size % _BLOCK)
        kind = header[156:157]
        if kind in (b"0", b"\0"):
            yield long_name or _header_name(header), data
            long_name = None
        elif kind == b"L":  # GNU long name of the next member
            long_name = data.rstrip(b"\0").decode("utf-8")
        elif kind == b"x":  # PAX header of the next member
            long_name = _pax_path(data) or long_name


def _read_exact(stream, n: int) -> bytes:
    data = stream.read(n)
    while len(data) < n:
        more = stream.read(n - len(data))
        if not more:
            raise EOFError(f"tar archive ends early (truncated): wanted {n} bytes, got {len(data)}")
        data += more
    return data


def _check_header(header: bytes) -> None:
    # The ustar magic (also in GNU and PAX headers) rather than the header checksum, which costs
    # 10 us per member in Python; whole-shard integrity is what `shards verify` checks (sha256).
    if header[257:262] != b"ustar":
        raise ValueError("not a tar header (corrupt archive)")


def _octal(field: bytes) -> int:
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _header_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8")


def _pax_path(records: bytes) -> str | None:
    """The `path` record of a PAX extended header ("<len> key=value\\n" records)."""
    path = None
    while records:
        length = int(records.split(b" ", 1)[0])
        key, _, value = records[:length].split(b" ", 1)[1].rstrip(b"\n").partition(b"=")
        if key == b"path":
            path = value.decode("utf-8")
        records = records[length:]
    return path
