"""A night killed mid-training and run again resumes its Ray Train run and registers once.

`composeae nightly` runs as its user runs it (its own embedded Ray, in a subprocess); the first
one is killed, with its whole process group and Ray, once the challenger has checkpointed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from composeae.testing.localcluster import kill_processes_naming
from composeae.registry.store import ModelRegistry

ROOT = Path(__file__).resolve().parents[1]
NIGHTLY_TINY = ROOT / "jobs" / "configs" / "nightly-tiny.yaml"
NIGHT = "2026-11-30"


def _nightly(tmp_path: Path, ray_tmp: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}  # marks this driver's Ray for the cleanup
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(
        [sys.executable, str(ROOT / "jobs" / "nightly.py"), "--config", str(NIGHTLY_TINY),
         "--date", NIGHT, "--set", f"data.url={tmp_path / 'shards'}",
         "--set", f"train.storage={tmp_path / 'runs'}",
         "--set", f"nightly.registry={tmp_path / 'registry'}",
         "--set", "train.steps=12", "--set", "train.eval_every=3"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)


def test_a_night_killed_mid_training_resumes_and_registers_once(tmp_path):
    run = tmp_path / "runs" / f"nightly-{NIGHT}"
    ray_tmp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: it holds unix sockets
    try:
        first = _nightly(tmp_path, ray_tmp)
        deadline = time.monotonic() + 420
        while not (run / "step-00000003").is_dir() and first.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.5)
        assert (run / "step-00000003").is_dir(), "the challenger never checkpointed"
        assert first.poll() is None, "the night ended before it could be killed"
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        kill_processes_naming(ray_tmp)
        assert not (tmp_path / "registry" / "versions").exists()

        second = _nightly(tmp_path, ray_tmp)
        out, _ = second.communicate(timeout=600)
        assert second.returncode == 0, out[-4000:]
        kill_processes_naming(ray_tmp)
        third = _nightly(tmp_path, ray_tmp)
        again, _ = third.communicate(timeout=600)
        assert third.returncode == 0, again[-4000:]
    finally:
        kill_processes_naming(ray_tmp)

    assert "resumed at step" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 12 and metrics["resumes"] >= 1
    registry = ModelRegistry.open(str(tmp_path / "registry"))
    assert registry.versions() == [1] and registry.aliases().aliases == {"champion": 1}
    # The console's last lines are the product's: the decision, the version, the report.
    last = out.strip().splitlines()[-3:]
    assert last[0].startswith("promoted: no champion yet")
    assert last[1] == f"version: 1 ({tmp_path / 'registry' / 'checkpoints' / run.name})"
    assert last[2] == f"report: {tmp_path / 'registry' / 'reports' / NIGHT}.html"
    # Run again once finished: nothing changes, and it says so.
    assert again.strip().splitlines()[-3].startswith(f"done: night {NIGHT} is already version 1")
    assert registry.versions() == [1] and len(registry.history()) == 1
