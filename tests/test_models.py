"""Every registered model: forward/backward at several batch sizes, shared interface, ComposeAE math."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from composeae.config import Config, replace
from composeae.models.composeae import REAL_POOLED, rotate
from composeae.models.text import WordPieceTokenizer, WordTokenizer, build_tokenizer
from composeae.models.zoo import create_model, list_models

from fixtures_models import CORPUS, save_tiny_bert

EXPECTED = {"composeae", "composeae_angle_to_rho", "tirg", "concat", "realspace_concat_ae",
            "realspace_projected_ae", "image_only", "text_only"}


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


@pytest.mark.parametrize("name", ["composeae", "realspace_concat_ae", "tirg"])
def test_a_init_sets_the_main_branch_weight(name: str):
    assert build(name, a_init=2.5).a.tolist() == [1.0, 2.5]


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


def layer_shapes(seq: nn.Sequential) -> list:
    """Each layer as (type name, in, out); BatchNorm as (name, features)."""
    shapes = []
    for layer in seq:
        if isinstance(layer, nn.Linear):
            shapes.append(("Linear", layer.in_features, layer.out_features))
        elif isinstance(layer, nn.BatchNorm1d):
            shapes.append(("BatchNorm1d", layer.num_features))
        else:
            shapes.append((type(layer).__name__,))
    return shapes


@pytest.mark.parametrize("name", ["composeae", "realspace_concat_ae", "realspace_projected_ae"])
def test_decoders_have_the_official_layers(name: str):
    # embed 32, image 20, text 24: every width differs, so a swapped size shows.
    model = build(name, image_dim=20)
    assert layer_shapes(model.image_decoder) == [
        ("BatchNorm1d", 32), ("ReLU",), ("Linear", 32, 20), ("ReLU",), ("Linear", 20, 20)]
    assert layer_shapes(model.text_decoder) == [
        ("BatchNorm1d", 32), ("ReLU",), ("Linear", 32, 24), ("ReLU",), ("Linear", 24, 24)]


def test_separate_projections_are_distinct_and_both_train():
    shared, separate = build("composeae"), build("composeae", projection="separate")
    assert shared.projection_conv is None
    conv_params = list(separate.projection_conv.parameters())
    assert {id(p) for p in conv_params}.isdisjoint(id(p) for p in separate.projection.parameters())
    n_shared = sum(p.numel() for p in shared.parameters())
    n_separate = sum(p.numel() for p in separate.parameters())
    assert n_separate - n_shared == sum(p.numel() for p in conv_params)
    for model in (shared, separate):
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        terms = model(*batch(6))
        terms["loss"].backward()
        optimizer.step()
        moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert torch.isfinite(terms["loss"])
        projections = ["projection.eta", "projection.gamma"]
        if model is separate:
            projections += ["projection_conv.eta", "projection_conv.gamma"]
        for prefix in projections:
            assert any(n.startswith(prefix) for n in moved), prefix


def test_realspace_concat_ae_is_the_papers_ablation():
    model = build("realspace_concat_ae").train()
    assert not hasattr(model, "projection")  # no eta, no gamma: raw x and q
    joint = 32 + 24  # image_dim + text_dim
    assert layer_shapes(model.rho) == [("BatchNorm1d", joint), ("ReLU",), ("Linear", joint, 32),
                                       ("ReLU",), ("Linear", 32, 32)]
    conv = model.conv[0]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding) == (1, 64, (3,), (1,))
    assert model.rho_conv[0].num_features == 64 * REAL_POOLED == 1280  # = 512 + 768 in the paper
    x, q = torch.randn(5, 32), torch.randn(5, 24)
    assert model.conv(torch.cat([x, q], 1).unsqueeze(1)).shape == (5, 64, REAL_POOLED)
    assert model.compose_features(x, q).shape == (5, 32)
    assert model.loss_terms == ("base", "img_rec", "txt_rec")


def test_rotation_is_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 64, generator=g)
    delta = 20 * torch.randn(4, 64, generator=g)  # large angles: bf16 rounding would show
    want = (x.double() * torch.cos(delta.double()), x.double() * torch.sin(delta.double()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        re, im = rotate(x, delta)
        naive = x.bfloat16() * torch.cos(delta.bfloat16())
    assert re.dtype == im.dtype == torch.float32
    torch.testing.assert_close(re.double(), want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(im.double(), want[1], atol=1e-5, rtol=1e-5)
    assert (naive.double() - want[0]).abs().max() > 1e-2  # what float32 avoids

    # In the model: the angle comes out of gamma in float32 while eta runs in bf16.
    model = build("composeae").train()
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen.setdefault(name, output.dtype)
        return hook

    model.projection.gamma.register_forward_hook(record("delta"))
    model.projection.eta.register_forward_hook(record("x_tilde"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = model(*batch(4))
    assert seen == {"delta": torch.float32, "x_tilde": torch.bfloat16}
    assert torch.isfinite(terms["loss"])


def test_concat_has_tirgs_second_batchnorm():
    model = build("concat")
    joint = 32 + 24
    assert layer_shapes(model.mlp) == [
        ("BatchNorm1d", joint), ("ReLU",), ("Linear", joint, joint), ("BatchNorm1d", joint),
        ("ReLU",), ("Dropout",), ("Linear", joint, 32)]


def test_official_soft_triplet_gradient_reaches_the_model():
    tokenizer = WordTokenizer.from_corpus(CORPUS)
    grads = {}
    for mode in ("exact", "official"):
        cfg = replace(tiny_config("tirg"), loss={"base": "soft_triplet", "soft_triplet_gradient": mode})
        model = create_model(cfg.model, cfg.loss, tokenizer)
        query = torch.randn(6, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
        target = torch.randn(6, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
        torch.manual_seed(7)  # the same sampled triplets for both
        grads[mode] = torch.autograd.grad(model.base_loss(query, target), [query, model.scale])
    for got, want in zip(grads["official"], grads["exact"]):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want / 2)


def _outputs(model: torch.nn.Module) -> tuple[dict, torch.Tensor]:
    model.eval()  # dropout off: what a key changes shows in the weights or the arithmetic
    reference, texts, _ = batch(4)
    with torch.no_grad():
        return model.state_dict(), model.compose(reference, texts)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_models_read_exactly_the_family_keys_they_declare(name):
    """A sweep searches `model.dropout` only for models that declare it (`reads_key`): a key a
    model says it ignores changes neither its weights nor its output; a key it declares does."""
    from composeae.models.base import FAMILY_MODEL_KEYS, TEXT_MODEL_KEYS
    from composeae.models.zoo import model_class

    changes = {"dropout": 0.3, "a_init": 3.0, "projection": "separate", "text_dim": 40,
               "word_dim": 8}
    base_state, base_out = _outputs(build(name))
    cls = model_class(name)
    for key, value in changes.items():
        assert key in FAMILY_MODEL_KEYS + TEXT_MODEL_KEYS
        state, out = _outputs(build(name, **{key: value}))
        same = (state.keys() == base_state.keys()
                and all(state[k].shape == base_state[k].shape
                        and torch.equal(state[k], base_state[k]) for k in state)
                and torch.equal(out, base_out))
        if key == "dropout":  # dropout shows in training only: its module's rate
            rates = {m.p for m in build(name, dropout=value).modules() if isinstance(m, nn.Dropout)}
            same = value not in rates
        assert same != cls.reads_key(f"model.{key}"), (name, key)
    for term in ("base", "img_rec", "txt_rec", "sym"):
        assert cls.reads_key(f"loss.w_{term}") == (term in cls.loss_terms)
    assert cls.reads_key("optim.lr") and cls.reads_key("model.embed_dim")
