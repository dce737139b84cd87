"""Ray Train end to end: 2 gloo workers on tiny CSS-synth, local and S3, faults, resume.

One local Ray instance (`ray_local` in conftest.py) serves the module.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from composeae.config import load_config, replace
from composeae import storage
from composeae.evaluate import NUM_QUERIES
from composeae.run.layout import RETRIEVALS_FILE

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "jobs" / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    from composeae.data.synth import generate

    url = str(tmp_path_factory.mktemp("shards") / "css-tiny")
    generate(url, preset="tiny", seed=0, image_size=32)
    return url


def tiny(tmp_path: Path, shards: str, **sections):
    cfg = load_config(TINY, [f"data.url={shards}", f"train.storage={tmp_path / 'runs'}"])
    return replace(cfg, **sections) if sections else cfg


def retrieval_rows(page: str) -> list[tuple[str, list[str]]]:
    """(query id, the classes of its result figures) per query row of a page's retrievals."""
    return [(qid, re.findall(r'<figure class="(result[^"]*)"', row))
            for qid, row in re.findall(r'<div class="query" data-query="([^"]*)">(.*?)</div>',
                                       page, re.S)]


WORKER_PHASES = {"model", "checkpoint", "first_batch", "first_step"}


def untrained_recall(cfg) -> dict[str, float]:
    from composeae.data.shardset import load_corpus
    from composeae.evaluate import evaluate
    from composeae.models.text import build_tokenizer
    from composeae.models.zoo import create_model

    torch.manual_seed(cfg.train.seed)  # the same initial weights the workers start from
    model = create_model(cfg.model, cfg.loss, build_tokenizer("lstm", load_corpus(cfg.data)))
    return evaluate(model, cfg.data, "test", cfg.eval, rank=0, world_size=1,
                    device=torch.device("cpu"))


