"""A checkpoint of a randomly initialised model for the tests and benchmarks of what reads
checkpoints (the gallery index, search, the service): real files, no training."""

from __future__ import annotations

from pathlib import Path

import torch

from composeae.checkpoint import checkpoint_state, save_checkpoint
from composeae.config import load_config
from composeae.data.shardset import load_corpus
from composeae.models import create_model
from composeae.models.text import build_tokenizer

TINY = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "tiny.yaml"


def random_checkpoint(data_url: str, directory: Path, seed: int = 0,
                      overrides: tuple[str, ...] = ()) -> str:
    """A tiny ComposeAE (jobs/configs/tiny.yaml with `overrides`, weights from `seed`) saved in
    `directory`; its config names `data_url`, whose corpus gives the vocabulary. Returns the
    directory."""
    cfg = load_config(str(TINY), [f"data.url={data_url}", *overrides])
    tokenizer = build_tokenizer(cfg.model.text_encoder, load_corpus(cfg.data),
                                bert_path=cfg.model.bert_path,
                                vocab_size=cfg.model.bert_vocab_size)
    torch.manual_seed(seed)
    model = create_model(cfg.model, cfg.loss, tokenizer)
    save_checkpoint(Path(directory) / "model.pt", checkpoint_state(model, cfg))
    return str(directory)
