"""`train.compile`: the model and its loss under `torch.compile`, and its recompilations watched.

What belongs here: turning a built model into the one a worker trains (compiled or not,
channels-last on CUDA), telling the compiler which input sizes vary, and counting compilations.

The model is compiled in place (`nn.Module.compile`): its `state_dict` keys are the eager
model's (no `_orig_mod.` prefix), so checkpoints of compiled and eager runs are interchangeable,
and DDP wraps it as it wraps an eager one. Only `forward` (the training losses) is compiled;
evaluation calls `compose`/`embed_target`, which stay eager, so evaluation's uneven last batches
cause no recompilation. Training batches are always full; the token rows' width (the batch's
longest modifier) varies, and `dynamic_text` marks it dynamic before every step, so one graph
serves every width: after the first step a compilation means a guard failed (a recompilation),
which the worker reports. (Padding every row to `model.max_text_len` instead made the eager
LSTM between the compiled regions run over 32 steps instead of about 12: measured on CPU, the
compiled step was then 0.88x eager's; with the width dynamic it is faster than eager.)

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


def dynamic_text(tokens) -> None:
    """Mark the width of a batch's `Tokens` (B, T) dynamic for the compiler: a new T then
    reuses the graph instead of compiling another (and, after two, one with T symbolic)."""
    from torch._dynamo import mark_dynamic  # deferred: only compiled runs need Dynamo

    mark_dynamic(tokens.ids, 1)
    mark_dynamic(tokens.mask, 1)


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
