"""Host work of one training step: aten calls and CPU time, the previous eager path beside ours.

Every aten call in the step is a host dispatch (a kernel launch on a GPU) that the card waits
for, so the count is the GPU-idle cost measurable on any CPU. The step is `train_step` of
`composeae.run.worker` at 64 px with the small CNN and the LSTM (the CSS-synth setting), fp32,
one thread, for ComposeAE and TIRG at batch 32 and 128:

  previous   the modifier strings tokenised inside the step, row by row into tensors (as the
             model did before the loader tokenised), and Adam one parameter tensor at a time
  eager      ours: token ids made in the loader (outside the step), fused Adam
  compiled   ours under `train.compile=default` (torch.compile, inductor), after warm-up

Columns: aten calls per step (the eager one split into forward / backward / optimizer), and
median ms per step over `--steps` steps. The aten count of `eager` must not grow with the batch
(the tokeniser made ~15 calls per row) and stay under 3,000 at batch 128.

    python bench/bench_step.py [--steps 10] [--no-compile]

The last line is one JSON object; `aten_calls_per_step` holds the eager counts
({"composeae": {"32": N, "128": N}, "tirg": {...}}), which `bench/gpu_suite.py --smoke` carries.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from composeae.config import config_from_dict  # noqa: E402
from composeae.models import create_model  # noqa: E402
from composeae.models.text import Tokens, WordTokenizer  # noqa: E402
from composeae.optim import build_scheduler  # noqa: E402
from composeae.run.worker import train_step  # noqa: E402

MODELS = ("composeae", "tirg")
BATCHES = (32, 128)
_WORDS = ("add remove make change the a red green blue yellow purple cyan gray brown circle "
          "square triangle small large to at top bottom left right center middle").split()


def modifiers(n: int, rng: random.Random) -> list[str]:
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


def previous_tokens(tokenizer: WordTokenizer, texts: list[str], max_len: int) -> Tokens:
    """The tokenisation the model did inside the step before: a tensor built per row, copied."""
    rows = [[tokenizer.index.get(w, 1) for w in t.lower().split()][:max_len] or [1]
            for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return Tokens(ids, mask)


def aten_calls(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


class Setting:
    """One model at one batch size on one path: model, optimizer, inputs, a step function."""

    def __init__(self, name: str, batch: int, path: str):
        cfg = self.cfg = config_from_dict({
            "model": {"name": name, "image_encoder": "small_cnn"},
            "data": {"image_size": 64}, "train": {"precision": "fp32", "compile": (
                "default" if path == "compiled" else "none")}})
        rng = random.Random(0)
        torch.manual_seed(0)
        self.tokenizer = WordTokenizer(sorted(set(_WORDS)))
        self.model = create_model(cfg.model, cfg.loss, self.tokenizer)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if path == "previous":
            self.optimizer = torch.optim.Adam(params, lr=1e-3, fused=False, foreach=False)
        else:
            self.optimizer = torch.optim.Adam(params, lr=1e-3, fused=True)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, 1000)
        if path == "compiled":
            self.model.compile()
        self.path, self.texts = path, modifiers(batch, rng)
        self.batch = {"reference": torch.randn(batch, 3, 64, 64),
                      "target": torch.randn(batch, 3, 64, 64), "modifier": self.texts}
        if path != "previous":  # made by the loader workers, outside the step
            self.batch["tokens"] = self.model.tokenize_fn()(self.texts)
        self.device = torch.device("cpu")

    def step(self) -> None:
        batch = self.batch
        if self.path == "previous":  # tokenised inside the step, as before
            batch = dict(batch, tokens=previous_tokens(self.tokenizer, self.texts,
                                                       self.cfg.model.max_text_len))
        train_step(self.model, self.optimizer, self.scheduler, batch, self.cfg, self.device)

    def phases(self) -> dict[str, int]:
        """aten calls of forward, backward and optimizer, profiled one at a time."""
        model, batch = self.model, self.batch
        out: dict[str, int] = {}
        holder: dict[str, torch.Tensor] = {}

        def forward():
            holder["loss"] = model(batch["reference"], batch["tokens"], batch["target"])["loss"]

        out["forward"] = aten_calls(forward)
        self.optimizer.zero_grad(set_to_none=True)
        out["backward"] = aten_calls(lambda: holder["loss"].backward())
        out["optimizer"] = aten_calls(lambda: (self.optimizer.step(), self.scheduler.step()))
        return out


def measure(name: str, batch: int, paths: tuple[str, ...], steps: int) -> dict[str, dict]:
    """Every path of one (model, batch), timed in interleaved rounds: the same machine noise
    falls on each."""
    settings = {p: Setting(name, batch, p) for p in paths}
    rows: dict[str, dict] = {}
    for path, setting in settings.items():
        started = time.perf_counter()
        setting.step()
        rows[path] = {"first_step_s": time.perf_counter() - started}
        for _ in range(2):
            setting.step()
        rows[path]["aten"] = aten_calls(setting.step)
        if path == "eager":
            rows[path]["phases"] = setting.phases()
    times: dict[str, list[float]] = {p: [] for p in paths}
    for _ in range(steps):
        for path, setting in settings.items():
            started = time.perf_counter()
            setting.step()
            times[path].append(time.perf_counter() - started)
    for path in paths:
        rows[path]["ms"] = 1000 * statistics.median(times[path])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row (median)")
    parser.add_argument("--no-compile", action="store_true",
                        help="leave out the compiled rows (their first compile takes minutes)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    paths = ("previous", "eager") + (() if args.no_compile else ("compiled",))
    rows = {}
    for m in MODELS:
        for b in BATCHES:
            here = tuple(p for p in paths if not (p == "compiled" and b != 128))
            rows |= {(m, b, p): row for p, row in measure(m, b, here, args.steps).items()}

    print(f"one training step, 64 px small CNN + LSTM, fp32, 1 thread, median of {args.steps}")
    print(f"{'model':<10} {'batch':>5} {'path':<9} {'aten calls':>10} {'fwd/bwd/opt':>16} "
          f"{'ms/step':>8} {'vs previous':>11}")
    for (m, b, p), row in rows.items():
        phases = row.get("phases")
        split = "/".join(str(phases[k]) for k in ("forward", "backward", "optimizer")) \
            if phases else ""
        ratio = rows[(m, b, "previous")]["ms"] / row["ms"]
        print(f"{m:<10} {b:>5} {p:<9} {row['aten']:>10} {split:>16} {row['ms']:>8.1f} "
              f"{ratio:>10.2f}x")
    if not args.no_compile:
        for m in MODELS:
            print(f"{m}: first compiled step {rows[(m, 128, 'compiled')]['first_step_s']:.0f} s "
                  f"(compile, cold or cached); compiled / eager speed at batch 128 "
                  f"{rows[(m, 128, 'eager')]['ms'] / rows[(m, 128, 'compiled')]['ms']:.2f}x")

    def per_model(path: str, key: str = "aten") -> dict:
        return {m: {str(b): rows[(m, b, path)][key] for b in BATCHES if (m, b, path) in rows}
                for m in MODELS}

    eager = per_model("eager")
    figures = {
        "bench": "step",
        "aten_calls_per_step": eager,
        "aten_calls_previous": per_model("previous"),
        "aten_growth_32_to_128": {m: eager[m]["128"] / eager[m]["32"] for m in MODELS},
        "optimizer_calls": {m: rows[(m, 128, "eager")]["phases"]["optimizer"] for m in MODELS},
        "ms_per_step_eager": per_model("eager", "ms"),
        "speedup_vs_previous_128": {m: rows[(m, 128, "previous")]["ms"]
                                    / rows[(m, 128, "eager")]["ms"] for m in MODELS},
    }
    if not args.no_compile:
        figures |= {
            "aten_calls_compiled_128": {m: rows[(m, 128, "compiled")]["aten"] for m in MODELS},
            "compiled_vs_eager_128": {m: rows[(m, 128, "eager")]["ms"]
                                      / rows[(m, 128, "compiled")]["ms"] for m in MODELS},
            "compile_first_step_s": {m: rows[(m, 128, "compiled")]["first_step_s"]
                                     for m in MODELS},
        }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
