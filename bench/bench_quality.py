"""Retrieval quality on CSS-synth: every model with the same budget, several seeds, mean and std.

Each (model, seed) is a real `composeae train` run through Ray Train (the demo config with
`model.name` and `train.seed` changed), evaluated on the test split with its best-by-validation
weights. Image-only sits beside every model: on this benchmark the gallery holds one-edit
variants of each reference, so image-only R@1 must stay near 1 / variants; if it climbs, the
benchmark has stopped making the text necessary.

The table is printed and written into BENCHMARKS.md (between markers), with the command line.

    python bench/bench_quality.py [--steps 600] [--seeds 0 1 2] [--models composeae tirg ...]

Per-model settings (the tuned comparison: each family at its own best configuration) go with
`--model-set MODEL:SECTION.KEY=VALUE`; the table then lands between the `tuned` markers.
`--ablations ROW ...` (or `all`) trains the named rows of ABLATIONS instead, each row the
paper's ComposeAE settings with one thing changed, and writes them between the `ablations`
markers with the change in R@1 against the first row.

`--from-sweep DIR ...` takes each sweep's best trial (DIR/best.json, written by `composeae tune`)
as its model family's `--model-set` overrides and adds the family to `--models`:

    composeae tune --config jobs/configs/sweeps/css-synth-tirg.yaml --set storage=/tmp/sweeps
    python bench/bench_quality.py --steps 300 --from-sweep /tmp/sweeps/css-synth-tirg ...

`--results FILE.jsonl` keeps every finished run (its overrides and test recall) in FILE and
skips the runs FILE already holds, so an interrupted table resumes where it stopped and a table
can be rewritten from FILE without training again. Runs are known by their overrides only: start
a new file when the code or `demo.yaml` changes.
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
SECTIONS = {"default": "bench_quality", "tuned": "bench_quality_tuned",
            "ablations": "bench_quality_ablations"}

# ComposeAE as the paper and the official code set it (the demo's sizes and optimiser otherwise):
# every ablation row starts here, so the rows do not move when demo.yaml changes.
PAPER = ["model.dropout=0.5", "model.projection=shared", "loss.w_img_rec=0.1",
         "loss.w_txt_rec=0.1", "loss.w_sym=0.01", "loss.init_scale=4.0", "optim.lr=0.001",
         "optim.weight_decay=0.0", "optim.schedule=cosine", "model.embed_dim=256"]
# name: (what changes, overrides applied after PAPER)
ABLATIONS: dict[str, tuple[str, list[str]]] = {
    "paper": ("the paper's settings (dropout 0.5 in eta, shared projection, w_img 0.1, "
              "w_txt 0.1, w_sym 0.01, Adam 1e-3 cosine)", []),
    "dropout0": ("no dropout in eta", ["model.dropout=0"]),
    "dropout0.2": ("dropout 0.2 in eta", ["model.dropout=0.2"]),
    "separate": ("separate complex projections (the official code's)",
                 ["model.projection=separate"]),
    "no_img_rec": ("image reconstruction term off", ["loss.w_img_rec=0"]),
    "no_txt_rec": ("text reconstruction term off", ["loss.w_txt_rec=0"]),
    "no_rec": ("both reconstruction terms off", ["loss.w_img_rec=0", "loss.w_txt_rec=0"]),
    "no_sym": ("rotational symmetry term off", ["loss.w_sym=0"]),
    "sym0.1": ("symmetry weight 0.1", ["loss.w_sym=0.1"]),
    "scale10": ("similarity scale initialised at 10", ["loss.init_scale=10"]),
    "lr3e-3": ("Adam lr 3e-3", ["optim.lr=0.003"]),
    "sgd": ("SGD 1e-2, momentum 0.9, step schedule (the paper's optimiser)",
            ["optim.name=sgd", "optim.lr=0.01", "optim.schedule=step"]),
    "constant": ("constant learning rate (no cosine decay)", ["optim.schedule=constant"]),
    "wd1e-4": ("weight decay 1e-4", ["optim.weight_decay=0.0001"]),
    "augment": ("random crops and flips on training images", ["data.augment=true"]),
    "embed512": ("embedding 512", ["model.embed_dim=512"]),
    "a_init1": ("a-weights initialised (1, 1): rho and rho_conv alike", ["model.a_init=1"]),
    "no_rotation": ("RealSpaceProjectedAE: the rotation replaced by concatenating [x~, delta]",
                    ["model.name=realspace_projected_ae"]),
    "angle_to_rho": ("rho also reads the angle: rho([re, im, delta]) (`composeae_angle_to_rho`)",
                     ["model.name=composeae_angle_to_rho"]),
    "realspace": ("RealSpaceConcatAE: no projections, no rotation (the paper's ablation)",
                  ["model.name=realspace_concat_ae"]),
}


def run_one(model: str, seed: int, args, storage: str, done: dict[str, dict[str, float]],
            extra: list[str] = (), tag: str = "") -> dict[str, float]:
    """Train and test one (model, seed), or return its recall from `done` (the `--results` file
    read once, by overrides); a finished run is appended to that file and to `done`."""
    from composeae.config import load_config
    from composeae.run.driver import run_training

    overrides = [
        f"model.name={model}", f"train.seed={seed}", f"train.steps={args.steps}",
        f"train.eval_every={max(1, args.steps // 4)}", f"data.url={args.data}",
        f"ray.num_workers={args.workers}", *extra, *args.set, *model_sets(args, model)]
    key = json.dumps(overrides)
    if key in done:
        return done[key]
    cfg = load_config(ROOT / "jobs" / "configs" / "demo.yaml", [
        *overrides, f"train.name=quality-{model}{tag}-s{seed}", f"train.storage={storage}"])
    test = {k.removeprefix("test/"): v for k, v in run_training(cfg).test.items()}
    record = {"run": cfg.train.name, "model": cfg.model.name, "seed": seed, "test": test}
    print(json.dumps(record))
    if args.results:
        line = json.dumps({**record, "overrides": overrides}) + "\n"
        with open(args.results, "ab+") as f:
            # After a kill mid-write the file ends inside a line: start on a fresh one.
            if f.seek(0, 2) and (f.seek(-1, 2), f.read(1))[1] != b"\n":
                line = "\n" + line
            f.write(line.encode())
    done[key] = test
    return test


def load_results(path: str | None) -> dict[str, dict[str, float]]:
    """Finished runs in a `--results` file, by their overrides (JSON). A last line cut short by
    a kill is skipped: that run trains again."""
    if not path or not Path(path).exists():
        return {}
    found = {}
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        found[json.dumps(record["overrides"])] = record["test"]
    return found


def model_sets(args, model: str) -> list[str]:
    """The `--model-set MODEL:KEY=VALUE` overrides of one model."""
    return [item.split(":", 1)[1] for item in args.model_set if item.split(":", 1)[0] == model]


def sweep_overrides(directory: str) -> tuple[str, list[str]]:
    """(model family, `MODEL:KEY=VALUE` overrides) of a finished sweep's best trial."""
    import yaml

    best = json.loads(Path(directory, "best.json").read_text())
    model = yaml.safe_load(Path(directory, "best.yaml").read_text())["model"]["name"]
    return model, [f"{model}:{key}={value}" for key, value in best["best_params"].items()]


