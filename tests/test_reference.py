"""docs/config.md is generated from the config classes' docs and kept in sync with them."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from composeae import config
from composeae.reference import field_docs, main, render

ROOT = Path(__file__).resolve().parents[1]


def test_the_checked_in_reference_is_what_the_code_generates():
    assert (ROOT / "docs" / "config.md").read_text() == render(), (
        "docs/config.md is out of date: run .venv/bin/python -m composeae.reference "
        "--out docs/config.md")


def test_every_key_is_documented_with_its_type_and_default(tmp_path):
    out = tmp_path / "config.md"
    main(["--out", str(out)])
    text = out.read_text()
    for section in dataclasses.fields(config.Config):
        cls = typing.get_type_hints(config.Config)[section.name]
        docs = field_docs(cls)
        assert cls.__doc__ and set(docs) == {f.name for f in dataclasses.fields(cls)}, section
        for f in dataclasses.fields(cls):
            row = next(line for line in text.splitlines()
                       if line.startswith(f"| `{section.name}.{f.name}` |"))
            assert row.count(" | ") >= 3 and docs[f.name].split()[0] in row
    assert "| `gpu` |" in text and "## Sweep files" in text and "`nightly.margin_points`" in text
