"""The GPU suite's smoke mode: every phase of `bench/gpu_suite.py` runs on CPU with tiny sizes,
so the script that a GPU machine gets for a few minutes cannot rot between those minutes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_runs_every_phase(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run([sys.executable, "bench/gpu_suite.py", "--smoke", "--out", str(out),
                           "--work", str(work), "--budget-s", "560"],
                          cwd=ROOT, capture_output=True, text=True, timeout=700)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last == json.loads((out / "summary.json").read_text())
    assert last["failed"] == [] and last["smoke"] is True
    assert (work / "css-synth-tiny" / "manifest.json").exists()
    assert last["model_step"]["composeae_samples_per_s"] > 0
    assert last["model_step"]["composeae_previous_samples_per_s"] > 0
    # The host's share: aten calls of the eager step at both batch sizes, flat in the batch.
    calls = last["aten_calls_per_step"]
    assert set(calls) == {"composeae", "tirg"} and set(calls["composeae"]) == {"32", "128"}
    assert calls["composeae"]["128"] <= 3000
    assert calls["composeae"]["128"] <= 1.05 * calls["composeae"]["32"]
    e2e, second = last["end_to_end"]  # eager, then the "compiled" mode (none in the smoke)
    assert e2e["loader_workers"] == 1 and e2e["samples_per_s"] > 0 and e2e["startup_s"] > 0
    assert e2e["startup_phases_s"]["first_step"] > 0 and second["samples_per_s"] > 0
    # The sweep ran packed (on CPU the "GPU" share is the worker's CPUs: 1/4), both trials at once.
    (packed,) = last["sweep"].values()
    assert packed["finished"] and packed["at_once"] == "2"
    assert "each reserves 0.5 CPU" in packed["placement"]
    # Both quality runs trained the same steps and were evaluated at each quarter and at the end.
    steps = last["quality_steps"]
    for model in ("composeae", "concat"):
        row = last["quality"][model]
        assert row["steps"] == steps
        assert sorted(int(s) for s in row["val_R@1"]) == [steps // 4 * i for i in (1, 2, 3, 4)]
        assert 0 <= row["test_R@1"] <= 100
    summary = (out / "summary.md").read_text()
    assert "| concat |" in summary and "every phase finished" in summary
    assert "== quality-composeae" in (out / "suite.log").read_text()


def test_bad_phase_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "bench/gpu_suite.py", "--out", str(tmp_path),
                           "--phases", "e2e,warp"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith("--phases takes a subset of "
                                                         "host,bench_gpu,e2e,ddp,sweep,quality")
