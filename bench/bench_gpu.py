"""GPU training throughput of ComposeAE and TIRG on one CUDA GPU, measured side by side.

Each step is what one rank of a cluster run does (`composeae.run.worker`): forward under bf16
autocast through a DDP-wrapped model whose gradients are all-reduced over NCCL (a process group
of one rank, so the collectives run but wait for no peer), backward, optimizer step. The data
plane is left out: batches are random images held in host memory as the loader hands them.
Three paths, side by side in one run:

  previous   float32 images pinned on the host, the modifier strings tokenised by the model
             inside the step, Adam for-each (the trainer before the loader made tokens)
  eager      uint8 images and loader-made token ids, pinned, copied one batch ahead on a side
             stream and normalised on the GPU (`composeae.data.device`), channels-last, fused Adam
  compiled   the eager path with `train.compile=--compile` (ComposeAE only: the compile takes
             a minute or two per row)

Rows, each for ComposeAE and TIRG from the model registry:
  small_cnn 64 px   + LSTM   the CSS-synth setting (jobs/configs/css-synth-full.yaml)
  resnet18 224 px   + LSTM   the real-photo setting (Fashion200k, MIT-States, ...)
Columns: samples/s, ms/step, GPU busy % (the share of the timed steps' wall time in which a
kernel ran, from torch.profiler's CUDA activity), peak GPU memory, speed-up over `previous`.

    python bench/bench_gpu.py [--steps 30] [--warmup 5] [--batch-size 64] [--compile MODE]

Without a CUDA GPU it says so, measures nothing and prints {"bench": "gpu", "cuda": false};
`--cpu-smoke` instead runs the same code on CPU (gloo, fp32) to check the script itself, whose
figures say nothing about a GPU. The last line is always one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Row:
    key: str
    """Suffix of this row's JSON keys ("" for the headline 64 px row)."""
    label: str
    image_encoder: str
    image_size: int


ROWS = [
    Row("", "small_cnn 64px", "small_cnn", 64),
    Row("_resnet18_224", "resnet18 224px", "resnet18", 224),
]
MODELS = ["composeae", "tirg"]
HOST_BATCHES = 4
"""Distinct pinned batches cycled through, so no step reuses the previous step's input."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per row (default 30)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed steps first: cuDNN/NCCL set-up, allocator growth (default 5)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch per step (default 64)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="no GPU: run the same code on CPU (gloo, fp32) to check the script")
    parser.add_argument("--compile", default="reduce-overhead",
                        choices=["none", "default", "reduce-overhead", "max-autotune"],
                        help="train.compile of the compiled path (default reduce-overhead; "
                             "none leaves the path out; on CPU reduce-overhead becomes default)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 2:
        parser.error("need --steps >= 1, --warmup >= 0 and --batch-size >= 2 "
                     "(batch-norm layers need two samples)")
    return args


# -- inputs ----------------------------------------------------------------------------------

_SHAPES, _COLORS = ["circle", "square", "triangle"], ["red", "green", "blue", "yellow", "purple",
                                                       "cyan", "gray", "brown"]
_PLACES = ["top-left", "top-center", "top-right", "middle-left", "center", "middle-right",
           "bottom-left", "bottom-center", "bottom-right"]


def modifier_texts(count: int, rng: random.Random) -> list[str]:
    """CSS-like modification texts: the LSTM's input has the length and vocabulary of training."""
    texts = []
    for _ in range(count):
        shape, color, place = rng.choice(_SHAPES), rng.choice(_COLORS), rng.choice(_PLACES)
        texts.append(rng.choice([
            f"add a {rng.choice(['small', 'large'])} {color} {shape} to the {place}",
            f"remove the {color} {shape}",
            f"make the {shape} at the {place} {color}",
            f"change the {color} {shape} into a {rng.choice(_SHAPES)}",
        ]))
    return texts


def host_batches(batch_size: int, image_size: int,
                 rng: random.Random) -> list[dict[str, Any]]:
    """{reference, modifier, target} batches in host memory as the loader hands them: uint8
    images (B, S, S, 3) and the modifier strings (tokenised per path by `for_path`)."""
    generator = torch.Generator().manual_seed(0)
    return [{"reference": torch.randint(0, 256, (batch_size, image_size, image_size, 3),
                                        dtype=torch.uint8, generator=generator),
             "target": torch.randint(0, 256, (batch_size, image_size, image_size, 3),
                                     dtype=torch.uint8, generator=generator),
             "modifier": modifier_texts(batch_size, rng)} for _ in range(HOST_BATCHES)]


