"""Training on Ray Train V2: the per-worker loop and the driver that builds the TorchTrainer.

Driver (`run_training`): checks the data, builds the tokenizer from the corpus once, starts or
joins Ray, and fits a `TorchTrainer` whose run is named `train.name` under `train.storage`, so
submitting the same run again resumes from its last checkpoint. It then writes `metrics.json`,
`config.yaml` and `report.html` into the run directory and prints the recall table.

Worker (`train_loop_per_worker`): streams its slice of the shards, trains the DDP-wrapped model,
and every `train.eval_every` steps evaluates on the validation split and reports a checkpoint
(every rank calls `ray.train.report` equally often: it is a barrier). The final report carries the
test-split recall of the best-by-validation weights. Resuming restores model, optimizer,
schedule, step, samples seen and history, and skips the batches of the interrupted epoch that
were already trained on, so a restarted run follows the same plan as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from composeae.checkpoint import MODEL_FILE, checkpoint_state, save_checkpoint, unwrap
from composeae.config import Config, config_from_dict, config_to_dict, dump_config
from composeae.evaluate import autocast_context, evaluate, format_table
from composeae.optim import build_optimizer, build_scheduler

FAULT_ENV = "COMPOSEAE_FAULT_AT_STEP"
"""Fault injection for tests and drills: `STEP` or `STEP:RANK` kills that worker once at STEP."""
FINAL_CHECKPOINT = "final"


@dataclass
class TrainState:
    """Progress that a checkpoint carries so a resumed run continues the same plan."""
    step: int = 0
    samples_seen: int = 0
    best_score: float = -math.inf
    best_step: int = -1
    resumes: int = 0
    """Times a worker group restarted from a checkpoint (after a failure or a resubmission)."""
    history: list[dict[str, float]] = field(default_factory=list)


def _say(message: str) -> None:
    """One console line from a worker. Ray Train patches `print` into its logger, which echoes
    each line twice in the job log; writing to stdout directly prints it once."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def checkpoint_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _maybe_inject_fault(fault: dict | None, step: int, rank: int) -> None:
    """Kill this worker process once at the step named by COMPOSEAE_FAULT_AT_STEP (read by the
    driver; `fault["marker"]` is unique per `fit()`, so the restarted group gets past it)."""
    if not fault:
        return
    at_step, _, at_rank = fault["spec"].partition(":")
    if step != int(at_step) or rank != int(at_rank or 0):
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    marker.touch()
    # Ray Train V2 collects reports when it polls worker health (every 2 s by default): a worker
    # lost sooner than that after a report takes the report with it, and the run restarts from
    # the report before. Waiting out two polls makes the drill resume from the latest checkpoint.
    time.sleep(2 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0)) + 1)
    _say(f"[fault injection] rank {rank} exits at step {step}")
    os._exit(1)


def _fault_plan() -> dict | None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    import uuid

    return {"spec": spec, "marker": str(Path(tempfile.gettempdir()) / f"composeae-fault-{uuid.uuid4().hex}")}


def _restore(model, optimizer, scheduler) -> tuple[TrainState, dict | None]:
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return TrainState(), None
    with checkpoint.as_directory() as path:
        state = torch.load(Path(path) / MODEL_FILE, map_location="cpu", weights_only=True)
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    train_state = TrainState(**state["train_state"])
    train_state.resumes += 1
    # A checkpoint written at the best step holds the best weights only once, as "model".
    best = state.get("best_model") or (state["model"] if train_state.best_step >= 0 else None)
    return train_state, best


def _report(metrics: dict[str, Any], state_dict: dict[str, Any] | None, rank: int,
            name: str) -> None:
    """Every rank reports; rank 0 attaches the checkpoint."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp) / MODEL_FILE, state_dict)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=name)


class _Progress:
    """Rank 0's console lines and TensorBoard scalars."""

    def __init__(self, cfg: Config, rank: int, world_size: int, tb_dir: str | None):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.writer = None
        if rank == 0 and tb_dir:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(tb_dir)
        self.window_start = time.perf_counter()
        self.window_samples = self.window_steps = 0
        self.window_sums: dict[str, torch.Tensor] = {}

    def step(self, state: TrainState, terms: dict[str, torch.Tensor], lr: float,
             batch: int) -> None:
        self.window_samples += batch * self.world_size
        self.window_steps += 1
        for k, v in terms.items():
            self.window_sums[k] = self.window_sums.get(k, 0.0) + v
        if state.step % self.cfg.train.log_every and state.step != self.cfg.train.steps:
            return
        # Logged losses are means over the steps since the last line (this rank's batches).
        # Summed as tensors and read once per line: no device sync on every step.
        terms = {k: float(v) / self.window_steps for k, v in self.window_sums.items()}
        self.window_sums, self.window_steps = {}, 0
        elapsed = time.perf_counter() - self.window_start
        rate = self.window_samples / max(elapsed, 1e-9)
        self.window_start, self.window_samples = time.perf_counter(), 0
        eta = (self.cfg.train.steps - state.step) * batch * self.world_size / max(rate, 1e-9)
        state.history.append({"step": state.step, "lr": lr, "samples_per_s": rate, **terms})
        if self.rank != 0:
            return
        losses = " ".join(f"{k}={v:.4f}" for k, v in terms.items())
        _say(f"step {state.step}/{self.cfg.train.steps} {losses} lr={lr:.2e} "
             f"{rate:.1f} samples/s eta {eta:.0f}s")
        self.scalars(state.step, {f"train/{k}": v for k, v in terms.items()}
                     | {"train/lr": lr, "train/samples_per_s": rate})

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for k, v in values.items():
                # TensorBoard tags allow no "@": R@1 is written as R_1.
                self.writer.add_scalar(k.replace("@", "_"), v, step)
            self.writer.flush()


