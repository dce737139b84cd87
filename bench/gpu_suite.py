"""The GPU suite: one command that answers the at-scale questions on a GPU machine in minutes.

    python bench/gpu_suite.py --out DIR [--budget-s 500] [--work DIR]
    python bench/gpu_suite.py --out DIR --smoke          # the same phases on CPU, tiny sizes

It runs on the project's install (`make .venv/.installed`, or the same packages from a
wheelhouse on a machine without an index) and needs nothing else from outside the working tree.
Phases, each a child process under a hard time limit, all inside `--budget-s`:

1. **shards**: CSS-synth `full` built with every core (`shards synth --workers N`).
2. **host**: `bench/bench_step.py --no-compile`, the aten calls of one eager training step (the
   host dispatches a GPU waits for) at batch 32 and 128, beside the previous path's.
3. **model step**: `bench/bench_gpu.py`, the training step alone (samples/s, ms/step, GPU busy %,
   peak memory, bf16) on the previous path, ours eager and ours compiled (`train.compile`,
   ComposeAE, with its compile time), at 64 px and with ResNet-18 at 224 px.
4. **end to end**: `composeae train` through Ray Train on one GPU worker from the shards, a fixed
   number of steps, once per value of `data.loader_workers` eager, then compiled (`--compile`)
   at the fastest count: samples/s in the steady state (the median of the logged windows after
   the first), GPU utilisation (`nvidia-smi`, sampled every 0.25 s) and CPU cores busy
   (`/proc/stat`), both over the training window only (from the first to the last progress
   line), and the start-up before the first step with its phases (`metrics.json`).
5. **ddp** (only with more than one GPU): the same run on every GPU, one worker each at the same
   per-worker batch; scaling efficiency = its samples/s / (GPUs x one GPU's).
6. **sweep**: the same short sweep (8 trials of a few hundred steps) twice, one trial
   per GPU and four per GPU (`ray.gpus_per_worker: 0.25`): trials per hour of each.
7. **quality**: the best baseline (concat with its sweep winner's settings, BENCHMARKS.md) and
   ComposeAE (`css-synth-full.yaml`, its tuned settings) trained one after the other for the
   same number of steps on `full`, as many as the remaining budget allows at the rate phase 3
   measured, with the cosine schedule spread over them; validation R@1 at each quarter and test
   R@1 of the best-by-validation weights at the end.

All runs share one Ray instance that this process starts (children join it through
RAY_ADDRESS), so Ray starts once. Under `--out`: `suite.log` (every child's output, in order),
`summary.md` (the tables) and `summary.json`. The last line printed is one JSON object with the
figures. Exit status 0 when every phase finished, 1 otherwise (the figures of the phases that
did finish are still printed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# Concat's sweep winner on CSS-synth `small` (BENCHMARKS.md, "Each model at its tuned
# configuration"), on top of the experiment config; ComposeAE's tuned settings are the config's.
BASELINE = ["model.name=concat", "optim.lr=0.0013", "optim.weight_decay=6.45e-6",
            "model.embed_dim=128", "loss.init_scale=2.07"]


PHASES = ("host", "bench_gpu", "e2e", "ddp", "sweep", "quality")
"""The phases after the shards, which every phase needs."""


@dataclass(frozen=True)
class Sizes:
    """What differs between a GPU run and the CPU smoke run."""
    preset: str
    config: str
    extra: tuple[str, ...]
    """Overrides on top of `config` for every training run."""
    use_gpu: bool
    loader_workers: tuple[int, ...]
    e2e_steps: int
    batch_size: int
    """Per worker. One GPU worker at batch 128 is css-synth-full.yaml's global batch (2 x 64)."""
    bench_gpu: tuple[str, ...]
    bench_step: tuple[str, ...]
    compile: str
    """`train.compile` of the compiled end-to-end run."""
    sweep_steps: int
    sweep_trials: int
    """Trials of the sweep phase (8 on a GPU: two waves of four when packed four per GPU)."""
    sweep_packings: tuple[int, ...]
    """Trials per GPU of the sweep phase's runs."""
    limits: dict[str, float]
    test_eval_s: float
    """Allowance for the final test evaluation of a quality run (16,200 queries, 86,400 images)."""
    max_steps: int


