"""`ray job submit` against a real head started with `ray start --head` from the venv."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import torch

from composeae.localcluster import LocalHead

ROOT = Path(__file__).resolve().parents[1]


def test_ray_job_submit_trains_and_writes_the_run(tmp_path):
    runs, shards = tmp_path / "runs", tmp_path / "shards" / "css-tiny"
    job_id = f"composeae-test-{uuid.uuid4().hex[:8]}"
    with LocalHead(num_cpus=2) as head:
        head.submit(["python", "jobs/train.py", "--config", "jobs/configs/tiny.yaml",
                     "--set", f"train.storage={runs}", "--set", f"data.url={shards}",
                     "--set", "train.name=job-test"], working_dir=str(ROOT), submission_id=job_id)
        state = head.wait(job_id, timeout=600)
        logs = head.logs(job_id)
    assert state == "SUCCEEDED", logs[-3000:]
    assert "test recall of composeae" in logs
    metrics = json.loads((runs / "job-test" / "metrics.json").read_text())
    assert metrics["step"] == 6 and 0.0 <= metrics["test/R@1"] <= 1.0
    checkpoint = torch.load(runs / "job-test" / "final" / "model.pt", weights_only=True)
    assert checkpoint["model_name"] == "composeae"
    assert checkpoint["train_state"]["step"] == 6