def _sync_buffers(model: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics).

    DDP broadcasts buffers at the start of each forward, so after the last training step each
    rank holds the statistics its own batch updated. Evaluation embeds a different slice on
    every rank and the checkpoint is rank 0's: without this, ranks would embed with statistics
    other than the saved ones and the reported recall would not match the checkpoint's.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in unwrap(model).buffers():
            dist.broadcast(buffer, src=0)


def _skip(batches, count: int):
    """Drop the first `count` batches of an epoch (already trained on before a restart)."""
    for i, batch in enumerate(batches):
        if i >= count:
            yield batch


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from composeae.data.stream import TrainStream, has_split
    from composeae.models.text import tokenizer_from_state
    from composeae.registry import create_model

    cfg = config_from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank

    model = create_model(cfg.model, cfg.loss, tokenizer_from_state(config["tokenizer"]))
    model = ray.train.torch.prepare_model(model)
    optimizer = build_optimizer(unwrap(model), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    state, best_model = _restore(model, optimizer, scheduler)
    if state.step:
        _say(f"rank {rank}: resumed at step {state.step}")
    torch.manual_seed(cfg.train.seed + 1000 * rank + state.step)  # dropout differs per rank

    stream = TrainStream(cfg.data, cfg.train.batch_size, rank=rank, world_size=world_size,
                         seed=cfg.train.seed)
    has_val = has_split(cfg.data, cfg.eval.val_split)
    progress = _Progress(cfg, rank, world_size, config.get("tensorboard_dir"))

    def snapshot(model_state: dict, best: dict | None) -> dict:
        """The checkpoint dict: weights, optimizer, schedule, progress (and best weights)."""
        extra = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "train_state": asdict(state)}
        if best is not None:
            extra["best_model"] = best
        return checkpoint_state(model, cfg, **extra) | {"model": model_state}

    model.train()
    while state.step < cfg.train.steps:
        epoch, done = divmod(state.step, stream.steps_per_epoch)
        for batch in _skip(stream.epoch(epoch), done):
            _maybe_inject_fault(config.get("fault"), state.step, rank)
            reference = batch["reference"].to(device, non_blocking=True)
            target = batch["target"].to(device, non_blocking=True)
            with autocast_context(device, cfg.train.precision):
                terms = model(reference, list(batch[cfg.data.text_mode]), target)
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            state.step += 1
            state.samples_seen += reference.shape[0] * world_size
            progress.step(state, {k: v.detach() for k, v in terms.items()},
                          scheduler.get_last_lr()[-1], reference.shape[0])

            if state.step % cfg.train.eval_every == 0 or state.step == cfg.train.steps:
                _sync_buffers(model)
                metrics = {"step": state.step, "epoch": epoch, "samples_seen": state.samples_seen}
                if has_val:
                    val = evaluate(unwrap(model), cfg.data, cfg.eval.val_split, cfg.eval,
                                   rank=rank, world_size=world_size, device=device,
                                   precision=cfg.train.precision)
                    metrics |= {f"val/{k}": v for k, v in val.items()}
                    score = val[cfg.eval.selection_metric]
                else:
                    score = float(state.step)  # no validation split: the latest is the best
                if score > state.best_score:
                    state.best_score, state.best_step = score, state.step
                    # On the CPU: a second copy of the weights must not cost GPU memory.
                    best_model = {k: v.detach().to("cpu", copy=True)
                                  for k, v in unwrap(model).state_dict().items()}
                metrics["score"] = score
                state.history.append({k: v for k, v in metrics.items() if k != "epoch"})
                progress.scalars(state.step, {k: v for k, v in metrics.items() if "/" in k})
                if rank == 0 and has_val:
                    _say(format_table(val, f"validation at step {state.step} (%)"))
                # The checkpoint holds the current weights and, when they are not the best, the
                # best ones too; restarts resume from here.
                best = best_model if state.best_step != state.step else None
                _report(metrics, snapshot(unwrap(model).state_dict(), best) if rank == 0
                        else None, rank, checkpoint_dir_name(state.step))
            if state.step >= cfg.train.steps:
                break

    # Final: test recall of the best-by-validation weights, reported with them as the checkpoint.
    final_weights = best_model if best_model is not None else unwrap(model).state_dict()
    unwrap(model).load_state_dict(final_weights)
    test = evaluate(unwrap(model), cfg.data, cfg.eval.test_split, cfg.eval, rank=rank,
                    world_size=world_size, device=device, precision=cfg.train.precision)
    final = {"step": state.step, "samples_seen": state.samples_seen, "best_step": state.best_step,
             "resumes": state.resumes,
             "score": state.best_score, "final": True} | {f"test/{k}": v for k, v in test.items()}
    progress.scalars(state.step, {k: v for k, v in final.items() if "/" in k})
    _report(final, snapshot(final_weights, None) if rank == 0 else None, rank, FINAL_CHECKPOINT)


