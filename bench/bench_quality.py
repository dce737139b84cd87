"""Retrieval quality on CSS-synth: every model with the same budget, several seeds, mean and std.

Each (model, seed) is a real `composeae train` run through Ray Train (the demo config with
`model.name` and `train.seed` changed), evaluated on the test split with its best-by-validation
weights. Image-only sits beside every model: on this benchmark the gallery holds one-edit
variants of each reference, so image-only R@1 must stay near 1 / variants; if it climbs, the
benchmark has stopped making the text necessary.

The table is printed and written into BENCHMARKS.md (between markers), with the command line.

    python bench/bench_quality.py [--steps 600] [--seeds 0 1 2] [--models composeae tirg ...]
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

MODELS = ["composeae", "tirg", "concat", "image_only", "text_only"]
BEGIN, END = "<!-- bench_quality:begin -->", "<!-- bench_quality:end -->"


def run_one(model: str, seed: int, args, storage: str) -> dict[str, float]:
    from composeae.config import load_config
    from composeae.driver import run_training

    cfg = load_config(ROOT / "jobs" / "configs" / "demo.yaml", [
        f"model.name={model}", f"train.seed={seed}", f"train.steps={args.steps}",
        f"train.eval_every={max(1, args.steps // 4)}", f"train.name=quality-{model}-s{seed}",
        f"train.storage={storage}", f"data.url={args.data}", f"ray.num_workers={args.workers}",
        *args.set])
    return {k.removeprefix("test/"): v for k, v in run_training(cfg).test.items()}


def table(results: dict[str, list[dict[str, float]]], ks: list[str]) -> str:
    lines = ["| model | " + " | ".join(ks) + " |", "|---|" + "---|" * len(ks)]
    for model, runs in results.items():
        cells = []
        for k in ks:
            values = [100 * r[k] for r in runs]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {std:.1f}")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_benchmarks(text: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in current and END in current:
        current = current[: current.index(BEGIN)] + block + current[current.index(END) + len(END):]
    else:
        current = current.rstrip() + "\n\n" + block + "\n"
    path.write_text(current)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data", default="shards/css-synth-small",
                        help="CSS-synth shards (built with the small preset when missing)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="extra config override for every run (ablations)")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args()

    from composeae.data import storage
    from composeae.data.synth import generate

    if not storage.exists(storage.join(args.data, "manifest.json")):
        generate(args.data, preset="small", seed=0)
    started = time.time()
    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as runs:
        for model in args.models:
            results[model] = [run_one(model, seed, args, runs) for seed in args.seeds]
    ks = [k for k in results[args.models[0]][0] if k.startswith("R@")]
    command = ("python bench/bench_quality.py --steps {} --seeds {} --models {} --workers {}"
               .format(args.steps, " ".join(map(str, args.seeds)), " ".join(args.models),
                       args.workers) + "".join(f" --set {s}" for s in args.set))
    text = (f"## Retrieval quality on CSS-synth `small` (test split, %, mean ± std over seeds "
            f"{', '.join(map(str, args.seeds))})\n\n"
            f"Same budget for every model: {args.steps} steps of batch 32 on {args.workers} "
            f"CPU workers (demo config). Wall time {time.time() - started:.0f} s.\n\n"
            f"{table(results, ks)}\n\nCommand: `{command}`")
    print(text)
    if not args.no_write:
        write_benchmarks(text)
    summary = {m: round(statistics.mean(r["R@1"] for r in runs), 4) for m, runs in results.items()}
    print(json.dumps({"bench": "quality", "steps": args.steps, "seeds": args.seeds,
                      "mean_R@1": summary,
                      "composeae_beats_tirg": summary.get("composeae", 0) > summary.get("tirg", 1)}))


if __name__ == "__main__":
    main()