GPU = Sizes(preset="full", config="jobs/configs/css-synth-full.yaml", extra=(), use_gpu=True,
            loader_workers=(4, 8), e2e_steps=1000, batch_size=128,
            bench_gpu=("--steps", "30", "--warmup", "5"),
            bench_step=("--no-compile", "--steps", "3"), compile="reduce-overhead",
            sweep_steps=300, sweep_trials=8, sweep_packings=(1, 4),
            limits={"shards": 150, "host": 60, "bench_gpu": 200, "e2e": 90, "e2e_compiled": 150,
                    "sweep": 120}, test_eval_s=40, max_steps=20000)
# The smoke runs every phase's code at tiny sizes; its "compiled" run stays eager (compiling the
# model takes minutes on CPU: tests/test_compile.py covers it) and its sweep is one run of two
# trials, packed.
SMOKE = Sizes(preset="tiny", config="jobs/configs/tiny.yaml", extra=(), use_gpu=False,
              loader_workers=(1,),
              e2e_steps=6, batch_size=8,
              bench_gpu=("--cpu-smoke", "--steps", "1", "--warmup", "1", "--batch-size", "4",
                         "--compile", "none"),
              bench_step=("--no-compile", "--steps", "1"), compile="none", sweep_steps=4,
              sweep_trials=2, sweep_packings=(4,),
              limits={"shards": 60, "host": 120, "bench_gpu": 150, "e2e": 60,
                      "e2e_compiled": 60, "sweep": 120}, test_eval_s=5, max_steps=8)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for suite.log, summary.md/json")
    parser.add_argument("--work", default=None,
                        help="folder for shards and runs (default: a new temporary folder)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock budget of all phases (default 540; smoke 600)")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, tiny sizes: checks the script, measures nothing")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help=f"comma-separated subset of {','.join(PHASES)} (default: all)")
    parser.add_argument("--loader-workers", type=int, nargs="+", default=None, metavar="N",
                        help="data.loader_workers values of the end-to-end phase (the quality "
                             "phase uses the fastest, or the largest without that phase)")
    parser.add_argument("--quality-steps", type=int, default=None, metavar="N",
                        help="steps of each quality run (default: what the budget allows at "
                             "the end-to-end phase's rate)")
    args = parser.parse_args(argv)
    args.phases = set(args.phases.split(","))
    if not args.phases <= set(PHASES):
        parser.error(f"--phases takes a subset of {','.join(PHASES)}")
    if "quality" in args.phases and "e2e" not in args.phases and not args.quality_steps:
        parser.error("the quality phase without the e2e phase needs --quality-steps")
    args.sizes = SMOKE if args.smoke else GPU
    if args.loader_workers:
        args.sizes = replace(args.sizes, loader_workers=tuple(args.loader_workers))
    args.budget_s = args.budget_s or (600.0 if args.smoke else 540.0)
    return args


# -- sampling the machine --------------------------------------------------------------------

