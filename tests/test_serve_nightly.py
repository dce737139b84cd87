"""The nightly job and the gallery index: a promoted night builds the new champion's index before
the alias moves, a re-run (or a night killed after its index) finds it built, and a rollback
points the service back at the previous version's index. The nights' models are registered by
hand (training them is what tests/test_nightly.py covers); the night's finishing step is the
nightly job's own."""

from __future__ import annotations

from pathlib import Path

from composeae.config import load_config
from composeae.registry.store import ModelRegistry
from composeae.serve.index import read_manifest, registry_index_url
from composeae.testing.checkpoints import random_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _night_record(night: str, *, champion: int | None) -> dict:
    table = {"test/R@1": 0.2}
    return {"date": night, "model": "composeae", "evaluation": {"split": "test", "table": table},
            "data": {"fingerprint": "f"}, "run_url": "-", "code_version": "-",
            "decision": {"alias": "champion", "promote": True, "reason": "test: promoted",
                         "metric": "test/R@1", "margin": 0.0, "champion": champion,
                         "champion_table": table if champion else None}}


def test_promoted_nights_build_the_index_first_and_a_rollback_finds_the_old_one(
        ray_local, s3_bucket, css_tiny, tmp_path):
    from composeae.nightly.flow import _finish
    from composeae.serve.app import alias_version, load_version
    from composeae.serve.index import build_version_index

    url = f"{s3_bucket}/registry"
    cfg = load_config(str(ROOT / "jobs/configs/tiny.yaml"),
                      [f"data.url={css_tiny}", f"nightly.registry={url}"])
    registry = ModelRegistry.create(url)
    # What the alias is about to point at, seen at the moment it moves.
    index_at_promotion = []
    promote = registry.promote
    registry.promote = lambda number, **kw: (
        index_at_promotion.append(read_manifest(registry_index_url(url, number))),
        promote(number, **kw))[1]

    v1, _ = registry.register(random_checkpoint(css_tiny, tmp_path / "a"), run_name="nightly-a",
                              record=_night_record("2026-12-01", champion=None))
    first = _finish(registry, cfg, "2026-12-01", v1, created=True)
    assert first.status == "promoted" and registry.aliases().aliases == {"champion": 1}
    assert index_at_promotion[0] is not None and index_at_promotion[0]["model"]["version"] == 1
    built = read_manifest(registry_index_url(url, 1))
    assert built["count"] == 240 and built["model"]["checkpoint"].startswith(v1["checkpoint"])

    # The same night again: nothing moves, nothing is rebuilt.
    again = _finish(registry, cfg, "2026-12-01", v1, created=False)
    assert again.status == "done" and len(index_at_promotion) == 1
    assert read_manifest(registry_index_url(url, 1)) == built

    # A night killed after its index and before the promotion: the re-run finds the index
    # built and only moves the alias.
    v2, _ = registry.register(random_checkpoint(css_tiny, tmp_path / "b", seed=1),
                              run_name="nightly-b",
                              record=_night_record("2026-12-02", champion=1))
    assert build_version_index(url, 2, css_tiny, "test").built
    second_index = read_manifest(registry_index_url(url, 2))
    second = _finish(registry, cfg, "2026-12-02", v2, created=True)
    assert second.status == "promoted" and registry.aliases().aliases == {"champion": 2}
    assert index_at_promotion[1] == second_index == read_manifest(registry_index_url(url, 2))
    assert not build_version_index(url, 2, css_tiny, "test").built

    # A rollback: the alias, and what the service loads for it, back at version 1's index.
    registry.rollback(reason="test: bad night")
    searcher = load_version(url, alias_version(url, "champion"))
    assert searcher.version == 1 and searcher.index.manifest == built