def cell(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {std:.1f}"


def table(results: dict[str, list[dict[str, float]]], ks: list[str],
          labels: dict[str, str] | None = None) -> str:
    """One row per key of `results`; with `labels`, a "change" column and ΔR@1 against the
    first row (the ablation table)."""
    head = "| model | " if labels is None else "| row | change | "
    tail = "" if labels is None else " ΔR@1 |"
    lines = [head + " | ".join(ks) + " |" + tail,
             "|---|" + ("" if labels is None else "---|") + "---|" * (len(ks) + bool(labels))]
    first = statistics.mean(100 * r["R@1"] for r in next(iter(results.values())))
    for name, runs in results.items():
        cells = [cell([100 * r[k] for r in runs]) for k in ks]
        if labels is None:
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        else:
            delta = statistics.mean(100 * r["R@1"] for r in runs) - first
            lines.append(f"| {name} | {labels[name]} | " + " | ".join(cells) + f" | {delta:+.1f} |")
    return "\n".join(lines)


def write_benchmarks(text: str, section: str = "default") -> None:
    path = ROOT / "BENCHMARKS.md"
    begin, end = (f"<!-- {SECTIONS[section]}:{edge} -->" for edge in ("begin", "end"))
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{text}\n{end}"
    if begin in current and end in current:
        current = current[: current.index(begin)] + block + current[current.index(end) + len(end):]
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
    parser.add_argument("--model-set", action="append", default=[],
                        metavar="MODEL:SECTION.KEY=VALUE",
                        help="config override for one model's runs (its tuned settings)")
    parser.add_argument("--ablations", nargs="+", metavar="ROW",
                        help=f"train these rows of ABLATIONS (or all): {', '.join(ABLATIONS)}")
    parser.add_argument("--from-sweep", nargs="+", default=[], metavar="DIR",
                        help="train each sweep's best configuration (its DIR/best.json)")
    parser.add_argument("--storage", metavar="DIR",
                        help="keep the runs (checkpoints, reports) here; a scratch directory "
                             "removed at the end by default")
    parser.add_argument("--results", metavar="FILE.jsonl",
                        help="append each finished run here; runs already in it are not retrained")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args()
    if args.from_sweep:
        families = [sweep_overrides(d) for d in args.from_sweep]
        if args.models == MODELS:
            args.models = []
        args.models += [model for model, _ in families if model not in args.models]
        args.model_set += [item for _, items in families for item in items]
    if args.ablations == ["all"]:
        args.ablations = list(ABLATIONS)
    for row in args.ablations or []:
        if row not in ABLATIONS:
            parser.error(f"unknown ablation row {row!r}; known: {', '.join(ABLATIONS)}")
    if args.ablations and args.models == MODELS:
        args.models = ["composeae"]

    from composeae import storage
    from composeae.data.synth import generate

    if not storage.exists(storage.join(args.data, "manifest.json")):
        generate(args.data, preset="small", seed=0)
    started = time.time()
    done = load_results(args.results)
    reused = len(done)
    results: dict[str, list[dict[str, float]]] = {}
    labels = None
    with tempfile.TemporaryDirectory() as scratch:
        runs = args.storage or scratch
        if args.ablations:
            labels = {}
            for model in args.models:
                for row in args.ablations:
                    name = row if len(args.models) == 1 else f"{model} {row}"
                    labels[name] = ABLATIONS[row][0]
                    results[name] = [run_one(model, seed, args, runs, done,
                                             PAPER + ABLATIONS[row][1], tag=f"-{row}")
                                     for seed in args.seeds]
        else:
            for model in args.models:
                results[model] = [run_one(model, seed, args, runs, done) for seed in args.seeds]
    ks = [k for k in next(iter(results.values()))[0] if k.startswith("R@")]
    command = ("python bench/bench_quality.py --steps {} --seeds {} --models {} --workers {}"
               .format(args.steps, " ".join(map(str, args.seeds)), " ".join(args.models),
                       args.workers)
               + (" --ablations " + " ".join(args.ablations) if args.ablations else "")
               + (" --from-sweep " + " ".join(args.from_sweep) if args.from_sweep else
                  "".join(f" --model-set {s}" for s in args.model_set))
               + "".join(f" --set {s}" for s in args.set))
    seeds = ", ".join(map(str, args.seeds))
    section = "ablations" if args.ablations else "tuned" if args.model_set else "default"
    total = sum(len(r) for r in results.values())
    trained = len(done) - reused
    note = (f" ({total - trained} of the {total} runs read from a results file)"
            if trained < total else "")
    budget = (f"{args.steps} steps of batch 32 on {args.workers} CPU workers (demo config). "
              f"Wall time {time.time() - started:.0f} s{note}.")
    if section == "ablations":
        text = (f"#### ComposeAE ablations on CSS-synth `small` (test split, %, mean ± std over "
                f"seeds {seeds})\n\nEvery row: the paper's settings with one change; "
                f"{budget}\n\n{table(results, ks, labels)}\n\nCommand: `{command}`")
    else:
        title = ("each model at its tuned configuration" if section == "tuned"
                 else "Retrieval quality on CSS-synth `small`")
        text = (f"## {title[0].upper() + title[1:]} (test split, %, mean ± std over seeds "
                f"{seeds})\n\nSame budget for every model: {budget}\n\n"
                f"{table(results, ks)}\n\nCommand: `{command}`")
    print(text)
    if not args.no_write:
        write_benchmarks(text, section)
    summary = {m: round(statistics.mean(r["R@1"] for r in runs), 4) for m, runs in results.items()}
    print(json.dumps({"bench": "quality", "section": section, "steps": args.steps,
                      "seeds": args.seeds,
                      "mean_R@1": summary,
                      "composeae_beats_tirg": summary.get("composeae", 0) > summary.get("tirg", 1)}))


if __name__ == "__main__":
    main()
