"""Checkpoints are self-describing, load with weights_only=True and reproduce outputs exactly."""

from __future__ import annotations

import pytest
import torch

from composeae.checkpoint import checkpoint_state, load_checkpoint, save_checkpoint
from composeae.run.build import model_from_checkpoint
from composeae.config import Config, replace
from composeae.errors import UserError
from composeae.models.text import build_tokenizer
from composeae.models.zoo import create_model

CORPUS = ["add a red circle", "remove the blue square", "make it small"]


@pytest.mark.parametrize("text_encoder", ["lstm", "bert"])
def test_round_trip_gives_identical_outputs(tmp_path, text_encoder):
    cfg = replace(Config(), model={"name": "composeae", "embed_dim": 16, "image_dim": 16,
                                   "text_dim": 16, "word_dim": 8, "text_encoder": text_encoder,
                                   "bert_hidden": 16, "bert_heads": 2, "bert_layers": 1})
    tok = build_tokenizer(text_encoder, CORPUS * 4, vocab_size=80)
    torch.manual_seed(0)
    model = create_model(cfg.model, cfg.loss, tok)
    model.train()
    model(torch.randn(4, 3, 32, 32), CORPUS + CORPUS[:1], torch.randn(4, 3, 32, 32))  # move BN stats
    model.eval()
    path = tmp_path / "run" / "model.pt"
    save_checkpoint(path, checkpoint_state(model, cfg, train_state={"step": 3}))
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temporary left behind

    state = load_checkpoint(str(path.parent))
    assert state["model_name"] == "composeae" and state["train_state"] == {"step": 3}
    restored, restored_cfg = model_from_checkpoint(state)
    assert restored_cfg == cfg
    images, texts = torch.randn(3, 3, 32, 32), ["add a red circle", "unseen words here", ""]
    with torch.no_grad():
        assert torch.equal(model.compose(images, texts), restored.compose(images, texts))
        assert torch.equal(model.embed_target(images), restored.embed_target(images))


def test_missing_and_foreign_checkpoints(tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        load_checkpoint(str(tmp_path / "absent"))
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a composeae checkpoint"):
        load_checkpoint(str(tmp_path / "other.pt"))
