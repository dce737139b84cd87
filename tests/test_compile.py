"""`train.compile`: a compiled model computes what the eager one does, and a compiled run
trains, checkpoints, resumes and evaluates like an eager one.

Compiling is the slow part (inductor writes and builds C++ kernels: one to three minutes for the
tiny ComposeAE on two cores, then cached on disk), so both tests train the same model on the
same batch shapes (`SETTINGS`): the first compiles, the run's worker finds every kernel in the
on-disk cache. Dropout is off in both (no eta dropout, the text encoder frozen, so in eval
mode): compiled kernels draw other random numbers than eager ones.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from composeae.cli import main
from composeae.config import load_config, replace
from composeae.testing.console import own_lines

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "jobs" / "configs" / "tiny.yaml"
SETTINGS = ["train.precision=fp32", "model.dropout=0", "model.freeze_text=true",
            "model.allow_random_init=true",
            "ray.num_workers=1", "train.compile=default"]


def test_a_mode_that_cannot_work_here_is_one_line(capsys, tmp_path):
    argv = ["train", "--config", str(TINY), "--set", f"train.storage={tmp_path}"]
    assert main(argv + ["--set", "train.compile=reduce-overhead"]) == 2
    err = own_lines(capsys.readouterr().err)
    assert len(err) == 1 and "reduce-overhead" in err[0] and "ray.use_gpu" in err[0]
    assert main(argv + ["--set", "train.compile=fastest"]) == 2
    err = own_lines(capsys.readouterr().err)
    assert len(err) == 1 and "train.compile" in err[0] and "max-autotune" in err[0]
    assert not any(tmp_path.iterdir())  # nothing written


def test_compiled_and_eager_models_agree(css_tiny):
    """fp32, dropout off, the same initial weights and batches: the loss of every one of 20
    steps (over two epochs) agrees to 1e-4 relative (measured on this CPU: at most 3e-6)."""
    from composeae.data.shardset import load_corpus
    from composeae.data.stream import TOKENS, TrainStream
    from composeae.models import create_model
    from composeae.models.text import build_tokenizer
    from composeae.optim import build_optimizer, build_scheduler
    from composeae.run.compiling import CompileWatch, prepare_for_device
    from composeae.run.worker import train_step

    from composeae.config import global_batch

    cfg = load_config(TINY, [f"data.url={css_tiny}", *SETTINGS])
    tokenizer = build_tokenizer("lstm", load_corpus(cfg.data))
    cpu = torch.device("cpu")
    runs = {}
    for mode in ("none", "default"):
        torch.manual_seed(0)
        model = create_model(cfg.model, cfg.loss, tokenizer)
        model = prepare_for_device(model, replace(cfg, train={"compile": mode}), cpu)
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.optim, 20)
        stream = TrainStream(cfg.data, global_batch(cfg), rank=0, world_size=1, seed=0,
                             tokenize=model.tokenize_fn())
        watch, losses, widths = CompileWatch(mode), [], set()

        def two_epochs():
            yield from stream.epoch(0)
            yield from stream.epoch(1)

        for step, batch in zip(range(20), two_epochs()):
            widths.add(batch[TOKENS].ids.shape[1])  # the longest modifier of each batch
            losses.append(float(train_step(model, optimizer, scheduler, batch,
                                           replace(cfg, train={"compile": mode}), cpu)["loss"]))
            watch.step(0.0)
        runs[mode] = (losses, model.state_dict(), watch.summary())
    (eager, eager_state, _), (compiled, compiled_state, summary) = runs["none"], runs["default"]
    # Batches of several token widths, one graph: the width is dynamic, nothing recompiled.
    assert len(widths) > 1 and summary["graphs"] > 0 and summary["recompiles"] == 0
    assert list(compiled_state) == list(eager_state)  # no `_orig_mod.` in the keys
    assert len(compiled) == len(eager) == 20
    worst = max(abs(c - e) / abs(e) for c, e in zip(compiled, eager))
    assert worst <= 1e-4, (worst, eager, compiled)


@pytest.mark.usefixtures("ray_local")
def test_a_compiled_run_resumes_and_its_checkpoint_evaluates_eagerly(css_tiny, tmp_path,
                                                                    monkeypatch):
    from composeae.checkpoint import load_checkpoint
    from composeae.evaluate import evaluate
    from composeae.run.build import model_from_checkpoint
    from composeae.run.driver import FAULT_ENV, run_training

    monkeypatch.setenv(FAULT_ENV, "4:0")  # the worker dies once at step 4, after step 3's report
    cfg = load_config(TINY, [f"data.url={css_tiny}", f"train.storage={tmp_path}",
                             "train.steps=6", *SETTINGS])
    summary = run_training(cfg)
    metrics = summary.metrics
    assert metrics["resumes"] == 1 and metrics["step"] == 6
    assert metrics["compile"]["mode"] == "default" and metrics["compile"]["recompiles"] == 0
    # The checkpoint is an eager model's: built and evaluated in this process without compiling.
    state = load_checkpoint(summary.checkpoint_url)
    model, saved = model_from_checkpoint(state)
    assert not any("_orig_mod" in key for key in state["model"])
    test = evaluate(model, saved.data, saved.eval.test_split, saved.eval, rank=0, world_size=1,
                    device=torch.device("cpu"))
    assert test and {f"test/{k}": v for k, v in test.items()} == {
        k: v for k, v in metrics.items() if k.startswith("test/")}
