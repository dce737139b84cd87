"""ASHA against a full search: the same sweep with and without early stopping, several seeds.

The sweep is `jobs/configs/sweeps/css-synth.yaml` on CSS-synth `small` (ComposeAE and its three
baselines, the same random draws of learning rate, weight decay, embedding size, dropout and loss
weights), shortened to fit a small machine (`--samples`, `--steps`, `--eval-every`, one worker
per trial). For each searcher seed it runs the search twice, side by side in one invocation:
`scheduler: asha` and `scheduler: none`. Same seed, same trials: the two differ only in which
trials ASHA stops.

Rows per seed: trial-seconds (training time summed over trials), wall seconds, trials stopped
early, best validation R@1 (the selection metric) and the best trial's test R@1; one ASHA search
per reduction factor beside the one full search.
Ratios: ASHA / full trial-seconds (bar <= 0.5) and the difference of best validation R@1 against
the run-to-run noise of the full search (the standard deviation over seeds). Then where a
trial's start-up goes (median over the full search's trials, from their `metrics.json`).

    python bench/bench_tune.py [--seeds 0 1] [--samples 2] [--steps 200] [--eval-every 50]
                               [--reduction-factors 2 4]
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


def run(scheduler: str, seed: int, args, storage: str,
        reduction_factor: float = 2) -> dict[str, float]:
    from composeae.sweep.load import load_sweep
    from composeae.sweep.driver import run_sweep

    asha = [f"scheduler.reduction_factor={reduction_factor}"] if scheduler == "asha" else []
    name = f"bench-{scheduler}-rf{reduction_factor:g}-s{seed}"
    sweep = load_sweep(SWEEP, [
        f"name={name}", f"scheduler={scheduler}", f"seed={seed}",
        f"num_samples={args.samples}", f"storage={storage}", f"data.url={args.data}",
        f"train.steps={args.steps}", f"train.eval_every={args.eval_every}",
        "train.log_every=50", "optim.warmup_steps=10", "ray.num_workers=1",
        "ray.cpus_per_worker=1", "trial_cpus=0.1", f"max_concurrent_trials={args.concurrent}",
        *asha])
    start = time.perf_counter()
    summary = run_sweep(sweep)
    return {"trial_s": summary.trial_seconds, "wall_s": time.perf_counter() - start,
            "trials": summary.trials, "stopped": summary.stopped_early,
            "best_val_r1": summary.best_val["val/R@1"],
            "best_test_r1": summary.best_test["test/R@1"],
            "best_model": summary.best_params["model.name"],
            "startup": [json.loads(p.read_text()).get("startup_s", {})
                        for p in Path(storage, name, "runs").glob("*/metrics.json")]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--samples", type=int, default=2, help="random draws per model family")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--concurrent", type=int, default=2, help="trials at once")
    parser.add_argument("--reduction-factors", type=float, nargs="+", default=[2],
                        help="ASHA keeps 1/this of the trials at each rung (the sweep's: 2); "
                             "one ASHA search per value")
    parser.add_argument("--data", default=str(ROOT / "shards" / "css-synth-small"))
    args = parser.parse_args()

    searches = [("full", "none", 2.0)] + [(f"asha/{rf:g}", "asha", rf)
                                          for rf in args.reduction_factors]
    rows: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory() as storage:
        for seed in args.seeds:
            for label, scheduler, rf in searches:
                rows[label, seed] = run(scheduler, seed, args, storage, rf)

    print(f"\nASHA vs full search on CSS-synth small: {4 * args.samples} trials per search "
          f"(4 families x {args.samples} draws), {args.steps} steps, evaluation every "
          f"{args.eval_every}, 1 CPU worker per trial, at most {args.concurrent} at once (as "
          f"the CPUs allow); asha/N: ASHA with reduction factor N")
    print(f"{'seed':>4} {'search':<8} {'trial-s':>8} {'wall-s':>7} {'stopped':>7} "
          f"{'best val R@1':>12} {'its test R@1':>12}  best family")
    for seed in args.seeds:
        for label, _, _ in searches:
            r = rows[label, seed]
            print(f"{seed:>4} {label:<8} {r['trial_s']:>8.0f} {r['wall_s']:>7.0f} "
                  f"{r['stopped']:>7} {100 * r['best_val_r1']:>12.2f} "
                  f"{100 * r['best_test_r1']:>12.2f}  {r['best_model']}")
    full = [100 * rows["full", s]["best_val_r1"] for s in args.seeds]
    noise = statistics.stdev(full) if len(full) > 1 else float("nan")
    result = {"bench": "tune", "seeds": args.seeds, "trials_per_search": 4 * args.samples,
              "steps": args.steps, "eval_every": args.eval_every,
              "full_search_noise_points": round(noise, 2)}
    for label, scheduler, rf in searches[1:]:
        ratio = statistics.median(rows[label, s]["trial_s"] / rows["full", s]["trial_s"]
                                  for s in args.seeds)
        gap = statistics.median(100 * (rows["full", s]["best_val_r1"]
                                       - rows[label, s]["best_val_r1"]) for s in args.seeds)
        print(f"{label}: ASHA / full trial-seconds {ratio:.2f} (bar <= 0.5); full minus ASHA "
              f"best val R@1 {gap:.2f} points")
        result[f"{label}_to_full_trial_seconds"] = round(ratio, 3)
        result[f"{label}_val_r1_gap_points"] = round(gap, 2)
    print(f"run-to-run noise of the full search (std of best val R@1 over seeds): {noise:.2f}")
    startups = [s for seed in args.seeds for s in rows["full", seed]["startup"] if s]
    if startups:
        phases = {p: statistics.median(s.get(p, 0.0) for s in startups)
                  for p in dict.fromkeys(k for s in startups for k in s)}
        print(f"a trial's Train start-up (median of {len(startups)}): " + ", ".join(
            f"{p} {v:.1f} s" for p, v in phases.items()) + f"; {sum(phases.values()):.1f} s")
        result["startup_s"] = {p: round(v, 2) for p, v in phases.items()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
