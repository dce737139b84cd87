"""`ray job submit` against a real head started with `ray start --head` from the venv."""

from __future__ import annotations

import json
import time
import urllib.error
import uuid
from pathlib import Path

import torch
import yaml

from composeae.testing.localcluster import LocalHead

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_ENV = ROOT / "cluster" / "runtime_env.yaml"
TRAIN_RUNS_API = "/api/train/v2/runs/v1"
"""The dashboard's Train V2 runs (Ray 2.60, dashboard/modules/train/train_head.py); the older
/api/train/v2/runs answers for Train V1 runs only."""
TERMINAL = {"FINISHED", "ERRORED", "ABORTED"}


def _train_runs(head: LocalHead, name: str, timeout: float = 60.0) -> list[dict]:
    """The dashboard's Train runs named `name`; polled, since the state actor records a run's
    last transitions asynchronously."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            listed = head.get_json(TRAIN_RUNS_API)["train_runs"]
        except urllib.error.HTTPError as exc:  # 500: no Train state actor, so nothing tracked
            raise AssertionError(f"{TRAIN_RUNS_API}: {exc.code} {exc.read().decode()}") from exc
        runs = [r for r in listed if r["name"] == name]
        if (runs and all(r["status"] in TERMINAL for r in runs)) or time.monotonic() > deadline:
            return runs
        time.sleep(1.0)


def test_ray_job_submit_trains_and_writes_the_run(tmp_path):
    """The tiny run, submitted the way a user submits to a cluster (cluster/runtime_env.yaml and
    the checkout as working dir), trains, writes its run, and is listed on the dashboard's Train
    page, which needs the runtime env's RAY_TRAIN_ENABLE_STATE_TRACKING=1."""
    runs, shards = tmp_path / "runs", tmp_path / "shards" / "css-tiny"
    job_id = f"composeae-test-{uuid.uuid4().hex[:8]}"
    with LocalHead(num_cpus=2) as head:
        head.submit(["python", "jobs/train.py", "--config", "jobs/configs/tiny.yaml",
                     "--set", f"train.storage={runs}", "--set", f"data.url={shards}",
                     "--set", "train.name=job-test"], working_dir=str(ROOT), submission_id=job_id,
                    runtime_env=RUNTIME_ENV)
        state = head.wait(job_id, timeout=600)
        logs = head.logs(job_id)
        job_env = (head.job_info(job_id).runtime_env or {}).get("env_vars", {})
        train_runs = _train_runs(head, "job-test") if state == "SUCCEEDED" else []
    assert state == "SUCCEEDED", logs[-3000:]
    assert "test recall of composeae" in logs
    # The console a person reads: the worker's progress and validation tables, none of Ray's
    # per-report lines, and the recall table with the run's URLs as the last lines.
    assert "validation at step 3" in logs and "step 6/6" in logs
    assert "Reporting training result" not in logs
    tail = logs.strip().splitlines()[-5:]
    assert tail[0].startswith("test recall of composeae")
    assert tail[-2:] == [f"run: {runs / 'job-test'}", f"checkpoint: {runs / 'job-test' / 'final'}"]
    metrics = json.loads((runs / "job-test" / "metrics.json").read_text())
    assert metrics["step"] == 6 and 0.0 <= metrics["test/R@1"] <= 1.0
    checkpoint = torch.load(runs / "job-test" / "final" / "model.pt", weights_only=True)
    assert checkpoint["model_name"] == "composeae"
    assert checkpoint["train_state"]["step"] == 6

    # The job got the runtime env file's variables, as a user's job does.
    assert job_env == yaml.safe_load(RUNTIME_ENV.read_text())["env_vars"]
    assert job_env["RAY_TRAIN_ENABLE_STATE_TRACKING"] == "1"
    # ... and so the dashboard's Train page lists the run, as this job's one finished run.
    (run,) = train_runs
    assert run["status"] == "FINISHED", run["status"]
    assert run["job_details"]["submission_id"] == job_id
    assert run["run_settings"]["run_config"]["name"] == "job-test"
    assert run["attempts"] and run["attempts"][-1]["status"] == "FINISHED"
