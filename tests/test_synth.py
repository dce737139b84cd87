"""CSS-synth: determinism, held-out combinations, a gallery that needs the text; shards commands."""

from __future__ import annotations

import argparse
import os

import pytest
import torch

from composeae.config import DataConfig
from composeae.data import commands, synth
from composeae.data.stream import eval_batches
from composeae.data.shardset import load_corpus
from composeae.data.shardset import read_manifest
from composeae.errors import UserError


def run_cli(*argv: str) -> None:
    """Parse and run `composeae shards ...` the way the top-level CLI does."""
    parser = argparse.ArgumentParser(prog="composeae")
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


def collect(url: str, split: str, kind: str) -> dict:
    """All batches of one evaluation split/kind merged into one batch."""
    merged: dict = {}
    for batch in eval_batches(DataConfig(url=url, loader_workers=0), split, kind, 64,
                              rank=0, world_size=1):
        for key, value in batch.items():
            merged.setdefault(key, []).append(value)
    return {k: torch.cat(v) if isinstance(v[0], torch.Tensor) else sum(v, [])
            for k, v in merged.items()}


def test_same_seed_same_bytes(css_tiny, tmp_path):
    again = synth.generate(str(tmp_path / "again"), preset="tiny", seed=0)
    assert again == read_manifest(css_tiny)
    other = synth.generate(str(tmp_path / "other"), preset="tiny", seed=1)
    assert other["splits"]["train"] != again["splits"]["train"]


def test_parallel_rendering_gives_the_same_bytes(css_tiny, tmp_path):
    """`shards synth --workers N` renders in N processes; the shards are byte-identical."""
    run_cli("shards", "synth", "--out", str(tmp_path / "par"), "--preset", "tiny", "--workers", "3")
    assert read_manifest(str(tmp_path / "par")) == read_manifest(css_tiny)
    with pytest.raises(UserError, match="at least one worker"):
        synth.generate(str(tmp_path / "none"), preset="tiny", workers=0)


def test_tiny_preset_has_several_shards_per_kind(css_tiny):
    splits = read_manifest(css_tiny)["splits"]
    assert splits["train"]["triplets"]["count"] == 210
    assert len(splits["train"]["triplets"]["shards"]) >= 5
    for split in ("val", "test"):
        assert splits[split]["queries"]["count"] == 45
        assert splits[split]["gallery"]["count"] == 45 / 3 * 16
        assert len(splits[split]["gallery"]["shards"]) >= 2


def test_held_out_combinations_only_in_test(css_tiny):
    held = synth.held_out_combinations(0)
    plans = synth.plan("tiny", seed=0)
    for split in ("train", "val"):
        for group in plans[split]:
            scenes = [group.source] + [v.scene for v in group.variants]
            assert not {(o.shape, o.colour) for s in scenes for o in s} & set(held)
    assert all({(o.shape, o.colour) for o in g.source} & set(held) for g in plans["test"])

    phrases = read_manifest(css_tiny)["params"]["held_out"]
    assert phrases == [f"{colour} {shape}" for shape, colour in held]
    corpus = " | ".join(load_corpus(DataConfig(url=css_tiny)))
    assert not [p for p in phrases if p in corpus]
    test_captions = " | ".join(collect(css_tiny, "test", "gallery")["caption"])
    assert all(p in test_captions for p in phrases)


def test_gallery_makes_the_text_necessary(css_tiny):
    queries, gallery = collect(css_tiny, "test", "queries"), collect(css_tiny, "test", "gallery")
    labels = gallery["label"]
    assert set(queries["target_label"]) <= set(labels)
    assert set(queries["reference_id"]) <= set(gallery["image_id"])
    # Image-only retrieval by raw pixels, the query's own reference image excluded.
    distance = torch.cdist(queries["reference"].flatten(1), gallery["image"].flatten(1))
    own = torch.tensor([[r == g for g in gallery["image_id"]] for r in queries["reference_id"]])
    nearest = distance.masked_fill(own, float("inf")).argmin(dim=1)
    hits = [labels[i] == t for i, t in zip(nearest.tolist(), queries["target_label"])]
    assert sum(hits) / len(hits) < 0.5
    # Each source scene's texts lead to different targets.
    by_reference: dict = {}
    for ref, target in zip(queries["reference_id"], queries["target_label"]):
        by_reference.setdefault(ref, set()).add(target)
    assert all(len(targets) == 3 for targets in by_reference.values())


def test_labels_are_canonical_and_texts_name_one_target():
    a = synth.Obj(0, "circle", "red", "small")
    b = synth.Obj(4, "square", "blue", "large")
    assert synth.label((a, b)) == "0-small-red-circle;4-large-blue-square"
    twins = (a, synth.Obj(8, "circle", "red", "large"))
    assert synth._refer(a, twins) == "the red circle in the top-left"
    assert synth._refer(b, (a, b)) == "the blue square"


def test_cli_synth_ls_verify_and_tampering(tmp_path, capsys):
    out = str(tmp_path / "css")
    run_cli("shards", "synth", "--out", out, "--preset", "tiny", "--image-size", "32")
    run_cli("shards", "ls", out)
    table = capsys.readouterr().out
    assert "train  triplets" in table and "test   gallery" in table
    run_cli("shards", "verify", out)
    assert "ok: " in capsys.readouterr().out

    with open(os.path.join(out, "val-gallery-000001.tar"), "r+b") as f:
        f.seek(700)
        f.write(b"tampered")
    os.remove(os.path.join(out, "test-queries-000000.tar"))
    with pytest.raises(UserError, match="2 problem"):
        run_cli("shards", "verify", out)
    report = capsys.readouterr().out
    assert "mismatch val-gallery-000001.tar" in report
    assert "missing test-queries-000000.tar" in report


def test_cli_bad_input(tmp_path, s3_server):
    with pytest.raises(UserError, match="no dataset at .*manifest.json not found"):
        run_cli("shards", "ls", str(tmp_path))
    with pytest.raises(UserError, match="bucket 'no-such-bucket' does not exist"):
        run_cli("shards", "synth", "--out", "s3://no-such-bucket/css", "--preset", "tiny")
    with pytest.raises(UserError, match="bucket 'no-such-bucket' does not exist"):
        run_cli("shards", "verify", "s3://no-such-bucket/css")
    with pytest.raises(UserError, match="unknown dataset 'nope'"):
        run_cli("shards", "convert", "nope", "--src", str(tmp_path), "--out", str(tmp_path / "o"))
    with pytest.raises(UserError, match="image size"):
        run_cli("shards", "synth", "--out", str(tmp_path / "x"), "--image-size", "8")
