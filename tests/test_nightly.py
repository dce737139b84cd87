"""Nightly retraining end to end on local Ray: tiny CSS-synth growing by a day's slice each night,
challengers trained on Ray Train, the model registry in the moto S3 bucket.

One sequence of nights (each trains for real, so they share one test): the first night promotes,
re-running it changes nothing, a night without new data is a no-op, a night whose challenger
cannot meet the margin is registered but not promoted, one that meets it is promoted, and a
rollback restores the previous champion.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from composeae.config import load_config, replace
from composeae import storage
from composeae.data.revisions import append_synth_day, fingerprint
from composeae.data.shardset import read_manifest
from composeae.registry.store import ModelRegistry

ROOT = Path(__file__).resolve().parents[1]
NIGHTLY_TINY = ROOT / "jobs" / "configs" / "nightly-tiny.yaml"


def test_nights_promote_keep_skip_and_roll_back(ray_local, s3_bucket, tmp_path):
    from composeae.nightly.flow import run_night

    registry_url = f"{s3_bucket}/registry"
    cfg = load_config(NIGHTLY_TINY, [f"data.url={tmp_path / 'shards'}",
                                     f"train.storage={tmp_path / 'runs'}",
                                     f"nightly.registry={registry_url}"])

    first = run_night(cfg, "2026-11-27")
    assert first.status == "promoted" and first.version["version"] == 1
    assert "no champion yet" in first.reason
    registry = ModelRegistry.open(registry_url)
    assert registry.aliases().aliases == {"champion": 1}
    v1 = registry.version(1)
    assert v1["run_name"] == "nightly-2026-11-27" and v1["parent"] is None
    assert v1["data"]["fingerprint"] == fingerprint(read_manifest(str(tmp_path / "shards")))
    assert v1["config"]["train"]["name"] == "nightly-2026-11-27"
    assert set(v1["evaluation"]["table"]) == {"test/R@1", "test/R@5", "test/R@10"}
    assert "model.pt" in storage.listdir(v1["checkpoint"])  # a copy inside the registry
    assert v1["checkpoint"].startswith(registry_url)
    first_report = storage.read_text(f"{registry_url}/reports/2026-11-27.json")
    assert json.loads(first_report)["in_service"]["version"] == 1

    # Re-running a finished date changes nothing.
    again = run_night(cfg, "2026-11-27")
    assert again.status == "done" and again.version == v1
    assert registry.versions() == [1] and len(registry.history()) == 1
    assert storage.read_text(f"{registry_url}/reports/2026-11-27.json") == first_report

    # No new data since version 1: a clean no-op, nothing trained.
    quiet = run_night(replace(cfg, nightly={"new_data": "none"}), "2026-11-28")
    assert quiet.status == "no-op" and "nothing new since version 1" in quiet.reason
    assert not (tmp_path / "runs" / "nightly-2026-11-28").exists()
    assert registry.versions() == [1]

    # New data, a margin no challenger can meet: registered, not promoted, warm-started.
    kept = run_night(replace(cfg, nightly={"margin_points": 100.0}), "2026-11-28")
    assert kept.status == "kept" and kept.reason.endswith("not promoted")
    v2 = registry.version(2)
    assert v2["parent"] == 1 and v2["decision"]["champion"] == 1
    assert v2["decision"]["champion_table"] is not None
    assert v2["data"]["fingerprint"] != v1["data"]["fingerprint"]
    assert read_manifest(str(tmp_path / "shards"))["params"]["days"] == ["2026-11-27",
                                                                         "2026-11-28"]
    assert registry.aliases().aliases == {"champion": 1}
    assert set(kept.tables) == {"champion", "challenger"}

    # A margin any challenger meets: promoted.
    promoted = run_night(replace(cfg, nightly={"margin_points": -100.0}), "2026-11-29")
    assert promoted.status == "promoted" and promoted.version["version"] == 3
    assert registry.aliases().aliases == {"champion": 3}
    report = json.loads(storage.read_text(f"{registry_url}/reports/2026-11-29.json"))
    assert report["in_service"] == {"version": 3,
                                    "value": promoted.tables["challenger"]["test/R@1"]}
    page = storage.read_text(f"{registry_url}/reports/latest.html")
    assert "Nightly 2026-11-29" in page and page.count("<img") == 2

    # Rollback restores the previous champion.
    assert registry.rollback(reason="bad night")["version"] == 1
    assert registry.aliases().aliases == {"champion": 1}
    assert [e["action"] for e in registry.history()] == ["promote", "promote", "rollback"]


def test_a_day_slice_appends_training_data_once(tmp_path):
    from composeae.data.commands import verify
    from composeae.data.synth import generate

    url = str(tmp_path / "css")
    generate(url, preset="tiny", seed=0, image_size=32)
    before = read_manifest(url)
    assert append_synth_day(url, "2026-11-29", sources=4) == 12  # 3 queries per source
    after = read_manifest(url)
    assert append_synth_day(url, "2026-11-29", sources=4) == 0
    assert read_manifest(url) == after
    train = after["splits"]["train"]
    assert train[next(iter(train))]["count"] == before["splits"]["train"][
        next(iter(before["splits"]["train"]))]["count"] + 12
    assert {k: v for k, v in after["splits"].items() if k != "train"} == \
        {k: v for k, v in before["splits"].items() if k != "train"}  # evaluation frozen
    assert fingerprint(after) != fingerprint(before)
    problems, _ = verify(url)
    assert problems == []
    with pytest.raises(Exception, match="YYYY-MM-DD"):
        append_synth_day(url, "29/11/2026", sources=4)
