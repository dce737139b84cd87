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
