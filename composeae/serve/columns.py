"""Compact per-row strings of a gallery index: its ids and labels, and the lookup of a row by id.

A Python `str` costs about 50 bytes besides its characters, a list slot 8 more, and a dict
entry from id to row about 100: at 10M rows the ids, labels and the dict took most of a
service replica's 3.2 GB while the rows themselves lived in shard actors. Here the strings of
a column share one UTF-8 buffer with an (N + 1,) int64 offsets array (their bytes + 8 each),
and the lookup keeps the 64-bit hashes of the ids sorted (16 bytes an id), checking the string
itself on a hash match.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Iterable, overload

import numpy as np

ITER_CHUNK = 65536
"""Offsets turned into Python ints at once while iterating (all of 10M would be 0.4 GB)."""


class StringColumn(Sequence):
    """N strings in one buffer: `column[i]` a `str`, `column[a:b:c]` a list of them."""

    def __init__(self, data: bytes, offsets: np.ndarray):
        self._data, self._offsets = data, offsets

    @classmethod
    def build(cls, parts: Iterable[list[str]]) -> "StringColumn":
        """The column of the strings of `parts` (lists, in order)."""
        builder = ColumnBuilder()
        for part in parts:
            builder.add(part)
        return builder.finish()

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        begin, end = self._offsets[index], self._offsets[index + 1]
        return self._data[begin:end].decode("utf-8")

    def __iter__(self):
        data = self._data
        for start in range(0, len(self), ITER_CHUNK):  # a chunk of offsets as ints at a time
            offsets = self._offsets[start:start + ITER_CHUNK + 1].tolist()
            for begin, end in zip(offsets, offsets[1:]):
                yield data[begin:end].decode("utf-8")

    @property
    def nbytes(self) -> int:
        return len(self._data) + self._offsets.nbytes


class ColumnBuilder:
    """A `StringColumn` built part by part (a block's list at a time), so that no more than one
    part's Python strings need exist at once."""

    def __init__(self):
        self._chunks: list[bytes] = []
        self._lengths: list[np.ndarray] = []

    def add(self, part: list[str]) -> None:
        encoded = [s.encode("utf-8") for s in part]
        self._lengths.append(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)))
        self._chunks.append(b"".join(encoded))

    def finish(self) -> StringColumn:
        offsets = np.zeros(sum(len(x) for x in self._lengths) + 1, dtype=np.int64)
        if self._lengths:
            np.cumsum(np.concatenate(self._lengths), out=offsets[1:])
        return StringColumn(b"".join(self._chunks), offsets)


class RowLookup:
    """id -> the first row holding it, over a `StringColumn` of ids (a dict's interface for
    reading: `get`, `in`, `[]`)."""

    def __init__(self, ids: StringColumn):
        self._ids = ids
        hashes = np.fromiter((hash(s) for s in ids), dtype=np.int64, count=len(ids))
        # Stable: among equal hashes the rows stay ascending, so the first match is the first
        # row with that id (an image listed in two groups counts once, at its first row).
        self._order = np.argsort(hashes, kind="stable")
        self._hashes = hashes[self._order]

    def __reduce__(self):
        # Python's str hashes differ between processes (PYTHONHASHSEED): sent to another
        # process, the lookup is rebuilt there from the ids, not carried with this one's hashes.
        return (RowLookup, (self._ids,))

    def get(self, image_id: str, default: int | None = None) -> int | None:
        if not isinstance(image_id, str):
            return default
        key = hash(image_id)
        at = int(np.searchsorted(self._hashes, key))
        while at < len(self._hashes) and self._hashes[at] == key:
            row = int(self._order[at])
            if self._ids[row] == image_id:
                return row
            at += 1
        return default

    def __contains__(self, image_id: object) -> bool:
        return self.get(image_id) is not None  # type: ignore[arg-type]

    def __getitem__(self, image_id: str) -> int:
        row = self.get(image_id)
        if row is None:
            raise KeyError(image_id)
        return row

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def nbytes(self) -> int:
        return self._hashes.nbytes + self._order.nbytes
