"""Ray Train end to end: 2 gloo workers on tiny CSS-synth, local and S3, faults, resume.

One local Ray instance serves the module (started after the S3 server so its workers inherit the
server's endpoint and credentials).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from composeae.config import load_config, replace
from composeae.data import storage

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "jobs" / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def ray_local(s3_server):
    import ray

    ray.init(address="local", num_cpus=3)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    from composeae.data.synth import generate

    url = str(tmp_path_factory.mktemp("shards") / "css-tiny")
    generate(url, preset="tiny", seed=0, image_size=32)
    return url


def tiny(tmp_path: Path, shards: str, **sections):
    cfg = load_config(TINY, [f"data.url={shards}", f"train.storage={tmp_path / 'runs'}"])
    return replace(cfg, **sections) if sections else cfg


def untrained_recall(cfg) -> dict[str, float]:
    from composeae.data.stream import load_corpus
    from composeae.evaluate import evaluate
    from composeae.models.text import build_tokenizer
    from composeae.registry import create_model

    torch.manual_seed(cfg.train.seed)  # the same initial weights the workers start from
    model = create_model(cfg.model, cfg.loss, build_tokenizer("lstm", load_corpus(cfg.data)))
    return evaluate(model, cfg.data, "test", cfg.eval, rank=0, world_size=1,
                    device=torch.device("cpu"))


def test_two_workers_improve_recall_and_write_the_run(ray_local, tiny_shards, tmp_path):
    from composeae.train import run_training

    cfg = tiny(tmp_path, tiny_shards, train={"steps": 40, "eval_every": 20, "log_every": 10})
    before = untrained_recall(cfg)
    metrics = run_training(cfg)
    after = {k.removeprefix("test/"): v for k, v in metrics.items() if k.startswith("test/")}
    assert sum(after.values()) > sum(before.values()), (before, after)
    assert metrics["step"] == 40
    assert metrics["samples_seen"] == 40 * cfg.train.batch_size * cfg.ray.num_workers

    run = tmp_path / "runs" / "tiny"
    assert json.loads((run / "metrics.json").read_text())["test/R@1"] == metrics["test/R@1"]
    assert (run / "config.yaml").is_file()
    report = (run / "report.html").read_text()
    assert "data:image/png;base64" in report and "test/R@1" in report
    assert list((run / "tensorboard").glob("events.out.tfevents*"))
    assert (run / "final" / "model.pt").is_file()

    # `composeae eval` on the final checkpoint reproduces the run's test table.
    from composeae.evaluate import run_evaluation

    table = run_evaluation(str(run / "final"), cfg.data.url, split="test",
                           out=str(tmp_path / "eval.json"))
    assert table == pytest.approx({k: v for k, v in metrics.items() if k.startswith("test/")})
    assert json.loads((tmp_path / "eval.json").read_text()) == table


def test_shards_and_checkpoints_in_s3(ray_local, tiny_shards, s3_bucket, tmp_path):
    from composeae.checkpoint import load_checkpoint, model_from_checkpoint
    from composeae.data.synth import generate
    from composeae.train import run_training

    shards = f"{s3_bucket}/shards/css-tiny"
    generate(shards, preset="tiny", seed=0, image_size=32)
    cfg = tiny(tmp_path, shards, train={"storage": f"{s3_bucket}/runs", "steps": 4,
                                        "eval_every": 2})
    metrics = run_training(cfg)
    run = f"{s3_bucket}/runs/tiny"
    assert json.loads(storage.read_text(f"{run}/metrics.json"))["step"] == 4
    names = storage.listdir(run)
    assert "final" in names and "report.html" in names
    model, restored = model_from_checkpoint(load_checkpoint(f"{run}/final"))
    assert restored.data.url == shards and model.registered_name == "composeae"
    assert metrics["checkpoint"].startswith(run.removeprefix("s3://"))


def test_killed_worker_is_survived(ray_local, tiny_shards, tmp_path, monkeypatch):
    from composeae.train import FAULT_ENV, run_training

    monkeypatch.setenv(FAULT_ENV, "5:1")  # rank 1 dies once at step 5, after the step-3 checkpoint
    cfg = tiny(tmp_path, tiny_shards, train={"steps": 8, "eval_every": 3})
    metrics = run_training(cfg)
    assert metrics["resumes"] == 1
    assert metrics["step"] == 8
    assert metrics["samples_seen"] == 8 * cfg.train.batch_size * cfg.ray.num_workers
    history = torch.load(tmp_path / "runs" / "tiny" / "final" / "model.pt",
                         weights_only=True)["train_state"]["history"]
    # Validation happened at the planned steps, once each, despite the restart; and training
    # steps 4-5 were redone from the step-3 checkpoint, not skipped.
    assert [h["step"] for h in history if "val/R@1" in h] == [3, 6, 8]
    assert [h["step"] for h in history if "loss" in h] == [2, 4, 6, 8]


def test_resubmitting_a_finished_run_resumes(ray_local, tiny_shards, tmp_path):
    from composeae.train import run_training

    cfg = tiny(tmp_path, tiny_shards, train={"steps": 4, "eval_every": 2})
    first = run_training(cfg)
    final = tmp_path / "runs" / "tiny" / "final" / "model.pt"
    history = torch.load(final, weights_only=True)["train_state"]["history"]
    second = run_training(cfg)
    assert (first["resumes"], second["resumes"]) == (0, 1)
    assert second["step"] == first["step"] == 4
    # No training step was repeated: the history is the first run's.
    assert torch.load(final, weights_only=True)["train_state"]["history"] == history
    assert second["test/R@1"] == pytest.approx(first["test/R@1"])


def test_bad_config_fails_before_any_worker(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "composeae.cli", "train", "--config", str(TINY),
         "--set", "model.name=nonexistent"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        proc.stderr.strip()] and "model.name" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_missing_dataset_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "composeae.cli", "train", "--config", str(TINY),
         "--set", f"data.url={tmp_path / 'nothing'}", "--set", "data.synth_if_missing=false"],
        capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "no dataset at" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
