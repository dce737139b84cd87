"""Distributed helpers shared by the training loop and evaluation: one place for DDP details.

Everything here works the same with and without a process group (a single process is a world of
one), so evaluation code runs unchanged in a test, in `composeae eval` and inside training.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def world_size() -> int:
    """Ranks in the current process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU when asked (or `auto`); plain fp32 otherwise."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (just `[obj]` without a process group)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def rng_state() -> dict[str, torch.Tensor]:
    """This process's torch random state: the CPU generator and, once CUDA is in use, the current
    device's. Dropout, augmentation in the trainer's process and sampled negatives draw from
    them; the data order has seeded generators of its own."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Restore what `rng_state` returned (in the same kind of process: CPU, or one GPU)."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def sync_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics).

    DDP broadcasts buffers at the start of each forward, so after the last training step each
    rank holds the statistics its own batch updated. Evaluation embeds a different slice on
    every rank and the checkpoint is rank 0's: without this, ranks would embed with statistics
    other than the saved ones and the reported recall would not match the checkpoint's.
    """
    if world_size() > 1:
        for buffer in unwrap(model).buffers():
            dist.broadcast(buffer, src=0)
