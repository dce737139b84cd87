"""The trainer's inputs: token ids made in the loader workers, uint8 images normalised on the
device, and the host work of a training step.

The CUDA half of `composeae.data.device` (pinned copies on a side stream) needs a GPU and is run
by `bench/gpu_suite.py`; here its normalisation arithmetic runs on CPU tensors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from composeae.config import load_config, replace
from composeae.data.decode import normalise
from composeae.data.device import _DeviceNormaliser, device_batches
from composeae.data.stream import TOKENS, TrainStream, eval_batches
from composeae.models.text import Tokens, WordTokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "jobs" / "configs" / "tiny.yaml"


def per_row_tokens(tokenizer, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's tokenisation as it was: each row's ids copied into zero-padded tensors."""
    rows = [tokenizer.encode([t], max_len)[0][0].tolist() for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


@pytest.fixture(scope="module")
def tiny_model_and_cfg(css_tiny):
    from composeae.data.shardset import load_corpus
    from composeae.models import create_model
    from composeae.models.text import build_tokenizer

    cfg = load_config(TINY, [f"data.url={css_tiny}", "data.loader_workers=1"])
    torch.manual_seed(0)
    model = create_model(cfg.model, cfg.loss, build_tokenizer("lstm", load_corpus(cfg.data)))
    return model.eval(), cfg


def test_loader_tokens_equal_the_models_own_tokenisation(tiny_model_and_cfg):
    model, cfg = tiny_model_and_cfg
    stream = TrainStream(cfg.data, 16, rank=0, world_size=1, seed=0,
                         tokenize=model.tokenize_fn(), normalise=False)
    batches = stream.epoch(0)  # one real DataLoader worker process tokenises
    for _ in range(3):
        batch = next(batches)
        tokens = batch[TOKENS]
        assert isinstance(tokens, Tokens) and tokens.ids.dtype == torch.int64
        expected = per_row_tokens(model.tokenizer, batch["modifier"], cfg.model.max_text_len)
        assert torch.equal(tokens.ids, expected[0]) and torch.equal(tokens.mask, expected[1])
        # Images cross as uint8 (B, S, S, 3) and become the float batch the stream used to make.
        assert batch["reference"].dtype == torch.uint8 and batch["reference"].shape[-1] == 3
        placed = next(device_batches([batch], torch.device("cpu")))
        assert torch.equal(placed["reference"], normalise(batch["reference"]))
        with torch.no_grad():
            from_tokens = model.compose(placed["reference"], tokens)
            from_strings = model.compose(placed["reference"], batch["modifier"])
        assert torch.equal(from_tokens, from_strings)


def test_padding_fills_ids_and_masks_per_row():
    tokenizer = WordTokenizer(["add", "red", "circle"])
    ids, mask = tokenizer.encode(["add red circle", "", "red unknownword", "circle " * 9], 5)
    assert ids.tolist() == [[2, 3, 4, 0, 0], [1, 0, 0, 0, 0], [3, 1, 0, 0, 0], [4, 4, 4, 4, 4]]
    assert mask.sum(1).tolist() == [3, 1, 2, 5]
    ids, mask = tokenizer.encode(["add", "red circle"], 5)
    assert ids.tolist() == [[2, 0], [3, 4]] and mask.tolist() == [[1, 0], [1, 1]]


def test_wordpiece_pads_with_its_own_pad_id():
    from composeae.models.text import WordPieceTokenizer

    tokenizer = WordPieceTokenizer.train(["add a red circle", "remove the blue square"] * 5, 60)
    ids, mask = tokenizer.encode(["add a red circle", "add"], 16)
    assert ids.shape[1] == int(mask[0].sum())  # the longest row sets the width
    assert (ids[mask == 0] == tokenizer.pad_id).all()
    expected = per_row_tokens(tokenizer, ["add a red circle", "add"], 16)
    assert torch.equal(mask, expected[1])
    assert torch.equal(ids[mask == 1], expected[0][expected[1] == 1])


def test_the_device_normalisation_is_the_host_one():
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), np.uint8))
    on_device = _DeviceNormaliser(torch.device("cpu"))(pixels)
    assert on_device.shape == (4, 3, 8, 8)
    assert on_device.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(on_device, normalise(pixels), rtol=1e-6, atol=1e-6)


def test_a_steps_host_calls_do_not_grow_with_the_batch(tiny_model_and_cfg):
    """The aten calls of one eager training step at batch 8 and 32 (the tiny model): equal
    within 5%, and the modifier no longer costs calls per row (bench/bench_step.py counts them
    at the 64 px setting)."""
    from torch.profiler import ProfilerActivity, profile

    from composeae.models import create_model
    from composeae.optim import build_optimizer, build_scheduler
    from composeae.run.worker import train_step

    shared, cfg = tiny_model_and_cfg
    cfg = replace(cfg, train={"precision": "fp32"})
    model = create_model(cfg.model, cfg.loss, shared.tokenizer).train()
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, 100)
    counts = {}
    for size in (8, 32):
        batch = next(iter(eval_batches(cfg.data, "test", "queries", size, rank=0, world_size=1,
                                       tokenize=model.tokenize_fn())))
        batch = {"reference": batch["reference"], "target": batch["reference"].flip(0),
                 TOKENS: batch[TOKENS]}
        train_step(model, optimizer, scheduler, batch, cfg, torch.device("cpu"))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train_step(model, optimizer, scheduler, batch, cfg, torch.device("cpu"))
        counts[size] = sum(1 for e in prof.events() if e.name.startswith("aten::"))
    assert abs(counts[32] - counts[8]) <= 0.05 * counts[8], counts
