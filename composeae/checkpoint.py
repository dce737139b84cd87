"""Self-describing checkpoints: everything needed to rebuild a model without its YAML.

A checkpoint is one `torch.save`d dict of plain values (loadable with `weights_only=True`):

    format      CHECKPOINT_FORMAT
    model_name  registered model name
    config      the resolved config tree (plain dict)
    tokenizer   the tokenizer's state (vocabulary / WordPiece JSON)
    model       state dict of the unwrapped model (no `module.` prefixes)
    train_state {"step", "epoch", "samples_seen", ...} when written by training
    optimizer / scheduler   their state dicts when written by training

Files are written under a temporary name and renamed, so a reader never sees half a checkpoint.
What belongs here: the checkpoint dict, writing and reading it. Rebuilding a model from one is
the run layer's (`composeae.run.build.model_from_checkpoint`): a model built with a pretrained
BERT directory (`model.bert_path`, a local path or an `s3://` prefix cached per node) needs that
directory on the node that loads it; it supplies the architecture, the weights come from the
checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from composeae import storage
from composeae.config import Config, config_to_dict
from composeae.distributed import unwrap
from composeae.errors import UserError

CHECKPOINT_FORMAT = 1
MODEL_FILE = "model.pt"


def checkpoint_state(model: nn.Module, cfg: Config, **extra: Any) -> dict[str, Any]:
    """The checkpoint dict of a (possibly DDP-wrapped) registered model, with `extra` entries."""
    model = unwrap(model)
    state = {"format": CHECKPOINT_FORMAT, "model_name": model.registered_name,
             "config": config_to_dict(cfg), "tokenizer": model.tokenizer.state(),
             "model": model.state_dict()}
    state.update(extra)
    return state


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write `state` to a local file atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(url: str, sha256: str | None = None) -> dict[str, Any]:
    """Read a checkpoint file or run checkpoint directory, local or `s3://`; with `sha256`,
    only when its bytes have that digest (`UserError` otherwise)."""
    if not url.endswith(".pt"):
        url = storage.join(url, MODEL_FILE)
    if not storage.exists(url):
        raise UserError(f"no checkpoint at {url}")
    data = storage.read_bytes(url)
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise UserError(f"{url} is not the checkpoint it should be: its sha256 is "
                        f"{hashlib.sha256(data).hexdigest()[:16]}..., not {sha256[:16]}...")
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{url} is not a composeae checkpoint (format {CHECKPOINT_FORMAT})")
    return state
