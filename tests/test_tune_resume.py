"""A sweep whose driver is killed mid-way resumes with `composeae tune` and finishes without
training its completed trials again (local storage; each `composeae tune` starts its own Ray).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from composeae.testing.localcluster import kill_processes_naming

ROOT = Path(__file__).resolve().parents[1]
TINY_SWEEP = ROOT / "jobs" / "configs" / "sweeps" / "tiny.yaml"


def _tune(tmp_path: Path, ray_tmp: str, *extra: str) -> subprocess.Popen:
    # RAY_TMPDIR marks this driver's Ray processes, so the test can stop all of them afterwards.
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "composeae.cli", "tune", "--config", str(TINY_SWEEP),
         "--set", f"storage={tmp_path / 'runs'}", "--set", f"data.url={tmp_path / 'shards'}",
         *extra],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)


def _finished_runs(sweep: Path) -> dict[str, float]:
    """Trial run name -> mtime of its metrics.json (written once a trial's run finishes)."""
    return {p.parent.name: p.stat().st_mtime for p in (sweep / "runs").glob("*/metrics.json")}


def test_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    sweep = tmp_path / "runs" / "tiny-sweep"
    ray_tmp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: it holds unix sockets
    try:
        first = _tune(tmp_path, ray_tmp)
        deadline = time.monotonic() + 420
        # Interrupt once Tune's saved experiment state records a finished trial (Tune saves it
        # every 10 s or more, so a trial that ends just before a kill is restarted on resume).
        while not _saved_finished(sweep) and first.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(1)
        assert _saved_finished(sweep), "no trial finished in time"
        assert first.poll() is None, "the sweep ended before it could be interrupted"
        os.killpg(first.pid, signal.SIGKILL)  # the driver and everything in its session
        first.wait()
        kill_processes_naming(ray_tmp)
        before = _saved_finished(sweep)
        rows_before = {name: _progress_rows(sweep, name) for name in before}

        second = _tune(tmp_path, ray_tmp)
        out, _ = second.communicate(timeout=600)
        assert second.returncode == 0, out[-4000:]
        after = _finished_runs(sweep)
        rows_after = {name: _progress_rows(sweep, name) for name in after}

        # Once more on the finished sweep, edited: it says the edit does not apply, is
        # restored, trains nothing, names the same best.
        third = _tune(tmp_path, ray_tmp, "--set", "num_samples=3", "--set",
                      "search.model.a_init={choice: [1.0, 3.0]}")
        again, _ = third.communicate(timeout=600)
        assert third.returncode == 0, again[-4000:]
    finally:
        kill_processes_naming(ray_tmp)
    assert "4 trials:" in out and "best trial" in out
    # Trials that had finished were not trained again: their runs were left as they were, and
    # Tune recorded no new result for them.
    for name, mtime in before.items():
        assert after[name] == mtime, name
        assert _progress_rows(sweep, name) == rows_before[name], name
    assert (sweep / "best.yaml").is_file() and (sweep / "summary.html").is_file()
    best = [line for line in out.splitlines() if line.startswith("best trial")]
    assert best and best == [line for line in again.splitlines() if line.startswith("best trial")]
    assert _finished_runs(sweep) == after
    changed = [line for line in again.splitlines() if "has changed since it started" in line]
    assert len(changed) == 1 and "(search.model.a_init, num_samples)" in changed[0], again[-3000:]
    assert "has changed" not in out
    assert {name: _progress_rows(sweep, name) for name in after} == rows_after


def _saved_terminated(sweep: Path) -> set[str]:
    """Trial ids that Tune's last saved experiment state records as TERMINATED."""
    done = set()
    for path in sweep.glob("experiment_state-*.json"):
        try:
            trials = json.loads(path.read_text())["trial_data"]
        except (OSError, ValueError, KeyError):
            continue  # being rewritten
        done |= {t["trial_id"] for t in map(lambda d: json.loads(d[0]), trials)
                 if t.get("status") == "TERMINATED"}
    return done


def _saved_finished(sweep: Path) -> dict[str, float]:
    """Like `_finished_runs`, for the trials whose end Tune's saved state records (trials that
    ASHA stopped are TERMINATED too, but their runs never finish)."""
    done = _saved_terminated(sweep)
    return {name: mtime for name, mtime in _finished_runs(sweep).items()
            if name.removeprefix("tiny-sweep-") in done}


def _progress_rows(sweep: Path, run_name: str) -> int:
    """Rows of Tune's progress.csv for the trial whose Train run is `run_name`."""
    trial_id = run_name.removeprefix("tiny-sweep-")
    (trial_dir,) = [d for d in sweep.iterdir() if d.is_dir() and trial_id in d.name]
    with open(trial_dir / "progress.csv") as f:
        return len(list(csv.DictReader(f)))
