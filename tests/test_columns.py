"""The compact columns of a gallery index (`composeae.serve.columns`): strings in one buffer
and the row of an id by sorted hashes, against a plain list and dict on the same data."""

from __future__ import annotations

import random
import sys

import numpy as np
import pytest

from composeae.serve.columns import ColumnBuilder, RowLookup, StringColumn


def test_a_column_reads_back_every_string_as_a_list_would(monkeypatch):
    import composeae.serve.columns as columns

    monkeypatch.setattr(columns, "ITER_CHUNK", 3)  # iteration crosses chunks of offsets
    rng = random.Random(0)
    parts = [[f"img-{rng.randrange(10**6)}-{'é' * rng.randrange(3)}" for _ in range(n)]
             for n in (5, 0, 17, 1)]
    flat = [s for part in parts for s in part] + ["", "ünïcödé ✓"]
    builder = ColumnBuilder()
    for part in parts:
        builder.add(part)
    builder.add(["", "ünïcödé ✓"])
    column = builder.finish()
    assert len(column) == len(flat) and list(column) == flat
    assert column[-1] == flat[-1] and column[3:20:4] == flat[3:20:4] and column[::7] == flat[::7]
    with pytest.raises(IndexError):
        column[len(flat)]
    assert len(StringColumn.build([])) == 0


def test_the_lookup_gives_the_first_row_of_an_id_like_a_dict():
    ids = [f"s{i % 500:04d}" for i in range(1200)]  # every id at several rows
    expected: dict[str, int] = {}
    for row, image_id in enumerate(ids):
        expected.setdefault(image_id, row)
    lookup = RowLookup(StringColumn.build([ids[:700], ids[700:]]))
    for image_id, row in expected.items():
        assert lookup.get(image_id) == row and lookup[image_id] == row and image_id in lookup
    assert lookup.get("nope") is None and "nope" not in lookup and lookup.get(7) is None
    with pytest.raises(KeyError):
        lookup["nope"]


def test_ids_whose_hashes_collide_are_told_apart(monkeypatch):
    """Equal hashes (forced here) fall back to comparing the strings."""
    import composeae.serve.columns as columns

    monkeypatch.setattr(columns, "hash", lambda s: len(s), raising=False)
    ids = ["ab", "cd", "ef", "ab", "xyz"]
    lookup = RowLookup(StringColumn.build([ids]))
    assert [lookup.get(i) for i in ("ab", "cd", "ef", "xyz", "gh")] == [0, 1, 2, 4, None]


def test_a_million_ids_take_a_fraction_of_a_list_and_dict():
    ids = [f"test-s{i:07d}-v00" for i in range(1_000_000)]
    column = StringColumn.build([ids])
    lookup = RowLookup(column)
    # What the index held before: a list of str, and a dict from id to row (int objects).
    row_of = {image_id: row for row, image_id in enumerate(ids)}
    plain = (sum(sys.getsizeof(s) for s in ids) + sys.getsizeof(ids) + sys.getsizeof(row_of)
             + sum(sys.getsizeof(r) for r in row_of.values()))
    compact = column.nbytes + lookup.nbytes
    print(f"1M ids: {compact / 2**20:.0f} MiB compact, {plain / 2**20:.0f} MiB as objects")
    assert compact < plain / 3
    assert lookup.get(ids[123_456]) == 123_456 and column[999_999] == ids[-1]
    assert np.all(np.diff(column._offsets) == len(ids[0]))


def test_a_lookup_sent_to_another_process_finds_its_ids_there():
    """Another interpreter hashes strings with another seed: the pickled lookup rebuilds its
    hashes there."""
    import pickle
    import subprocess

    ids = [f"img{i:05d}" for i in range(3000)]
    payload = pickle.dumps(RowLookup(StringColumn.build([ids])))
    script = ("import pickle, sys; lookup = pickle.loads(sys.stdin.buffer.read()); "
              "print(lookup.get('img02999'), lookup.get('img00000'), lookup.get('nope'))")
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", script], input=payload, capture_output=True,
                             env={"PYTHONHASHSEED": seed, "PATH": ""}, check=True).stdout
        assert out.decode().split() == ["2999", "0", "None"]