class Sampler:
    """Timestamped GPU utilisation/memory (nvidia-smi) and CPU busy cores (/proc/stat)."""

    def __init__(self, period_s: float = 0.25):
        self.period_s = period_s
        self.gpu: list[tuple[float, float, float]] = []  # (time, util %, memory MiB)
        self.cpu: list[tuple[float, float]] = []  # (time, busy jiffies)
        self._stop = threading.Event()
        self._smi = None
        if shutil.which("nvidia-smi"):
            self._smi = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                 "--format=csv,noheader,nounits", f"-lms={int(period_s * 1000)}"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            threading.Thread(target=self._read_smi, daemon=True).start()
        threading.Thread(target=self._read_cpu, daemon=True).start()

    def _read_smi(self) -> None:
        for line in self._smi.stdout:
            parts = [p.strip() for p in line.split(",")]
            try:
                self.gpu.append((time.monotonic(), float(parts[0]), float(parts[1])))
            except (ValueError, IndexError):
                continue

    def _read_cpu(self) -> None:
        while not self._stop.is_set():
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
            idle = fields[3] + fields[4]  # idle + iowait
            self.cpu.append((time.monotonic(), sum(fields) - idle))
            self._stop.wait(self.period_s)

    def window(self, start: float, end: float) -> dict[str, float]:
        """Mean GPU utilisation, peak GPU memory and mean busy CPU cores between two times."""
        out: dict[str, float] = {}
        gpu = [(u, m) for t, u, m in self.gpu if start <= t <= end]
        if gpu:
            out["gpu_util_pct"] = round(statistics.fmean(u for u, _ in gpu), 1)
            out["gpu_mem_gb"] = round(max(m for _, m in gpu) / 1024, 2)
        cpu = [(t, b) for t, b in self.cpu if start <= t <= end]
        if len(cpu) >= 2:
            ticks = os.sysconf("SC_CLK_TCK")
            out["cpu_cores_busy"] = round((cpu[-1][1] - cpu[0][1]) / ticks
                                          / (cpu[-1][0] - cpu[0][0]), 2)
        return out

    def close(self) -> None:
        self._stop.set()
        if self._smi is not None:
            self._smi.terminate()


# -- child processes -------------------------------------------------------------------------

@dataclass
class Child:
    """One finished (or killed) child: its status, wall time and timestamped output lines."""
    rc: int
    started: float
    wall_s: float
    timed_out: bool
    lines: list[tuple[float, str]] = field(default_factory=list)

    def last_json(self) -> dict[str, Any] | None:
        for _, line in reversed(self.lines):
            if line.startswith("{"):
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    return None
        return None