def for_path(batches: list[dict[str, Any]], path: str, model,
             pin: bool) -> list[dict[str, Any]]:
    """The batches one path starts from: `previous` float32 images (normalised on the host,
    pinned) and strings; the others uint8 images and token ids (what the loader makes)."""
    from composeae.data.decode import normalise

    out = []
    for batch in batches:
        if path == "previous":
            images = {k: normalise(batch[k]) for k in ("reference", "target")}
            if pin:
                images = {k: v.pin_memory() for k, v in images.items()}
            out.append({**images, "modifier": batch["modifier"]})
        else:
            out.append({**batch, "tokens": model.tokenize_fn()(batch["modifier"])})
    return out


def gpu_busy_pct(step, steps: int) -> float | None:
    """The share (%) of `steps` calls of `step` in which a CUDA kernel ran: the union of the
    kernels' intervals in torch.profiler's CUDA activity over the wall time."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - start) * 1e6
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, end = 0.0, float("-inf")
    for a, b in spans:
        if b > end:
            busy += b - max(a, end)
            end = b
    return 100.0 * busy / wall_us if spans else None


# -- one rank of DDP -------------------------------------------------------------------------

def init_process_group(cuda: bool) -> str:
    import torch.distributed as dist

    from composeae.testing.localcluster import free_port

    backend = "nccl" if cuda else "gloo"
    # device_id binds the NCCL communicator to GPU 0 up front (no device guessing at first use).
    extra = {"device_id": torch.device("cuda", 0)} if cuda else {}
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1, **extra)
    return backend


def build(model_name: str, row: Row, tokenizer, device: torch.device, steps: int, path: str,
          compile_mode: str):
    """The registry's model with the project's default sizes as a worker prepares it for
    `path`, DDP-wrapped, its optimizer and schedule, and the config the production step reads
    (precision `auto`: bf16 on GPU)."""
    from torch.nn.parallel import DistributedDataParallel

    from composeae.config import load_config
    from composeae.optim import build_optimizer, build_scheduler
    from composeae.models.zoo import create_model
    from composeae.run.compiling import prepare_for_device

    # The optimizer css-synth-full.yaml trains with; its groups come from the unwrapped model.
    mode = compile_mode if path == "compiled" else "none"
    cfg = load_config(None, [f"model.name={model_name}", f"model.image_encoder={row.image_encoder}",
                             "optim.name=adam", "optim.lr=0.001", "optim.backbone_lr_mult=1.0",
                             "optim.weight_decay=0.0", "optim.schedule=constant",
                             "train.precision=auto", "data.text_mode=modifier",
                             f"train.compile={mode}", f"ray.use_gpu={device.type == 'cuda'}"])
    torch.manual_seed(0)
    model = create_model(cfg.model, cfg.loss, tokenizer)
    if path != "previous":
        model = prepare_for_device(model, cfg, device)
    model = model.to(device)
    if path == "previous":  # Adam one tensor group at a time (for-each), as before
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                                     lr=cfg.optim.lr, fused=False)
    else:
        optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, steps)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return ddp, optimizer, scheduler, cfg


def measure(model_name: str, row: Row, batches, tokenizer, device: torch.device,
            args: argparse.Namespace, path: str) -> dict[str, float]:
    import itertools

    from composeae.data.device import device_batches
    from composeae.run.worker import train_step  # the step every rank of a training run takes

    cuda = device.type == "cuda"
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    compile_mode = args.compile if cuda or args.compile != "reduce-overhead" else "default"
    model, optimizer, scheduler, cfg = build(model_name, row, tokenizer, device,
                                             2 * args.warmup + 2 * args.steps, path, compile_mode)
    model.train()
    host = for_path(batches, path, model.module, pin=cuda)
    # `previous` hands host batches to the step (it copies them); the others go through the
    # trainer's feed (pinned, copied ahead on a side stream, normalised on the device).
    feed = iter(itertools.cycle(host)) if path == "previous" else \
        device_batches(itertools.cycle(host), device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    losses = []

    def step():
        losses.append(train_step(model, optimizer, scheduler, next(feed), cfg, device)["loss"])

    start = time.perf_counter()
    step()
    sync()
    first_step_s = time.perf_counter() - start
    for _ in range(args.warmup - 1):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    elapsed = time.perf_counter() - start
    busy = gpu_busy_pct(step, min(args.steps, 10)) if cuda else None
    final_loss = float(losses[-1])
    if not math.isfinite(final_loss):
        raise RuntimeError(f"{model_name} {row.label} {path}: loss became {final_loss}")
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
    del model, optimizer, scheduler, feed
    return {"samples_per_s": args.steps * args.batch_size / elapsed,
            "ms_per_step": 1000 * elapsed / args.steps, "peak_mem_gb": peak, "loss": final_loss,
            "gpu_busy_pct": busy, "first_step_s": first_step_s}


# -- report ----------------------------------------------------------------------------------

PATHS = ("previous", "eager", "compiled")


def _paths(model: str, args: argparse.Namespace) -> tuple[str, ...]:
    """The paths measured for `model`: compiled for ComposeAE only (each compile takes minutes)."""
    return tuple(p for p in PATHS
                 if p != "compiled" or (model == "composeae" and args.compile != "none"))


def report(results: dict[tuple[str, str, str], dict], errors: dict[tuple[str, str, str], str],
           header: str) -> None:
    print(header)
    print(f"{'row':<16} {'model':<10} {'path':<9} {'samples/s':>10} {'ms/step':>9} {'GPU busy':>8} "
          f"{'peak GB':>8} {'vs previous':>11}")
    for (key, model, path), r in results.items():
        label = next(row.label for row in ROWS if row.key == key)
        if r is None:
            print(f"{label:<16} {model:<10} {path:<9} failed: {errors[(key, model, path)]}")
            continue
        peak = f"{r['peak_mem_gb']:.2f}" if math.isfinite(r["peak_mem_gb"]) else "-"
        busy = f"{r['gpu_busy_pct']:.0f}%" if r["gpu_busy_pct"] is not None else "-"
        before = results.get((key, model, "previous"))
        ratio = f"{r['samples_per_s'] / before['samples_per_s']:.2f}x" if before else "-"
        print(f"{label:<16} {model:<10} {path:<9} {r['samples_per_s']:>10.1f} "
              f"{r['ms_per_step']:>9.2f} {busy:>8} {peak:>8} {ratio:>11}")
    for (key, model, path), r in results.items():
        if path == "compiled" and r:
            print(f"{model} {key or '_small_cnn_64'}: first compiled step {r['first_step_s']:.1f} s")


def figures(results: dict[tuple[str, str, str], dict]) -> dict[str, Any]:
    """JSON keys `<model><row>_<figure>` for the eager path (the trainer's), and
    `<model><row>_<path>_<figure>` for the others."""
    out: dict[str, Any] = {}
    for (key, model, path), r in results.items():
        if r is None:
            continue
        name = f"{model}{key}" + ("" if path == "eager" else f"_{path}")
        out[f"{name}_samples_per_s"] = round(r["samples_per_s"], 1)
        if r["gpu_busy_pct"] is not None:
            out[f"{name}_gpu_busy_pct"] = round(r["gpu_busy_pct"], 1)
        if math.isfinite(r["peak_mem_gb"]):
            out[f"{name}_peak_mem_gb"] = round(r["peak_mem_gb"], 3)
        before = results.get((key, model, "previous"))
        if path != "previous" and before:
            out[f"{name}_speedup_vs_previous"] = round(
                r["samples_per_s"] / before["samples_per_s"], 3)
        if path == "compiled":
            out[f"{name}_first_step_s"] = round(r["first_step_s"], 1)
    for row in ROWS:
        a, b = results.get((row.key, "composeae", "eager")), results.get((row.key, "tirg", "eager"))
        if a and b:
            out[f"composeae_to_tirg{row.key}"] = round(a["samples_per_s"] / b["samples_per_s"], 3)
    peaks = [r["peak_mem_gb"] for r in results.values() if r and math.isfinite(r["peak_mem_gb"])]
    if peaks:
        out["peak_mem_gb"] = round(max(peaks), 3)
    return out


def device_matches_cpu(device: torch.device) -> dict[str, bool]:
    """The GPU paths of the soft triplet loss (sparse kernels) and of recall@K agree with the
    CPU on the same inputs: checks that the CPU-only test suite cannot make."""
    from composeae.losses import sample_soft_triplets, soft_triplet_loss
    from composeae.metrics import first_hit_rank

    g = torch.Generator().manual_seed(0)
    query, target = torch.randn(64, 128, generator=g), torch.randn(64, 128, generator=g)
    negatives = sample_soft_triplets(64, generator=g)
    checks = {}
    losses, grads = [], []
    for dev in (torch.device("cpu"), device):
        q = query.to(dev).clone().requires_grad_()
        loss = soft_triplet_loss(q, target.to(dev), negatives=negatives.to(dev))
        loss.backward()
        losses.append(loss.item())
        grads.append(q.grad.cpu())
    checks["soft_triplet"] = (abs(losses[0] - losses[1]) < 1e-4
                              and torch.allclose(grads[0], grads[1], atol=1e-5))
    gallery, labels = torch.randn(500, 128, generator=g), torch.randint(0, 40, (500,), generator=g)
    q_labels = torch.randint(0, 40, (64,), generator=g)
    exclude = torch.randint(-1, 500, (64,), generator=g)
    ranks = [first_hit_rank(query.to(d), gallery.to(d), q_labels.to(d), labels.to(d),
                            exclude=exclude.to(d), chunk_size=7).cpu()
             for d in (torch.device("cpu"), device)]
    checks["recall"] = torch.equal(ranks[0], ranks[1])
    return checks


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch.distributed as dist

    from composeae.models.text import build_tokenizer

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(0)
        device = torch.device("cuda", 0)
        name = torch.cuda.get_device_name(device)
    else:
        device, name = torch.device("cpu"), "cpu (smoke run, not a GPU measurement)"
    backend = init_process_group(cuda)
    rng = random.Random(0)
    tokenizer = build_tokenizer("lstm", modifier_texts(2000, rng))
    results: dict[tuple[str, str, str], dict | None] = {}
    errors: dict[tuple[str, str, str], str] = {}
    try:
        for row in ROWS:
            batches = host_batches(args.batch_size, row.image_size, rng=rng)
            for model in MODELS:
                for path in _paths(model, args):
                    try:
                        results[(row.key, model, path)] = measure(model, row, batches, tokenizer,
                                                                  device, args, path)
                    except torch.cuda.OutOfMemoryError:
                        results[(row.key, model, path)] = None
                        errors[(row.key, model, path)] = f"out of memory at batch {args.batch_size}"
            del batches
    finally:
        dist.destroy_process_group()
    precision = "bf16 autocast" if cuda else "fp32"
    report(results, errors,
           f"Training throughput on {name}: {precision}, DDP over {backend} (1 rank), "
           f"batch {args.batch_size}, {args.steps} timed steps after {args.warmup} warm-up")
    summary: dict[str, Any] = {"bench": "gpu", "cuda": cuda, "device": name,
                               "matches_cpu": device_matches_cpu(device)}
    print(f"GPU results equal CPU results: {summary['matches_cpu']}")
    if not cuda:
        summary["smoke"] = True
    summary |= {"precision": "bf16" if cuda else "fp32", "backend": backend,
                "batch_size": args.batch_size, "steps": args.steps, **figures(results)}
    if errors:
        summary["failed"] = sorted(f"{model}{key or '_small_cnn_64'}_{path}"
                                   for key, model, path in errors)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print(f"No CUDA GPU is available here (torch {torch.__version__}); this benchmark needs "
              f"one, so nothing was measured. (--cpu-smoke checks the script on CPU.)")
        print(json.dumps({"bench": "gpu", "cuda": False}))
        return 0
    try:
        summary = run(args)
    except Exception as exc:  # the last line stays one JSON object, even on failure
        traceback.print_exc()
        print(json.dumps({"bench": "gpu", "cuda": torch.cuda.is_available(),
                          "error": f"{type(exc).__name__}: {exc}"}))
        return 1
    print(json.dumps(summary))
    return 1 if "failed" in summary else 0


if __name__ == "__main__":
    sys.exit(main())
