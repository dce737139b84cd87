"""`bench/bench_catalogue.py --quick` end to end on the tiny dataset: the sharded, service,
approximate and batching parts run at small sizes and the last JSON line carries the keys the catalogue
figures are read from, so the benchmark behind BENCHMARKS.md cannot rot unseen. (The synthetic
part runs the same `curve` as the approximate one on generated rows.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_catalogue_bench_reports_every_bar_key(css_tiny, tmp_path):
    proc = subprocess.run(
        [sys.executable, "bench/bench_catalogue.py", "--quick", "--data", css_tiny,
         "--work", str(tmp_path), "--parts", "sharded,service,ann,batching", "--clients", "4"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    last = json.loads(out.strip().splitlines()[-1])
    # Sharded exact search: two shard actors, their answer equal to one process's.
    assert last["n"] == 200_000 and last["shards"] == 2
    assert last["sharded_top10_equal"] is True and 0 < last["shard_max_gb"] < 4
    # The same rows behind the HTTP service (two shard actors): every request answered, a top 10
    # of distinct ids best first without the reference.
    assert last["service_failed"] == 0 and last["service_rps"] > 0
    assert last["service_answer_ok"] is True and 0 < last["service_shard_max_gb"] < 4
    # Approximate search on the tiny gallery, against exact search in the same rounds.
    assert last["ann_speedup"] > 0 and abs(last["ann_r1_delta"]) <= 100
    assert last["exact_r1"] >= 0 and last["gallery"] > 0
    # The service one by one and batched, side by side: every request answered.
    assert set(last["batching_speedup"]) == {"4"} and last["batching_speedup"]["4"] > 0
    assert last["batching_failed"] == 0
    for heading in ("sharded exact search", "the service over the same", "approximate search",
                    "chosen:",
                    "batches formed", "CPU ms per answered request"):
        assert heading in out, heading
