"""GPU training throughput of ComposeAE and TIRG on one CUDA GPU, measured side by side.

Each step is what one rank of a cluster run does (composeae/train.py): pinned host batches
copied with non_blocking=True, forward under bf16 autocast through a DDP-wrapped model whose
gradients are all-reduced over NCCL (a process group of one rank, so the collectives run but
wait for no peer), backward, optimizer step. The data plane is left out: batches are random
tensors held in pinned memory, and the modifier texts are short CSS-like sentences tokenized by
the model itself, as in training.

Rows, each for ComposeAE and TIRG from the model registry:
  small_cnn 64 px   + LSTM   the CSS-synth setting (jobs/configs/css-synth-full.yaml)
  resnet18 224 px   + LSTM   the real-photo setting (Fashion200k, MIT-States, ...)
Columns: samples/s, ms/step, peak GPU memory; then ComposeAE / TIRG throughput per row.

    python bench/bench_gpu.py [--steps 30] [--warmup 5] [--batch-size 64]

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


def host_batches(batch_size: int, image_size: int, pin: bool,
                 rng: random.Random) -> list[tuple[torch.Tensor, list[str], torch.Tensor]]:
    """{reference, modifier, target} batches in host memory, pinned when a GPU will read them."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(HOST_BATCHES):
        reference, target = (torch.rand(batch_size, 3, image_size, image_size, generator=generator)
                             for _ in range(2))
        if pin:
            reference, target = reference.pin_memory(), target.pin_memory()
        batches.append({"reference": reference, "modifier": modifier_texts(batch_size, rng),
                        "target": target})
    return batches


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


def build(model_name: str, row: Row, tokenizer, device: torch.device, steps: int):
    """The registry's model with the project's default sizes, DDP-wrapped, its optimizer and
    schedule, and the config the production step reads (precision `auto`: bf16 on GPU)."""
    from torch.nn.parallel import DistributedDataParallel

    from composeae.config import load_config
    from composeae.optim import build_optimizer, build_scheduler
    from composeae.models.zoo import create_model

    # The optimizer css-synth-full.yaml trains with; its groups come from the unwrapped model.
    cfg = load_config(None, [f"model.name={model_name}", f"model.image_encoder={row.image_encoder}",
                             "optim.name=adam", "optim.lr=0.001", "optim.backbone_lr_mult=1.0",
                             "optim.weight_decay=0.0", "optim.schedule=constant",
                             "train.precision=auto", "data.text_mode=modifier"])
    torch.manual_seed(0)
    model = create_model(cfg.model, cfg.loss, tokenizer).to(device)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, steps)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return ddp, optimizer, scheduler, cfg


def measure(model_name: str, row: Row, batches, tokenizer, device: torch.device,
            args: argparse.Namespace) -> dict[str, float]:
    cuda = device.type == "cuda"
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    from composeae.run.worker import train_step  # the step every rank of a training run takes

    model, optimizer, scheduler, cfg = build(model_name, row, tokenizer, device,
                                             args.warmup + args.steps)
    model.train()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    loss = None
    for step in range(args.warmup):
        loss = train_step(model, optimizer, scheduler, batches[step % len(batches)], cfg,
                          device)["loss"]
    sync()
    start = time.perf_counter()
    for step in range(args.steps):
        loss = train_step(model, optimizer, scheduler, batches[step % len(batches)], cfg,
                          device)["loss"]
    sync()
    elapsed = time.perf_counter() - start
    final_loss = float(loss)
    if not math.isfinite(final_loss):
        raise RuntimeError(f"{model_name} {row.label}: loss became {final_loss}")
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
    del model, optimizer, scheduler
    return {"samples_per_s": args.steps * args.batch_size / elapsed,
            "ms_per_step": 1000 * elapsed / args.steps, "peak_mem_gb": peak, "loss": final_loss}


# -- report ----------------------------------------------------------------------------------

def report(results: dict[tuple[str, str], dict], errors: dict[tuple[str, str], str],
           header: str) -> None:
    print(header)
    print(f"{'row':<16} {'model':<10} {'samples/s':>10} {'ms/step':>9} {'peak GB':>8}")
    for row in ROWS:
        for model in MODELS:
            r = results.get((row.key, model))
            if r is None:
                print(f"{row.label:<16} {model:<10} {'failed: ' + errors[(row.key, model)]}")
                continue
            peak = f"{r['peak_mem_gb']:.2f}" if math.isfinite(r["peak_mem_gb"]) else "-"
            print(f"{row.label:<16} {model:<10} {r['samples_per_s']:>10.1f} "
                  f"{r['ms_per_step']:>9.2f} {peak:>8}")
    for row in ROWS:
        a, b = results.get((row.key, "composeae")), results.get((row.key, "tirg"))
        if a and b:
            print(f"composeae / tirg throughput, {row.label}: "
                  f"{a['samples_per_s'] / b['samples_per_s']:.2f}")


def figures(results: dict[tuple[str, str], dict]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for (key, model), r in results.items():
        out[f"{model}{key}_samples_per_s"] = round(r["samples_per_s"], 1)
        if math.isfinite(r["peak_mem_gb"]):
            out[f"{model}{key}_peak_mem_gb"] = round(r["peak_mem_gb"], 3)
    for row in ROWS:
        a, b = results.get((row.key, "composeae")), results.get((row.key, "tirg"))
        if a and b:
            out[f"composeae_to_tirg{row.key}"] = round(a["samples_per_s"] / b["samples_per_s"], 3)
    peaks = [r["peak_mem_gb"] for r in results.values() if math.isfinite(r["peak_mem_gb"])]
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
    results: dict[tuple[str, str], dict] = {}
    errors: dict[tuple[str, str], str] = {}
    try:
        for row in ROWS:
            batches = host_batches(args.batch_size, row.image_size, pin=cuda, rng=rng)
            for model in MODELS:
                try:
                    results[(row.key, model)] = measure(model, row, batches, tokenizer, device,
                                                        args)
                except torch.cuda.OutOfMemoryError:
                    errors[(row.key, model)] = f"out of memory at batch {args.batch_size}"
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
        summary["failed"] = sorted(f"{model}{key or '_small_cnn_64'}" for key, model in errors)
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