def run_training(cfg: Config) -> dict[str, Any]:
    """Train `cfg` on Ray, then write metrics.json, config.yaml and report.html in the run dir."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from composeae.data import storage
    from composeae.data.stream import has_split, load_corpus
    from composeae.errors import UserError
    from composeae.models.text import build_tokenizer
    from composeae.raysetup import absolute_paths, init_ray
    from composeae.report import write_report

    cfg = prepare_data(absolute_paths(cfg))
    if not has_split(cfg.data, cfg.eval.test_split):
        raise UserError(f"dataset {cfg.data.url} has no split {cfg.eval.test_split!r}")
    tokenizer = build_tokenizer(cfg.model.text_encoder, load_corpus(cfg.data),
                                bert_path=cfg.model.bert_path, vocab_size=cfg.model.bert_vocab_size)
    run_url = storage.join(cfg.train.storage, cfg.train.name)
    storage.write_text(storage.join(run_url, "config.yaml"), dump_config(cfg))
    tb_dir = None if storage.is_s3(run_url) else str(Path(run_url, "tensorboard").resolve())
    init_ray(cfg)

    print(f"training {cfg.model.name} on {cfg.data.url} with {cfg.ray.num_workers} "
          f"{'GPU' if cfg.ray.use_gpu else 'CPU'} worker(s); run {run_url}", flush=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": config_to_dict(cfg), "tokenizer": tokenizer.state(),
                           "tensorboard_dir": tb_dir, "fault": _fault_plan()},
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker={"CPU": cfg.ray.cpus_per_worker}),
        run_config=RunConfig(
            name=cfg.train.name, storage_path=cfg.train.storage,
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.num_to_keep,
                                               checkpoint_score_attribute="score",
                                               checkpoint_score_order="max")),
    )
    result = trainer.fit()
    if result.checkpoint is None or not (result.metrics or {}).get("final"):
        raise RuntimeError(f"run {cfg.train.name} ended without its final report")
    metrics = {k: v for k, v in result.metrics.items() if k != "final"}
    with result.checkpoint.as_directory() as path:
        final = torch.load(Path(path) / MODEL_FILE, map_location="cpu", weights_only=True)
    metrics["checkpoint"] = result.checkpoint.path
    storage.write_text(storage.join(run_url, "metrics.json"), json.dumps(metrics, indent=2) + "\n")
    write_report(run_url, cfg, final["train_state"]["history"], metrics)
    print(format_table({k: v for k, v in metrics.items() if k.startswith("test/")},
                       f"test recall of {cfg.model.name} (%), best step {metrics['best_step']}"))
    print(f"run directory: {run_url}", flush=True)
    return metrics


def prepare_data(cfg: Config) -> Config:
    """Fail early on a missing dataset, or build CSS-synth there when the config asks to."""
    from composeae.data import storage
    from composeae.data.schema import MANIFEST
    from composeae.errors import UserError

    if storage.exists(storage.join(cfg.data.url, MANIFEST)):
        return cfg
    if not cfg.data.synth_if_missing:
        raise UserError(f"no dataset at {cfg.data.url} (manifest.json not found); build one with "
                        f"`composeae shards synth` or `composeae shards convert`")
    from composeae.data.synth import generate

    print(f"building CSS-synth '{cfg.data.synth_preset}' shards at {cfg.data.url}", flush=True)
    generate(cfg.data.url, preset=cfg.data.synth_preset, seed=cfg.train.seed,
             image_size=cfg.data.image_size)
    return cfg
