"""ASHA against a full search: the same sweep with and without early stopping, several seeds.

The sweep is `jobs/configs/sweeps/css-synth.yaml` on CSS-synth `small` (ComposeAE and its three
baselines, the same random draws of learning rate, weight decay, embedding size, dropout and loss
weights), shortened to fit a small machine (`--samples`, `--steps`, `--eval-every`, one worker
per trial). For each searcher seed it runs the search twice, side by side in one invocation:
`scheduler: asha` and `scheduler: none`. Same seed, same trials: the two differ only in which
trials ASHA stops.

Rows per seed: trial-seconds (training time summed over trials), wall seconds, trials stopped
early, best validation R@1 (the selection metric) and the best trial's test R@1.
Ratios: ASHA / full trial-seconds (bar <= 0.5) and the difference of best validation R@1 against
the run-to-run noise of the full search (the standard deviation over seeds).

    python bench/bench_tune.py [--seeds 0 1] [--samples 2] [--steps 200] [--eval-every 50]
                               [--reduction-factor 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SWEEP = ROOT / "jobs" / "configs" / "sweeps" / "css-synth.yaml"


def run(scheduler: str, seed: int, args, storage: str) -> dict[str, float]:
    from composeae.sweep.load import load_sweep
    from composeae.sweep.driver import run_sweep

    asha = [f"scheduler.reduction_factor={args.reduction_factor}"] if scheduler == "asha" else []
    sweep = load_sweep(SWEEP, [
        f"name=bench-{scheduler}-s{seed}", f"scheduler={scheduler}", f"seed={seed}",
        f"num_samples={args.samples}", f"storage={storage}", f"data.url={args.data}",
        f"train.steps={args.steps}", f"train.eval_every={args.eval_every}",
        "train.log_every=50", "optim.warmup_steps=10", "ray.num_workers=1",
        "ray.cpus_per_worker=1", "trial_cpus=0.1", f"max_concurrent_trials={args.concurrent}",
        *asha])
    start = time.perf_counter()
    summary = run_sweep(sweep)
    return {"trial_s": summary.trial_seconds, "wall_s": time.perf_counter() - start,
            "trials": summary.trials, "stopped": summary.stopped_early,
            "best_val_r1": summary.best_val["val/R@1"], "best_test_r1": summary.best_test["test/R@1"],
            "best_model": summary.best_params["model.name"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--samples", type=int, default=2, help="random draws per model family")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--concurrent", type=int, default=2, help="trials at once")
    parser.add_argument("--reduction-factor", type=float, default=2,
                        help="ASHA keeps 1/this of the trials at each rung (the sweep's: 2)")
    parser.add_argument("--data", default=str(ROOT / "shards" / "css-synth-small"))
    args = parser.parse_args()

    rows: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory() as storage:
        for seed in args.seeds:
            for scheduler in ("asha", "none"):
                rows[scheduler, seed] = run(scheduler, seed, args, storage)

    print(f"\nASHA vs full search on CSS-synth small: {4 * args.samples} trials per search "
          f"(4 families x {args.samples} draws), {args.steps} steps, evaluation every "
          f"{args.eval_every}, 1 CPU worker per trial, at most {args.concurrent} at once (as "
          f"the CPUs allow); ASHA "
          f"reduction factor {args.reduction_factor:g}")
    print(f"{'seed':>4} {'search':<6} {'trial-s':>8} {'wall-s':>7} {'stopped':>7} "
          f"{'best val R@1':>12} {'its test R@1':>12}  best family")
    for (scheduler, seed), r in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"{seed:>4} {scheduler:<6} {r['trial_s']:>8.0f} {r['wall_s']:>7.0f} "
              f"{r['stopped']:>7} {100 * r['best_val_r1']:>12.2f} {100 * r['best_test_r1']:>12.2f}"
              f"  {r['best_model']}")
    time_ratio = [rows["asha", s]["trial_s"] / rows["none", s]["trial_s"] for s in args.seeds]
    gap = [100 * (rows["none", s]["best_val_r1"] - rows["asha", s]["best_val_r1"])
           for s in args.seeds]
    full = [100 * rows["none", s]["best_val_r1"] for s in args.seeds]
    noise = statistics.stdev(full) if len(full) > 1 else float("nan")
    print(f"ASHA / full trial-seconds: median {statistics.median(time_ratio):.2f} (bar <= 0.5)")
    print(f"full minus ASHA best val R@1 (points): median {statistics.median(gap):.2f}; "
          f"run-to-run noise of the full search (std over seeds): {noise:.2f}")
    print(json.dumps({"bench": "tune", "asha_to_full_trial_seconds": round(
        statistics.median(time_ratio), 3), "val_r1_gap_points": round(statistics.median(gap), 2),
        "full_search_noise_points": round(noise, 2), "seeds": args.seeds,
        "trials_per_search": 4 * args.samples, "steps": args.steps,
        "reduction_factor": args.reduction_factor}))


if __name__ == "__main__":
    main()