def test_two_workers_improve_recall_and_write_the_run(ray_local, tiny_shards, tmp_path):
    from composeae.run.driver import run_training

    cfg = tiny(tmp_path, tiny_shards, train={"steps": 40, "eval_every": 20, "log_every": 10})
    before = untrained_recall(cfg)
    summary = run_training(cfg)
    metrics = summary.metrics
    after = {k.removeprefix("test/"): v for k, v in summary.test.items()}
    assert sum(after.values()) > sum(before.values()), (before, after)
    assert metrics["step"] == 40
    assert metrics["samples_seen"] == 40 * cfg.train.batch_size * cfg.ray.num_workers

    run = tmp_path / "runs" / "tiny"
    written = json.loads((run / "metrics.json").read_text())
    assert written["test/R@1"] == metrics["test/R@1"]
    # Where the start-up went: Ray's part and each of the worker's, in seconds, summing to the
    # time from building the trainer to the end of the first step.
    startup = written["startup_s"]
    assert set(startup) in ({"ray", *WORKER_PHASES}, {"ray_workers", "worker_init",
                                                      *WORKER_PHASES})
    assert all(v >= 0 for v in startup.values()) and 1 < sum(startup.values()) < 300
    # The checkpoint is named by an absolute path that `composeae eval` takes as it is.
    assert written["checkpoint"] == summary.checkpoint_url == str(run / "final")
    assert (run / "config.yaml").is_file()
    report = (run / "report.html").read_text()
    assert "data:image/png;base64" in report and "test/R@1" in report
    # What the best weights retrieve: the fixed test queries, 5 images each, exactly the correct
    # ones (by the final checkpoint's record) outlined.
    record = json.loads((run / "final" / RETRIEVALS_FILE).read_text())
    assert record["split"] == "test" and len(record["queries"]) == NUM_QUERIES
    rows = retrieval_rows(report)
    assert [qid for qid, _ in rows] == [q["query_id"] for q in record["queries"]]
    assert [kinds for _, kinds in rows] == [
        ["result hit" if t["hit"] else "result" for t in q["top"]] for q in record["queries"]]
    assert all(len(kinds) == 5 for _, kinds in rows)
    assert "could not be read" not in report
    assert list((run / "tensorboard").glob("events.out.tfevents*"))
    assert (run / "final" / "model.pt").is_file()
    # The history comes from the final checkpoint's small history file, in step order.
    assert [h["step"] for h in summary.history if "val/R@1" in h] == [20, 40]

    # `composeae eval` on the final checkpoint reproduces the run's test table, with the table
    # handed back through Ray (no file on the driver's disk).
    proc = subprocess.run(
        [sys.executable, "-m", "composeae.cli", "eval", "--checkpoint", written["checkpoint"],
         "--data", cfg.data.url, "--out", str(tmp_path / "eval.json"),
         "--report", str(tmp_path / "eval.html")],
        capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.loads((tmp_path / "eval.json").read_text())
    assert table == pytest.approx(summary.test)
    # `--report`: the same recall table and the same pictures as the run report.
    page = (tmp_path / "eval.html").read_text()
    assert "test/R@1" in page and retrieval_rows(page) == rows
    # The table and the checkpoint are the last lines the user sees.
    last = proc.stdout.strip().splitlines()[-4:]
    assert last[0].startswith("recall on") and last[-1] == f"checkpoint: {written['checkpoint']}"
    assert "Reporting training result" not in proc.stdout + proc.stderr


def test_shards_and_checkpoints_in_s3(ray_local, tiny_shards, s3_bucket, tmp_path):
    from composeae.checkpoint import load_checkpoint
    from composeae.run.build import model_from_checkpoint
    from composeae.data.synth import generate
    from composeae.run.driver import run_training
    from composeae.run.eval_job import evaluate_checkpoint

    shards = f"{s3_bucket}/shards/css-tiny"
    generate(shards, preset="tiny", seed=0, image_size=32)
    cfg = tiny(tmp_path, shards, train={"storage": f"{s3_bucket}/runs", "steps": 4,
                                        "eval_every": 2})
    summary = run_training(cfg)
    run = f"{s3_bucket}/runs/tiny"
    written = json.loads(storage.read_text(f"{run}/metrics.json"))
    assert written["step"] == 4
    names = storage.listdir(run)
    assert "final" in names and "report.html" in names
    # The report's retrieval images were read back from the shards in the bucket.
    report = storage.read_text(f"{run}/report.html")
    assert len(retrieval_rows(report)) == NUM_QUERIES and "could not be read" not in report
    # TensorBoard events are written under the run URL in the bucket.
    assert any(n.startswith("events.out.tfevents") for n in storage.listdir(f"{run}/tensorboard"))
    # metrics.json names the checkpoint as an s3:// URL that evaluation accepts as it is.
    assert written["checkpoint"] == f"{run}/final" == summary.checkpoint_url
    model, restored = model_from_checkpoint(load_checkpoint(written["checkpoint"]))
    assert restored.data.url == shards and model.registered_name == "composeae"
    table = evaluate_checkpoint(written["checkpoint"], shards, split="test", num_workers=1)
    assert table == pytest.approx(summary.test)


def test_killed_worker_is_survived(ray_local, tiny_shards, tmp_path, monkeypatch):
    from composeae.run.driver import FAULT_ENV, run_training

    monkeypatch.setenv(FAULT_ENV, "5:1")  # rank 1 dies once at step 5, after the step-3 checkpoint
    cfg = tiny(tmp_path, tiny_shards, train={"steps": 8, "eval_every": 3})
    summary = run_training(cfg)
    metrics = summary.metrics
    assert metrics["resumes"] == 1
    assert metrics["step"] == 8
    assert metrics["samples_seen"] == 8 * cfg.train.batch_size * cfg.ray.num_workers
    # Validation happened at the planned steps, once each, despite the restart; and training
    # steps 4-5 were redone from the step-3 checkpoint, not skipped.
    assert [h["step"] for h in summary.history if "val/R@1" in h] == [3, 6, 8]
    assert [h["step"] for h in summary.history if "loss" in h] == [2, 4, 6, 8]

    # A resume changes nothing: the same run never interrupted ends with the same weights (the
    # model has dropout, so every rank's random state must have been restored) and metrics.
    monkeypatch.delenv(FAULT_ENV)
    clean = run_training(tiny(tmp_path / "clean", tiny_shards, train={"steps": 8,
                                                                     "eval_every": 3}))
    assert clean.metrics["resumes"] == 0
    recall = {k: v for k, v in clean.metrics.items() if k.startswith(("val/", "test/"))}
    assert recall and {k: metrics[k] for k in recall} == recall
    val = [{k: v for k, v in h.items() if k.startswith("val/")} for h in clean.history]
    assert val == [{k: v for k, v in h.items() if k.startswith("val/")} for h in summary.history]
    # Loss windows after the resume point (steps 5-6 and 7-8) saw the same batches and draws.
    losses = {h["step"]: h["loss"] for h in clean.history if "loss" in h}
    assert [losses[6], losses[8]] == [h["loss"] for h in summary.history
                                      if h.get("step") in (6, 8) and "loss" in h]
    weights = [torch.load(Path(s.checkpoint_url) / "model.pt", weights_only=True)["model"]
               for s in (summary, clean)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[1])


def test_resubmitting_a_finished_run_five_times_keeps_it(ray_local, tiny_shards, tmp_path):
    """The drill: one run submitted five times with num_to_keep 1 succeeds every time with the
    same metrics, and its final checkpoint loads every time. The same config again is answered
    by the driver without starting workers; a changed one (here its log interval) reaches the
    workers, which restore the final checkpoint and report it again without training. A driver
    killed after the report but before `metrics.json` (written last) leaves a run that the
    next submission finishes again through the workers."""
    from composeae.checkpoint import load_checkpoint
    from composeae.config import replace
    from composeae.run.build import model_from_checkpoint
    from composeae.run.driver import run_training

    cfg = tiny(tmp_path, tiny_shards, train={"steps": 4, "eval_every": 2},
               ray={"num_to_keep": 1})
    summaries = [run_training(cfg) for _ in range(4)]
    summaries.append(run_training(replace(cfg, train={"log_every": 1})))
    run = tmp_path / "runs" / "tiny"
    (run / "metrics.json").unlink()  # what a driver killed within `finish_run` can leave
    summaries.append(run_training(cfg))
    first = summaries[0]
    assert [s.already_finished for s in summaries] == [False, True, True, True, False, False]
    assert (run / "report.html").is_file()
    for again in summaries[1:]:
        assert again.metrics == first.metrics
        assert again.history == first.history  # no step was trained again
        model, _ = model_from_checkpoint(load_checkpoint(again.checkpoint_url))
        assert model.registered_name == "composeae"
    assert first.metrics["resumes"] == 0
    assert json.loads((run / "metrics.json").read_text()) == first.metrics
    assert (run / "final" / "model.pt").is_file()


def test_a_local_path_missing_on_a_node_is_one_line(ray_local, tmp_path):
    from composeae.run.cluster import check_local_paths_on_nodes
    from composeae.errors import UserError

    check_local_paths_on_nodes({"--data": str(tmp_path)})  # present on the only node
    with pytest.raises(UserError) as err:
        check_local_paths_on_nodes({"--checkpoint": str(tmp_path / "nowhere")})
    message = str(err.value)
    assert message.startswith("--checkpoint:") and "does not exist on node" in message
    assert "\n" not in message


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


def test_gpus_the_cluster_lacks_are_one_line_before_any_worker(ray_local, tiny_shards, tmp_path):
    """An embedded Ray never gains resources: asking for GPUs it lacks fails at once, naming
    what was asked and what the cluster has (`run_training` checks this before any worker
    starts and before the run writes anything)."""
    from composeae.errors import UserError
    from composeae.run.cluster import wait_for_resources

    cfg = tiny(tmp_path, tiny_shards, ray={"use_gpu": True})
    with pytest.raises(UserError) as err:
        wait_for_resources(cfg)
    assert str(err.value) == ("2 worker(s) (ray.num_workers, ray.cpus_per_worker, ray.use_gpu) "
                              "need 1 CPUs and 2 GPUs; the cluster has 0 GPUs")
    wait_for_resources(tiny(tmp_path, tiny_shards))  # CPUs it has: no wait, no error


def test_a_process_knows_when_it_started():
    """The start-up split between Ray and the worker rests on reading a process's start time."""
    import subprocess
    import sys
    import time

    before = time.time()
    out = subprocess.run([sys.executable, "-c", "import time; t = time.time()\n"
                          "from composeae.run.worker import _process_started_at\n"
                          "print(t, _process_started_at())"],
                         capture_output=True, text=True, check=True).stdout
    entered, started = map(float, out.split())
    # Clock ticks are 10 ms: the start lies between the parent's launch and the child's first line.
    assert before - 0.02 <= started <= entered + 0.02
