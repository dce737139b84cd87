"""Models and tokenizers built on this node, from a config whose files may live in object storage.

What belongs here: the one step between a config and the pure models of `composeae.models`. A
config names `model.image_weights` and `model.bert_path` as local paths or `s3://` URLs; the
models open only local paths. So every place that builds a model or tokenizer for a run (the
workers, the driver's tokenizer, a loaded checkpoint) comes through here, and each `s3://` URL
becomes the node's cached copy (`composeae.run.nodefiles.resolve_local`, fetched once per node).
The config kept in a checkpoint still names the URL, not this node's copy.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

from torch import nn

from composeae import models
from composeae.config import Config, LossConfig, ModelConfig, config_from_dict, replace
from composeae.models import text
from composeae.run.nodefiles import resolve_local


def local_model_config(model_cfg: ModelConfig) -> ModelConfig:
    """`model_cfg` with its weight file and BERT directory as paths on this node."""
    files = {key: resolve_local(value, f"model.{key}")
             for key, value in (("image_weights", model_cfg.image_weights),
                                ("bert_path", model_cfg.bert_path)) if value}
    return dataclasses.replace(model_cfg, **files)


def create_model(model_cfg: ModelConfig, loss_cfg: LossConfig,
                 tokenizer: text.TextTokenizer) -> nn.Module:
    """`composeae.models.create_model` with the model's files resolved on this node."""
    return models.create_model(local_model_config(model_cfg), loss_cfg, tokenizer)


def build_tokenizer(text_encoder: str, corpus: Iterable[str], *, bert_path: str | None = None,
                    vocab_size: int = 2000) -> text.TextTokenizer:
    """`composeae.models.text.build_tokenizer` with `bert_path` resolved on this node."""
    local = resolve_local(bert_path, "model.bert_path") if bert_path else None
    return text.build_tokenizer(text_encoder, corpus, bert_path=local, vocab_size=vocab_size)


def model_from_checkpoint(state: dict[str, Any]) -> tuple[nn.Module, Config]:
    """Rebuild the model (eval mode, CPU) and its config from a loaded checkpoint."""
    cfg = config_from_dict(state["config"])
    # The backbone's initial weights file is not needed: the checkpoint holds trained weights.
    build = replace(cfg, model={"image_weights": None})
    model = create_model(build.model, build.loss, text.tokenizer_from_state(state["tokenizer"]))
    model.load_state_dict(state["model"])
    return model.eval(), cfg
