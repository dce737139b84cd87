"""`train.compile`: the model and its loss under `torch.compile`, and its recompilations watched.

What belongs here: turning a built model into the one a worker trains (compiled or not,
channels-last on CUDA), the token width a compiled model is fed, and counting compilations.

The model is compiled in place (`nn.Module.compile`): its `state_dict` keys are the eager
model's (no `_orig_mod.` prefix), so checkpoints of compiled and eager runs are interchangeable,
and DDP wraps it as it wraps an eager one. Only `forward` (the training losses) is compiled;
evaluation calls `compose`/`embed_target`, which stay eager, so evaluation's uneven last batches
cause no recompilation. A compiled model is fed token rows of one width (`model.max_text_len`)
and training batches are always full, so its input shapes never change: after the first step a
compilation means a guard failed (a recompilation), which the worker reports.

The LSTM text encoder is a graph break (Dynamo does not trace RNNs): it runs eagerly between
compiled regions. `reduce-overhead` records CUDA graphs and is refused without a GPU
(`composeae.config.validate`).
"""

from __future__ import annotations

import torch
from torch import nn

from composeae.config import Config


def prepare_for_device(model: nn.Module, cfg: Config, device: torch.device) -> nn.Module:
    """Channels-last image encoder on CUDA (the layout its convolutions run fastest in, and the
    one `composeae.data.device` hands images in), then `train.compile`; returns `model`."""
    if device.type == "cuda":
        model.image_encoder.to(memory_format=torch.channels_last)
    if cfg.train.compile != "none":
        model.compile(mode=None if cfg.train.compile == "default" else cfg.train.compile)
    return model


def token_width(cfg: Config) -> int | None:
    """Token row width fed to the model: fixed when compiled (one shape), else bucketed."""
    return cfg.model.max_text_len if cfg.train.compile != "none" else None


def compilations() -> int:
    """Frames Dynamo has compiled in this process so far (0 when nothing was compiled)."""
    from torch._dynamo.utils import counters  # deferred: only compiled runs read it

    return int(counters["frames"]["ok"])


class CompileWatch:
    """Counts compilations after the first step (recompilations) of a compiled model.

    `step()` after every optimizer step returns a console line when the count changed, else
    None; `summary()` is the record for `metrics.json`."""

    def __init__(self, mode: str):
        self.mode = mode
        self.first: int | None = None
        self.recompiles = 0
        self.first_step_s: float | None = None

    def step(self, seconds: float) -> str | None:
        if self.mode == "none":
            return None
        if self.first is None:
            self.first, self.first_step_s = compilations(), seconds
            return (f"compiled ({self.mode}): {self.first} graph(s) in the first step, "
                    f"{seconds:.1f} s")
        count = compilations() - self.first
        if count == self.recompiles:
            return None
        self.recompiles = count
        return (f"recompiled: {count} compilation(s) since the first step (TORCH_LOGS=recompiles "
                f"says why)")

    def summary(self) -> dict:
        return {"mode": self.mode, "graphs": self.first or 0, "recompiles": self.recompiles,
                "first_step_s": self.first_step_s}
