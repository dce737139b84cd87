"""Ray Tune end to end on real local Ray: the tiny sweep (4 trials, ASHA, two model families, a
shared key and two loss weights only ComposeAE has, fractional CPUs), with its storage in the moto S3 server; its best trial
trained again from `best.yaml`; HParams in the TensorBoard event files; one-line errors.

The sweep runs once for the module (about a minute and a half on 2 cores).
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from composeae import storage

ROOT = Path(__file__).resolve().parents[1]
TINY_SWEEP = ROOT / "jobs" / "configs" / "sweeps" / "tiny.yaml"


@pytest.fixture(scope="module")
def swept(ray_local, s3_server, tmp_path_factory):
    """The tiny sweep with its storage (Tune's experiment, the trials' Train runs, the page) in
    an S3 bucket, the shards on local disk."""
    import uuid

    import boto3

    from composeae.sweep.load import load_sweep
    from composeae.sweep.driver import run_sweep

    bucket = f"sweep-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    shards = tmp_path_factory.mktemp("shards") / "css-tiny"
    sweep = load_sweep(TINY_SWEEP, [f"storage=s3://{bucket}/sweeps", f"data.url={shards}"])
    return sweep, run_sweep(sweep)


def test_asha_sweep_over_two_families_finishes_and_names_its_best(swept):
    from composeae.sweep.load import load_sweep

    sweep, summary = swept
    url = summary.url
    assert url == f"{sweep.storage}/tiny-sweep" and url.startswith("s3://")
    assert summary.trials == 4 and summary.errored == 0
    assert summary.stopped_early >= 1, "ASHA stopped no trial"
    assert summary.finished + summary.stopped_early == 4

    rows = list(csv.DictReader(io.StringIO(storage.read_text(f"{url}/summary.csv"))))
    assert len(rows) == 4
    assert [r["model.name"] for r in rows].count("tirg") == 2
    assert [r["model.name"] for r in rows].count("composeae") == 2
    # ComposeAE's loss weights never reach a TIRG trial: its cells are blank, its a_init is not.
    for r in rows:
        tirg = r["model.name"] == "tirg"
        assert (r["loss.w_sym"] == "" == r["loss.w_img_rec"]) == tirg
        assert r["model.a_init"] in ("1.0", "10.0")
    assert len({(r["model.name"], r["model.a_init"], r["loss.w_sym"]) for r in rows}) == 4
    assert [r["trial_id"] for r in rows if r["is_best"] == "True"] == [summary.best_trial]
    assert sum(r["stopped_early"] == "True" for r in rows) == summary.stopped_early
    # The best trial has the highest validation R@1 any trial reached.
    assert summary.best_val["val/R@1"] == pytest.approx(max(float(r["best val/R@1"])
                                                             for r in rows))
    page = storage.read_text(f"{url}/summary.html")
    assert summary.best_trial in page and page.count("data:image/png;base64") == 3
    assert "http-equiv=\"refresh\"" not in page  # the sweep has ended: no more reloading
    assert summary.best_trial in storage.read_text(f"{url}/summary.md")

    written = json.loads(storage.read_text(f"{url}/best.json"))
    assert written["best_trial"] == summary.best_trial
    assert set(summary.best_params) == set(sweep.keys_for(summary.best_params["model.name"]))
    # The sweep as it started, for a later `composeae tune` to compare its file with.
    assert sweep.absolute().changes_from(storage.read_text(f"{url}/sweep.yaml")) == []
    assert load_sweep(TINY_SWEEP, ["num_samples=3"]).absolute().changes_from(
        storage.read_text(f"{url}/sweep.yaml")) == ["set.data.url", "num_samples", "storage"]
    assert "Budget per model family" in page
    # Ray packed the fractional trials (0.1 CPU + one 0.5-CPU worker each): two ran at once.
    assert "2 trial(s) at once: each reserves 0.6 CPU" in page
    spans = []
    for name in storage.list_files(url):
        if name.count("/") == 1 and name.endswith("/result.json"):  # <trial>/result.json
            results = [json.loads(line)
                       for line in storage.read_text(f"{url}/{name}").splitlines()]
            spans.append((results[0]["timestamp"] - results[0]["time_total_s"],
                          results[-1]["timestamp"]))
    spans.sort()
    assert len(spans) == 4 and any(b[0] < a[1] - 1 for a, b in zip(spans, spans[1:])), spans
    assert set(summary.best_test) == {"test/R@1", "test/R@5", "test/R@10"}
    assert storage.exists(f"{summary.best_checkpoint}/model.pt")


def test_training_best_yaml_reproduces_the_trial(swept, tmp_path):
    from composeae.config import load_config
    from composeae.run.driver import run_training

    sweep, summary = swept
    best_yaml = tmp_path / "best.yaml"
    best_yaml.write_text(storage.read_text(summary.best_yaml))
    assert f"Trial {summary.best_trial}" in best_yaml.read_text().splitlines()[0]
    cfg = load_config(best_yaml, [f"train.storage={tmp_path / 'runs'}"])
    assert cfg.train.name == "tiny-sweep-best"
    for key, value in summary.best_params.items():
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == value
    again = run_training(cfg)
    for key, value in summary.best_val.items():
        assert again.metrics[key] == pytest.approx(value), key


def test_hparams_of_every_trial_are_in_event_files(swept, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    sweep, summary = swept
    hparams_url = f"{summary.url}/hparams"
    trials = storage.listdir(hparams_url)
    assert len(trials) == 4 and summary.best_trial in trials  # stopped trials too
    for trial in trials:
        local = tmp_path / trial
        local.mkdir()
        for name in storage.listdir(f"{hparams_url}/{trial}"):
            (local / name).write_bytes(storage.read_bytes(f"{hparams_url}/{trial}/{name}"))
        events = EventAccumulator(str(local))
        events.Reload()
        content = events.PluginTagToContent("hparams")
        session = plugin_data_pb2.HParamsPluginData.FromString(
            content["_hparams_/session_start_info"])
        params = dict(session.session_start_info.hparams)
        family = params["model.name"].string_value
        assert family in ("composeae", "tirg")
        # Only the keys of the trial's family: a TIRG trial has no loss weight to show.
        assert set(params) == set(sweep.keys_for(family))
        assert "val/R_1" in events.Tags()["scalars"]


def test_the_sweep_folder_shows_each_trial_once_in_hparams(swept, tmp_path):
    """`tensorboard --logdir <sweep>` reads every event file below the sweep: one HParams
    session per trial (the project's), none from Tune's own TensorBoard logger."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, summary = swept
    events = [storage.join(summary.url, name) for name in storage.list_files(summary.url)
              if "tfevents" in name.rsplit("/", 1)[-1]]
    assert events and not any("/_trial_" in u or "ray/tune" in u for u in events)
    sessions = 0
    for i, url in enumerate(events):
        folder = tmp_path / str(i)
        folder.mkdir()
        (folder / url.rsplit("/", 1)[-1]).write_bytes(storage.read_bytes(url))
        accumulator = EventAccumulator(str(folder))
        accumulator.Reload()
        try:
            content = accumulator.PluginTagToContent("hparams")
        except KeyError:  # an event file of curves only
            continue
        sessions += "_hparams_/session_start_info" in content
    assert sessions == 4


def test_search_space_errors_are_one_line_before_ray_starts(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "composeae.cli", "tune", "--config", str(TINY_SWEEP),
         "--set", "search.loss.w_sym={loguniform: [1, 0.1]}", "--set", f"storage={tmp_path}"],
        capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "loss.w_sym" in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing written, no Ray session started here