class Suite:
    def __init__(self, args: argparse.Namespace):
        self.args, self.sizes = args, args.sizes
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work or tempfile.mkdtemp(prefix="composeae-gpu-suite-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.log = open(self.out / "suite.log", "w")
        self.start = time.monotonic()
        self.sampler = Sampler()
        # The suite's own Ray instance, joined only by its children on this machine: without
        # token authentication, so they need no token file.
        os.environ["RAY_AUTH_MODE"] = "disabled"
        self.env = dict(os.environ)
        # Children import the project from this tree, also where it is not installed.
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        self.env["PYTHONUNBUFFERED"] = "1"
        self.figures: dict[str, Any] = {"bench": "gpu_suite", "smoke": args.smoke}
        self.failed: list[str] = []

    def left_s(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.start)

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def run(self, name: str, argv: list[str], limit_s: float) -> Child:
        """Run `argv` with at most `limit_s` (and never past the budget); its output goes to
        suite.log with times. A child past its limit is killed with its whole process group."""
        limit_s = max(1.0, min(limit_s, self.left_s()))
        self.say(f"== {name}: {' '.join(argv)} (limit {limit_s:.0f} s)")
        start = time.monotonic()
        proc = subprocess.Popen(argv, cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        timer = threading.Timer(limit_s, lambda: os.killpg(proc.pid, signal.SIGKILL))
        timer.start()
        lines = []
        for line in proc.stdout:
            now = time.monotonic()
            lines.append((now, line.rstrip("\n")))
            self.log.write(f"[{now - self.start:7.1f}] {line}")
        rc = proc.wait()
        timed_out = not timer.is_alive() and rc == -signal.SIGKILL
        timer.cancel()
        self.log.flush()
        child = Child(rc, start, time.monotonic() - start, timed_out, lines)
        state = "killed at its time limit" if timed_out else f"exit {rc}"
        self.say(f"== {name}: {state} after {child.wall_s:.1f} s")
        if rc != 0:
            self.failed.append(name)
        return child

    # -- phases --------------------------------------------------------------------------------

    def environment(self) -> bool:
        """What the machine is, and whether everything the phases import is there."""
        import torch

        info: dict[str, Any] = {"torch": torch.__version__, "cpus": os.cpu_count(),
                                "cuda": torch.cuda.is_available()}
        if info["cuda"]:
            info["gpu"] = torch.cuda.get_device_name(0)
            props = torch.cuda.get_device_properties(0)
            info["gpu_mem_gb"] = round(props.total_memory / 2**30, 1)
        missing = []
        for module in ("ray", "ray.train.torch", "webdataset", "boto3", "composeae.cli"):
            try:
                __import__(module)
            except Exception as exc:  # one line per missing piece, then stop
                missing.append(f"{module} ({type(exc).__name__}: {exc})")
        if not missing:
            import ray

            info["ray"] = ray.__version__
        self.figures["machine"] = info
        self.say(f"machine: {json.dumps(info)}")
        if self.sizes.use_gpu and not info["cuda"]:
            missing.append("a CUDA GPU (use --smoke on a machine without one)")
        if missing:
            self.say("error: the suite cannot run without " + "; ".join(missing))
            return False
        return True

    def start_ray(self) -> None:
        import ray
        import torch

        gpus = torch.cuda.device_count() if self.sizes.use_gpu else 0
        # Logical CPUs: a worker reserves loader workers + 1 and the Train controller one more,
        # also where the machine has fewer cores (the smoke run on 2).
        cpus = max(os.cpu_count() or 1, max(self.sizes.loader_workers) + 2)
        ray.init(address="local", num_cpus=cpus, num_gpus=gpus, include_dashboard=False,
                 log_to_driver=False)
        self.env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        self.say(f"ray: {self.env['RAY_ADDRESS']} with {cpus} CPUs, {gpus} GPUs")

    def shards(self) -> str:
        url = str(self.work / f"css-synth-{self.sizes.preset}")
        if (Path(url) / "manifest.json").exists():
            self.say(f"shards: {url} already built")
            return url
        child = self.run("shards", [sys.executable, "-m", "composeae.cli", "shards", "synth",
                                    "--out", url, "--preset", self.sizes.preset,
                                    "--workers", str(os.cpu_count())],
                         self.sizes.limits["shards"])
        self.figures["shards_s"] = round(child.wall_s, 1)
        return url

    def host(self) -> None:
        child = self.run("host calls", [sys.executable, "bench/bench_step.py",
                                        *self.sizes.bench_step], self.sizes.limits["host"])
        result = child.last_json() or {}
        self.figures["host"] = {k: v for k, v in result.items() if k != "bench"}
        if "aten_calls_per_step" in result:
            self.figures["aten_calls_per_step"] = result["aten_calls_per_step"]

    def bench_gpu(self) -> None:
        child = self.run("model step", [sys.executable, "bench/bench_gpu.py",
                                        *self.sizes.bench_gpu], self.sizes.limits["bench_gpu"])
        result = child.last_json() or {}
        self.figures["model_step"] = {k: v for k, v in result.items() if k != "bench"}

    def train(self, name: str, data: str, steps: int, overrides: list[str],
              limit_s: float, loader_workers: int) -> tuple[Child, dict[str, Any]]:
        """`composeae train` on one worker (unless `overrides` say otherwise); returns the child
        and what its run recorded."""
        storage = self.work / "runs"
        shutil.rmtree(storage / name, ignore_errors=True)
        log_every = max(1, steps // 20)
        sets = [f"data.url={data}", "data.synth_if_missing=false",
                f"data.loader_workers={loader_workers}", "ray.num_workers=1",
                f"ray.use_gpu={str(self.sizes.use_gpu).lower()}",
                f"ray.cpus_per_worker={loader_workers + 1}",
                f"train.storage={storage}", f"train.name={name}", f"train.steps={steps}",
                f"train.batch_size={self.sizes.batch_size}", f"train.log_every={log_every}",
                "optim.warmup_steps=" + str(min(200, steps // 10)), *self.sizes.extra,
                *overrides]
        argv = [sys.executable, "jobs/train.py", "--config", self.sizes.config]
        for s in sets:
            argv += ["--set", s]
        child = self.run(name, argv, limit_s)
        return child, read_run(storage / name)

    def e2e_run(self, name: str, data: str, workers: int, limit_s: float,
                extra: list[str] = (), gpus: int = 1) -> dict[str, Any]:
        """One end-to-end run's row: steady-state samples/s, GPU and CPU use, start-up."""
        steps = self.sizes.e2e_steps
        child, run = self.train(name, data, steps,
                                [f"train.eval_every={steps}", "eval.test_split=val",
                                 f"ray.num_workers={gpus}",
                                 f"train.batch_size={self.sizes.batch_size}", *extra],
                                limit_s, workers)
        row: dict[str, Any] = {"loader_workers": workers, "wall_s": round(child.wall_s, 1),
                               "compile": next((e.split("=", 1)[1] for e in extra
                                                if e.startswith("train.compile=")), "none")}
        rates = [h["samples_per_s"] for h in run.get("history", []) if "samples_per_s" in h]
        steps_at = [t for t, line in child.lines if PROGRESS.search(line)]
        if len(rates) >= 2 and len(steps_at) >= 2:
            rate = statistics.median(rates[1:])
            row["samples_per_s"] = round(rate, 1)
            row["startup_s"] = round(steps_at[0] - child.started, 1)
            row["startup_phases_s"] = {k: round(v, 1) for k, v in
                                       run.get("metrics", {}).get("startup_s", {}).items()}
            row |= self.sampler.window(steps_at[0], steps_at[-1])
            if row.get("cpu_cores_busy"):
                row["samples_per_s_per_core"] = round(rate / row["cpu_cores_busy"], 1)
            # The whole run's cost outside the training steps: start-up and evaluations.
            row["overhead_s"] = round(child.wall_s - steps * self.sizes.batch_size * gpus / rate,
                                      1)
        if "compile" in run.get("metrics", {}):
            row["compiled"] = run["metrics"]["compile"]
        return row

    def end_to_end(self, data: str) -> dict[str, Any] | None:
        """Phase 4: eager per loader-worker count, then compiled at the fastest; returns the
        eager row of the fastest count."""
        rows = [self.e2e_run(f"e2e-lw{w}", data, w, self.sizes.limits["e2e"])
                for w in self.sizes.loader_workers]
        measured = [r for r in rows if "samples_per_s" in r]
        best = max(measured, key=lambda r: r["samples_per_s"]) if measured else None
        if best is not None:
            compiled = self.e2e_run("e2e-compiled", data, best["loader_workers"],
                                    self.sizes.limits["e2e_compiled"],
                                    [f"train.compile={self.sizes.compile}"])
            rows.append(compiled)
            if "samples_per_s" in compiled:
                self.figures["e2e_compiled_vs_eager"] = round(
                    compiled["samples_per_s"] / best["samples_per_s"], 3)
        self.figures["end_to_end"] = rows
        return best

    def ddp(self, data: str, best: dict[str, Any] | None) -> None:
        """Phase 5: every GPU, one worker each at the same per-worker batch."""
        import torch

        gpus = torch.cuda.device_count() if self.sizes.use_gpu else 0
        if gpus < 2 or best is None:
            self.say(f"ddp: {gpus} GPU(s) here, nothing to scale over")
            return
        row = self.e2e_run("e2e-ddp", data, best["loader_workers"], self.sizes.limits["e2e"],
                           gpus=gpus)
        if "samples_per_s" in row:
            row["scaling_efficiency"] = round(row["samples_per_s"]
                                              / (gpus * best["samples_per_s"]), 3)
        self.figures["ddp"] = row | {"gpus": gpus}

    def sweep(self, data: str) -> None:
        """Phase 6: the same sweep with one trial per GPU and four per GPU (fractional GPUs)."""
        rows = {}
        for per_gpu in self.sizes.sweep_packings:
            name = f"packing-{per_gpu}"
            sweep = self.work / f"{name}.yaml"
            steps = self.sizes.sweep_steps
            gpu_sets = ({"ray.use_gpu": "true", "ray.gpus_per_worker": 1 / per_gpu}
                        if self.sizes.use_gpu else {"ray.cpus_per_worker": 1 / per_gpu})
            sets = {"data.url": data, "data.synth_if_missing": "false",
                    "data.loader_workers": 1, "ray.num_workers": 1,
                    "train.batch_size": self.sizes.batch_size, "train.steps": steps,
                    "train.eval_every": steps, "train.log_every": steps,
                    "eval.test_split": "val", "train.storage": self.work / "sweeps",
                    **dict(e.split("=", 1) for e in self.sizes.extra), **gpu_sets}
            sweep.write_text(json.dumps({
                "base": str(ROOT / self.sizes.config), "name": name,
                "set": [f"{k}={v}" for k, v in sets.items()],
                "search": {"optim.lr": {"loguniform": [1e-4, 3e-3]}},
                "num_samples": self.sizes.sweep_trials, "scheduler": "none", "trial_cpus": 0.25,
                "max_failures": 0}))
            shutil.rmtree(self.work / "sweeps" / name, ignore_errors=True)
            child = self.run(name, [sys.executable, "-m", "composeae.cli", "tune",
                                    "--config", str(sweep)], self.sizes.limits["sweep"])
            placement = next((line.strip() for _, line in child.lines
                              if " trial(s) at once" in line), "")
            at_once = placement.split(" trial(s) at once")[0].split()[-1] if placement else None
            rows[per_gpu] = {"wall_s": round(child.wall_s, 1), "at_once": at_once,
                             "placement": placement,
                             "finished": child.rc == 0,
                             "trials_per_hour": round(self.sizes.sweep_trials * 3600
                                                      / child.wall_s, 1)}
        self.figures["sweep"] = rows
        if all(rows.get(n, {}).get("finished") for n in (1, 4)):
            self.figures["sweep_packing_speedup"] = round(
                rows[4]["trials_per_hour"] / rows[1]["trials_per_hour"], 2)

    def quality(self, data: str, best: dict[str, Any] | None) -> None:
        """Phase 4: ComposeAE and the baseline, the same steps each, within what is left."""
        per_model = (self.left_s() - 5) / 2
        if self.args.quality_steps:
            steps, workers = self.args.quality_steps, max(self.sizes.loader_workers)
        else:
            # The end-to-end phase trains ComposeAE, the slower of the two, so its rate fits both;
            # 0.8: the quality runs' evaluations and checkpoints cost about that much of it.
            train_s = per_model - best["overhead_s"] - self.sizes.test_eval_s
            steps = int(0.8 * train_s * best["samples_per_s"] / self.sizes.batch_size) // 4 * 4
            steps, workers = max(0, min(steps, self.sizes.max_steps)), best["loader_workers"]
        self.figures["quality_steps"] = steps
        if steps < 8:
            self.say(f"quality: {per_model:.0f} s per model left, too little for a run")
            self.failed.append("quality")
            return
        rows = {}
        # The faster baseline first: ComposeAE, about 0.6x its rate on a GPU, then has all that
        # is left, so the fixed steps fit where an even split of the time would cut it short.
        runs = [("concat", BASELINE), ("composeae", [])]
        for i, (model, overrides) in enumerate(runs):
            limit = (self.left_s() - 5) / (len(runs) - i)
            child, run = self.train(f"quality-{model}", data, steps,
                                    [f"train.eval_every={steps // 4}", *overrides],
                                    limit, workers)
            metrics = run.get("metrics", {})
            rows[model] = {
                "steps": steps, "wall_s": round(child.wall_s, 1),
                "val_R@1": {h["step"]: round(100 * h["val/R@1"], 1)
                            for h in run.get("history", []) if "val/R@1" in h},
                "test_R@1": (round(100 * metrics["test/R@1"], 1) if "test/R@1" in metrics
                             else None)}
        self.figures["quality"] = rows

    # -- the report ----------------------------------------------------------------------------

    def table(self) -> str:
        f = self.figures
        machine = f.get("machine", {})
        lines = [f"# GPU suite{' (smoke: CPU, tiny sizes, not a measurement)' if f['smoke'] else ''}",
                 "", f"{machine.get('gpu', 'no GPU')}, {machine.get('cpus')} CPUs, torch "
                 f"{machine.get('torch')}, Ray {machine.get('ray')}; shards built in "
                 f"{f.get('shards_s', '-')} s", ""]
        host = f.get("host", {})
        if host.get("aten_calls_per_step"):
            lines += ["Host calls of one eager step (bench_step.py, aten calls; previous path in "
                      "brackets):", "", "| model | batch 32 | batch 128 | optimizer |",
                      "|---|---|---|---|"]
            for model, counts in host["aten_calls_per_step"].items():
                before = host.get("aten_calls_previous", {}).get(model, {})
                lines.append(f"| {model} | {counts.get('32')} ({before.get('32')}) | "
                             f"{counts.get('128')} ({before.get('128')}) | "
                             f"{host.get('optimizer_calls', {}).get(model)} |")
            lines.append("")
        step = f.get("model_step", {})
        if step:
            lines += ["Model step alone (bench_gpu.py, batch %s):" % step.get("batch_size"), "",
                      "| row | model | path | samples/s | GPU busy % | x previous | peak GB |",
                      "|---|---|---|---|---|---|---|"]
            for key, label in (("", "small_cnn 64 px"), ("_resnet18_224", "resnet18 224 px")):
                for model in ("composeae", "tirg"):
                    for path in ("previous", "eager", "compiled"):
                        name = f"{model}{key}" + ("" if path == "eager" else f"_{path}")
                        if f"{name}_samples_per_s" not in step:
                            continue
                        lines.append(
                            f"| {label} | {model} | {path} | {step[f'{name}_samples_per_s']} | "
                            f"{step.get(f'{name}_gpu_busy_pct', '-')} | "
                            f"{step.get(f'{name}_speedup_vs_previous', '-')} | "
                            f"{step.get(f'{name}_peak_mem_gb', '-')} |")
            lines.append("")
        if f.get("end_to_end"):
            lines += ["End to end through Ray Train, one worker, batch "
                      f"{self.sizes.batch_size} (steady state):", "",
                      "| compile | loader workers | samples/s | GPU util % | CPU cores busy | "
                      "samples/s per core | start-up s | wall s |",
                      "|---|---|---|---|---|---|---|---|"]
            for r in f["end_to_end"] + ([f["ddp"]] if f.get("ddp") else []):
                what = r["compile"] + (f", DDP on {r['gpus']} GPUs" if "gpus" in r else "")
                lines.append(f"| {what} | {r['loader_workers']} | "
                             f"{r.get('samples_per_s', 'failed')} | "
                             f"{r.get('gpu_util_pct', '-')} | {r.get('cpu_cores_busy', '-')} | "
                             f"{r.get('samples_per_s_per_core', '-')} | "
                             f"{r.get('startup_s', '-')} | {r['wall_s']} |")
            lines.append("")
            for r in f["end_to_end"]:
                if r.get("startup_phases_s"):
                    lines.append(f"Start-up ({r['compile']}): " + ", ".join(
                        f"{k} {v} s" for k, v in r["startup_phases_s"].items()))
            if f.get("ddp", {}).get("scaling_efficiency"):
                lines.append(f"DDP scaling efficiency: {f['ddp']['scaling_efficiency']}")
            lines.append("")
        if f.get("sweep"):
            lines += [f"Sweep of {self.sizes.sweep_trials} short trials:", "",
                      "| trials per GPU | at once | wall s | trials per hour |", "|---|---|---|---|"]
            for per_gpu, r in f["sweep"].items():
                lines.append(f"| {per_gpu} | {r['at_once']} | {r['wall_s']} | "
                             f"{r['trials_per_hour'] if r['finished'] else 'failed'} |")
            lines.append("")
        if f.get("quality"):
            lines += [f"Quality on CSS-synth {self.sizes.preset}, {f['quality_steps']} steps each "
                      f"(R@1 %):", "", "| model | val R@1 by step | test R@1 | wall s |",
                      "|---|---|---|---|"]
            for model, r in f["quality"].items():
                val = ", ".join(f"{s}: {v}" for s, v in r["val_R@1"].items()) or "-"
                test = r["test_R@1"] if r["test_R@1"] is not None else "not reached"
                lines.append(f"| {model} | {val} | {test} | {r['wall_s']} |")
            lines.append("")
        lines.append(f"Total {time.monotonic() - self.start:.0f} s; "
                     f"{'failed: ' + ', '.join(self.failed) if self.failed else 'every phase finished'}.")
        return "\n".join(lines)

    def main(self) -> int:
        try:
            if not self.environment():
                self.failed.append("environment")
                return self.finish()
            self.start_ray()
            data = self.shards()
            if not (Path(data) / "manifest.json").exists():
                return self.finish()
            phases = self.args.phases
            if "host" in phases:
                self.host()
            if "bench_gpu" in phases:
                self.bench_gpu()
            best = self.end_to_end(data) if "e2e" in phases else None
            if "ddp" in phases:
                self.ddp(data, best)
            if "sweep" in phases:
                self.sweep(data)
            if "quality" in phases:
                if best is None and not self.args.quality_steps:
                    self.failed.append("quality")
                else:
                    self.quality(data, best)
            return self.finish()
        finally:
            self.sampler.close()

    def finish(self) -> int:
        import ray

        # Ray's warnings reach this process asynchronously (e.g. the raylet's note on many worker
        # processes after a sweep of fractional trials): shut it down first, so the figures'
        # JSON stays the last line printed.
        if ray.is_initialized():
            ray.shutdown()
        self.figures["total_s"] = round(time.monotonic() - self.start, 1)
        self.figures["failed"] = self.failed
        text = self.table()
        (self.out / "summary.md").write_text(text + "\n")
        (self.out / "summary.json").write_text(json.dumps(self.figures, indent=1) + "\n")
        self.say(text)
        self.log.close()
        print(json.dumps(self.figures))
        return 1 if self.failed else 0


PROGRESS = re.compile(r"\bstep \d+/\d+ .*samples/s")
"""A training progress line of rank 0 (composeae's worker loop)."""


def read_run(run_dir: Path) -> dict[str, Any]:
    """metrics.json and the history of the latest checkpoint of a run directory (a run killed
    before its end has no metrics.json but its checkpoints' histories)."""
    out: dict[str, Any] = {}
    metrics = run_dir / "metrics.json"
    if metrics.exists():
        out["metrics"] = json.loads(metrics.read_text())
    histories = sorted(run_dir.glob("*/history.json"), key=lambda p: p.stat().st_mtime)
    if histories:
        out["history"] = json.loads(histories[-1].read_text())
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return Suite(args).main()


if __name__ == "__main__":
    sys.exit(main())
