"""Every registered model: forward/backward at several batch sizes, shared interface, ComposeAE math."""

from __future__ import annotations

import math

import pytest
import torch

from composeae.config import Config, replace
from composeae.models.composeae import rotate
from composeae.models.text import WordPieceTokenizer, WordTokenizer, build_tokenizer
from composeae.zoo import create_model, list_models

from fixtures_models import CORPUS, save_tiny_bert

EXPECTED = {"composeae", "tirg", "concat", "realspace_concat_ae", "image_only", "text_only"}


def tiny_config(name: str, **model) -> Config:
    return replace(Config(), model={"name": name, "embed_dim": 32, "image_dim": 32, "text_dim": 24,
                                    "word_dim": 16, **model})


def build(name: str, **model) -> torch.nn.Module:
    cfg = tiny_config(name, **model)
    torch.manual_seed(0)
    return create_model(cfg.model, cfg.loss, WordTokenizer.from_corpus(CORPUS))


def batch(n: int, size: int = 32) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    texts = [CORPUS[i % len(CORPUS)] for i in range(n)]
    return torch.randn(n, 3, size, size, generator=g), texts, torch.randn(n, 3, size, size, generator=g)


def test_zoo_lists_every_model():
    assert EXPECTED <= set(list_models())


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("n", [1, 3, 32, 33, 257])
def test_forward_backward(name: str, n: int):
    model = build(name)
    reference, texts, target = batch(n, size=32 if n < 257 else 16)
    # BatchNorm cannot train on a single sample; batch 1 is the inference path.
    model.train(n > 1)
    terms = model(reference, texts, target)
    assert set(terms) >= {"loss", "base"}
    assert all(torch.isfinite(v) for v in terms.values())
    terms["loss"].backward()
    grads = [p.grad for p in model.image_encoder.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    if n == 1:
        return  # one sample has no negatives: the base loss is constant
    assert any(g.abs().sum() > 0 for g in grads)
    if model.text_encoder is not None:
        text_grads = [p.grad for p in model.text_encoder.parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in text_grads)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_query_and_target_embeddings_share_a_space(name: str):
    model = build(name).eval()
    reference, texts, target = batch(5)
    with torch.no_grad():
        query, gallery = model.compose(reference, texts), model.embed_target(target)
    assert query.shape == gallery.shape == (5, 32)


def test_loss_terms_follow_the_paper_weights():
    model = build("composeae").train()
    terms = model(*batch(8))
    assert set(terms) == {"loss", "base", "img_rec", "txt_rec", "sym"}
    expected = terms["base"] + 0.1 * terms["img_rec"] + 0.1 * terms["txt_rec"] + 0.01 * terms["sym"]
    assert torch.allclose(terms["loss"], expected)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_model_returns_the_terms_it_declares(name: str):
    model = build(name).train()
    terms = model(*batch(4))
    assert set(terms) - {"loss"} == set(model.loss_terms)
    # Term `t` is weighted by `loss.w_<t>`: nothing else names the terms.
    assert model.loss_weights == {t: getattr(model.loss_cfg, f"w_{t}") for t in model.loss_terms}


def test_conjugate_is_rotation_by_minus_delta():
    g = torch.Generator().manual_seed(1)
    x, delta = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g) * 3
    re, im = rotate(x, delta)
    re_c, im_c = rotate(x, delta, conjugate=True)
    z = torch.complex(re, im)
    # The conjugate composition is x * exp(-i delta) ...
    assert torch.allclose(torch.complex(re_c, im_c), x * torch.exp(-1j * delta), atol=1e-6)
    # ... the complex conjugate of x * exp(i delta), and it undoes the rotation.
    assert torch.allclose(torch.complex(re_c, im_c), z.conj(), atol=1e-6)
    assert torch.allclose((z * torch.exp(-1j * delta)).real, x, atol=1e-5)


def test_composeae_alpha_starts_at_paper_values():
    model = build("composeae")
    assert model.a.tolist() == [1.0, 10.0]  # theta = 10 rho + 1 rho_conv at init
    assert math.isclose(model.scale.item(), 4.0)


def test_frozen_text_encoder_gets_no_gradient():
    model = build("tirg", freeze_text=True).train()
    model(*batch(4))["loss"].backward()
    assert all(p.grad is None for p in model.text_encoder.parameters())
    assert not model.text_encoder.encoder.training  # dropout off in a frozen encoder


def test_scratch_bert_text_encoder():
    tok = build_tokenizer("bert", CORPUS * 5, vocab_size=120)
    assert isinstance(tok, WordPieceTokenizer)
    cfg = tiny_config("composeae", text_encoder="bert", bert_hidden=16, bert_heads=2, bert_layers=1)
    model = create_model(cfg.model, cfg.loss, tok).train()
    model(*batch(4))["loss"].backward()
    assert model.text_encoder.encoder.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_pretrained_bert_from_local_directory(tmp_path):
    # A tiny "pretrained" BERT saved with save_pretrained, as a user's local directory would be.
    saved = save_tiny_bert(tmp_path)

    cfg = tiny_config("tirg", text_encoder="bert", bert_path=str(tmp_path), text_dim=16)
    tokenizer = build_tokenizer("bert", [], bert_path=str(tmp_path))
    model = create_model(cfg.model, cfg.loss, tokenizer)
    loaded = model.text_encoder.encoder.bert
    assert torch.equal(loaded.embeddings.word_embeddings.weight, saved.embeddings.word_embeddings.weight)
    assert tokenizer.encode(["add a red circle"], 8)[0].shape[1] >= 3


def test_resnet_weights_from_local_file(tmp_path):
    import torchvision

    torch.manual_seed(5)
    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = build("tirg", image_encoder="resnet18", image_weights=str(path))
    assert torch.equal(model.image_encoder.backbone.conv1.weight, source.conv1.weight)
    assert model.embed_target(torch.randn(2, 3, 64, 64)).shape == (2, 32)
