"""The Ray Train worker loop: what every rank runs (the driver side is `composeae.run.driver`).

`train_loop_per_worker` streams its slice of the shards, trains the DDP-wrapped model with
`train_step`, and every `train.eval_every` steps evaluates on the validation split and reports a
checkpoint (every rank calls `ray.train.report` equally often: it is a barrier). The final report
carries the test-split recall of the best-by-validation weights, in a checkpoint named `final`
that also holds what they retrieve for a few fixed test queries (`layout.RETRIEVALS_FILE`).
Resuming restores model, optimizer, schedule, step, samples seen, history and every rank's
random state, and skips the batches of the interrupted epoch that were already trained on (the
data order is a function of seed, epoch and rank), so a run resumed with the same number of
workers ends with exactly the weights and metrics of the same run never interrupted. With
another number of workers the random state is seeded from the step instead: the same plan, not
the same draws. A run restored from its `final` checkpoint is finished: it
reports nothing more, so resubmitting it any number of times leaves its checkpoints as they are.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from composeae.checkpoint import MODEL_FILE, checkpoint_state, load_checkpoint, save_checkpoint
from composeae.config import Config, config_from_dict, global_batch
from composeae.data.device import device_batches
from composeae.data.shardset import has_split
from composeae.data.stream import TOKENS, TrainStream
from composeae.distributed import (autocast_context, gather_objects, rng_state,
                                   set_rng_state, sync_buffers, unwrap)
from composeae.evaluate import evaluate, evaluate_with_retrievals
from composeae.models.text import tokenizer_from_state
from composeae.optim import build_optimizer, build_scheduler
from composeae.report import tblog
from composeae.report.tables import format_table
from composeae.run import layout
from composeae.run.build import create_model
from composeae.run.compiling import CompileWatch, dynamic_text, prepare_for_device


@dataclass
class TrainState:
    """Progress that a checkpoint carries so a resumed run continues the same plan."""
    step: int = 0
    samples_seen: int = 0
    best_score: float = -math.inf
    best_step: int = -1
    resumes: int = 0
    """Times a worker group restarted from a checkpoint (after a failure or a resubmission)."""
    finished: bool = False
    """Set in the `final` checkpoint: a run restored from it has nothing left to do."""
    final_metrics: dict[str, Any] = field(default_factory=dict)
    """The final report's metrics, so a resubmitted finished run can hand them on again."""
    history: list[dict[str, float]] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    """One entry per start of the worker group: {"step", "workers", "nodes"}; an elastic run's
    resizes are the entries whose worker count differs from the one before."""


def resizes(attempts: list[dict[str, Any]]) -> list[dict[str, int]]:
    """[{"step", "from", "to"}] for every change of the worker count between attempts."""
    return [{"step": b["step"], "from": a["workers"], "to": b["workers"]}
            for a, b in zip(attempts, attempts[1:]) if a["workers"] != b["workers"]]


def _say(message: str) -> None:
    """One console line from a worker. Ray Train patches `print` into its logger, which echoes
    each line twice in the job log; writing to stdout directly prints it once."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def _maybe_inject_fault(fault: dict | None, step: int, rank: int) -> None:
    """Kill this worker process once at the step planned by `composeae.run.driver.fault_plan`
    (`fault["marker"]` is unique per `fit()`, so the restarted group gets past it)."""
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


def _restore(model, optimizer, scheduler) -> tuple[TrainState, dict | None, list | None]:
    """Progress, best weights and every rank's random state from the latest checkpoint."""
    import ray.train  # deferred: the worker module is imported by drivers that start no worker

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return TrainState(), None, None
    with checkpoint.as_directory() as path:
        state = torch.load(Path(path) / MODEL_FILE, map_location="cpu", weights_only=True)
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    train_state = TrainState(**state["train_state"])
    train_state.resumes += 1
    # A checkpoint written at the best step holds the best weights only once, as "model".
    best = state.get("best_model") or (state["model"] if train_state.best_step >= 0 else None)
    return train_state, best, state.get("rng")


def _warm_start(model, url: str, rank: int) -> None:
    """A new run starts from another run's weights (every rank loads the same ones). The
    optimizer and schedule start afresh: the warm start is an initialisation, not a resume."""
    unwrap(model).load_state_dict(load_checkpoint(url)["model"])
    if rank == 0:
        _say(f"warm start from {url}")


def _report(metrics: dict[str, Any], state_dict: dict[str, Any] | None, rank: int,
            name: str, files: dict[str, str] | None = None) -> None:
    """Every rank reports; rank 0 attaches the checkpoint (and `files`, {name: text}, in it)."""
    import ray.train  # deferred: see _restore

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp) / MODEL_FILE, state_dict)
        (Path(tmp) / layout.HISTORY_FILE).write_text(json.dumps(state_dict["train_state"]["history"]))
        for file_name, text in (files or {}).items():
            (Path(tmp) / file_name).write_text(text)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=name)


class _Progress:
    """Rank 0's console lines and TensorBoard scalars."""

    def __init__(self, cfg: Config, rank: int, world_size: int, tb_url: str | None,
                 resumed_at: int = 0):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.writer = None
        if rank == 0 and tb_url:
            # A resumed run hides the interrupted attempt's events from its resume step on.
            self.writer = tblog.open_writer(tb_url, purge_step=resumed_at or None)
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
            tblog.add_scalars(self.writer, step, values)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _skip(batches, count: int):
    """Drop the first `count` batches of an epoch (already trained on before a restart)."""
    for i, batch in enumerate(batches):
        if i >= count:
            yield batch


def train_step(model, optimizer, scheduler, batch: dict[str, Any], cfg: Config,
               device: torch.device) -> dict[str, torch.Tensor]:
    """One optimisation step on a batch: forward (autocast per `train.precision`), backward,
    optional gradient clipping, optimizer and schedule step. Returns the detached loss terms.

    The batch is normally on `device` already (`composeae.data.device.device_batches`), its
    modifier tokenised by the loader ("tokens"); a host batch of strings works too."""
    reference = batch["reference"].to(device, non_blocking=True)
    target = batch["target"].to(device, non_blocking=True)
    texts = batch[TOKENS] if TOKENS in batch else list(batch[cfg.data.text_mode])
    if cfg.train.compile != "none" and TOKENS in batch:
        dynamic_text(texts)  # one graph for every modifier length
    with autocast_context(device, cfg.train.precision):
        terms = model(reference, texts, target)
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    if cfg.optim.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    optimizer.step()
    scheduler.step()
    return {k: v.detach() for k, v in terms.items()}


def _quiet_ray_reports() -> None:
    """Ray Train logs every `ray.train.report` of every rank at INFO through the worker's root
    logger (its console handler): one long `Reporting training result N` line per rank and
    evaluation. This loop prints its own progress, so the worker's root logger is set to
    WARNING; Ray's own `ray.train` logger keeps its configured level and handlers."""
    logging.getLogger().setLevel(logging.WARNING)


def _process_started_at() -> float | None:
    """When this process started, on the `time.time()` clock (Linux's /proc), else None."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        age = (float(Path("/proc/uptime").read_text().split()[0])
               - int(fields[19]) / os.sysconf("SC_CLK_TCK"))  # field 22: start, in ticks
        return time.time() - age
    except (OSError, ValueError, IndexError):
        return None


class Startup:
    """Where a worker group's start-up goes, in seconds on rank 0: from the driver building the
    trainer, `ray_workers` until this worker's process started (Train controller, placement,
    actor processes), `worker_init` until this function runs (imports, Ray's actor set-up, the
    torch process group), then `model` (built, wrapped for DDP), `checkpoint` (restored),
    `first_batch` (the stream's loader workers and first shards) and `first_step`. A process Ray
    had started before the run gets one `ray` phase for both; a group that restarts within one
    fit gets neither (they would hold the failed attempt)."""

    PHASES = ("ray", "ray_workers", "worker_init", "model", "checkpoint", "first_batch",
              "first_step")

    def __init__(self, submitted_at: float | None):
        self.submitted_at, self.last = submitted_at, time.time()
        self.seconds: dict[str, float] = {}
        started = _process_started_at()
        if submitted_at is not None and started is not None and started > submitted_at:
            self.seconds["ray_workers"] = started - submitted_at
            self.seconds["worker_init"] = self.last - started
        elif submitted_at is not None:
            self.seconds["ray"] = self.last - submitted_at

    def mark(self, phase: str) -> None:
        now = time.time()
        self.seconds[phase] = now - self.last
        self.last = now

    def describe(self) -> str:
        total = sum(self.seconds.values())
        parts = ", ".join(f"{p.replace('_', ' ')} {self.seconds[p]:.1f} s"
                          for p in self.PHASES if p in self.seconds)
        return f"start-up {total:.1f} s: {parts}"


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """What every rank runs: `config` is the driver's `train_loop_config`."""
    import ray.train.torch  # noqa: F401  (deferred: see _restore; its import is worker_init's)

    _quiet_ray_reports()
    worker = _Worker(config, Startup(config.get("submitted_at")))
    if worker.state.finished:
        worker.report_finished()
    else:
        worker.train()
        worker.final_report()


class _Worker:
    """One rank's run, in the steps `train_loop_per_worker` takes."""

    def __init__(self, config: dict[str, Any], startup: Startup):
        import ray.train  # deferred: see _restore
        import ray.train.torch

        cfg = self.cfg = config_from_dict(config["cfg"])
        self.fault = config.get("fault")
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank

        self.startup = startup
        model = create_model(cfg.model, cfg.loss, tokenizer_from_state(config["tokenizer"]))
        self.model = ray.train.torch.prepare_model(prepare_for_device(model, cfg, self.device))
        self.compile_watch = CompileWatch(cfg.train.compile)
        self.optimizer = build_optimizer(unwrap(self.model), cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.steps)
        startup.mark("model")
        self.state, self.best_model, self.rng = _restore(self.model, self.optimizer,
                                                         self.scheduler)
        startup.mark("checkpoint")
        if any(a.get("submitted_at") == startup.submitted_at for a in self.state.attempts):
            for phase in ("ray", "ray_workers", "worker_init"):  # a restart within one fit
                startup.seconds.pop(phase, None)
        if cfg.train.init_from and not self.state.resumes:
            _warm_start(self.model, cfg.train.init_from, self.rank)
        self.has_val = has_split(cfg.data, cfg.eval.val_split)
        self.tensorboard_url = config.get("tensorboard_url")

    def report_finished(self) -> None:
        """Every rank restored the same `final` checkpoint. Reporting it again would register a
        second entry for the same folder, and trimming the older entry deletes it. Its metrics
        alone are reported (no checkpoint: nothing to register or trim), so a caller listening
        to reports (a Tune trial restarted after its run finished) still gets the final result."""
        import ray.train  # deferred: see _restore

        if self.rank == 0:
            _say(f"run {self.cfg.train.name} is already finished (step {self.state.step}); "
                 f"nothing to do")
        if self.state.final_metrics:
            ray.train.report(self.state.final_metrics)

    def snapshot(self, model_state: dict, best: dict | None,
                 rng: list | None = None) -> dict | None:
        """The checkpoint dict on rank 0 (None elsewhere): weights, optimizer, schedule,
        progress (and the best weights, and every rank's random state, when given)."""
        if self.rank != 0:
            return None
        extra = {"optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "train_state": asdict(self.state)}
        if rng is not None:
            extra["rng"] = rng
        if best is not None:
            extra["best_model"] = best
        return checkpoint_state(self.model, self.cfg, **extra) | {"model": model_state}

    def train(self) -> None:
        """Train to `train.steps`, evaluating and reporting every `train.eval_every` steps."""
        cfg, state = self.cfg, self.state
        if state.step:
            _say(f"rank {self.rank}: resumed at step {state.step}")
        self.record_attempt()
        # The global batch is the config's at every world size (an elastic group splits it
        # over the workers it has), so the schedule and the epochs are the same steps.
        # The loader workers tokenise the modifier and ship uint8 images, which
        # `device_batches` copies ahead and normalises on the device.
        stream = TrainStream(cfg.data, global_batch(cfg) // self.world_size, rank=self.rank,
                             world_size=self.world_size, seed=cfg.train.seed,
                             tokenize=unwrap(self.model).tokenize_fn(),
                             normalise=False)
        self.progress = _Progress(cfg, self.rank, self.world_size, self.tensorboard_url,
                                  state.step)
        if self.rng is not None and len(self.rng) == self.world_size:
            set_rng_state(self.rng[self.rank])  # where the interrupted run was: the same draws
        else:
            torch.manual_seed(cfg.train.seed + 1000 * self.rank + state.step)  # differs per rank
        self.model.train()
        first = True
        while state.step < cfg.train.steps:
            epoch, done = divmod(state.step, stream.steps_per_epoch)
            for batch in device_batches(_skip(stream.epoch(epoch), done), self.device):
                if first:
                    self.startup.mark("first_batch")
                _maybe_inject_fault(self.fault, state.step, self.rank)
                started = time.perf_counter()
                terms = train_step(self.model, self.optimizer, self.scheduler, batch, cfg,
                                   self.device)
                if first:
                    self.record_startup()
                    first = False
                compiled = self.compile_watch.step(time.perf_counter() - started)
                if compiled and self.rank == 0:
                    _say(compiled)
                batch_size = batch["reference"].shape[0]
                state.step += 1
                state.samples_seen += batch_size * self.world_size
                self.progress.step(state, terms, self.scheduler.get_last_lr()[-1], batch_size)
                if state.step % cfg.train.eval_every == 0 or state.step == cfg.train.steps:
                    self.evaluate_and_report(epoch)
                if state.step >= cfg.train.steps:
                    break

    def record_attempt(self) -> None:
        """Note this start of the worker group (step, workers, their nodes); say a resize."""
        import ray.util  # deferred: see _restore

        state = self.state
        nodes = sorted(set(gather_objects(ray.util.get_node_ip_address())))
        state.attempts.append({"step": state.step, "workers": self.world_size, "nodes": nodes})
        if self.rank != 0:
            return
        changed = resizes(state.attempts[-2:])
        if changed:
            _say(f"resized at step {state.step}: {changed[0]['from']} -> {changed[0]['to']} "
                 f"workers")
        _say(f"{self.world_size} worker(s) on {len(nodes)} node(s): {', '.join(nodes)}")

    def record_startup(self) -> None:
        """After the first step: the start-up in this attempt's record, and one line."""
        float(next(iter(self.model.parameters())).detach().sum())  # the step done on the device
        self.startup.mark("first_step")
        self.state.attempts[-1] |= {"submitted_at": self.startup.submitted_at,
                                    "startup_s": dict(self.startup.seconds)}
        if self.rank == 0:
            _say(self.startup.describe())

    def evaluate_and_report(self, epoch: int) -> None:
        """Score the validation split, keep the best weights, report a checkpoint."""
        cfg, state, model = self.cfg, self.state, self.model
        sync_buffers(model)
        metrics = {"step": state.step, "epoch": epoch, "samples_seen": state.samples_seen}
        if self.has_val:
            val = evaluate(unwrap(model), cfg.data, cfg.eval.val_split, cfg.eval,
                           rank=self.rank, world_size=self.world_size, device=self.device,
                           precision=cfg.train.precision)
            metrics |= {f"val/{k}": v for k, v in val.items()}
            score = metrics[cfg.eval.selection_metric]  # `val/R@K`
        else:
            score = float(state.step)  # no validation split: the latest is the best
        if score > state.best_score:
            state.best_score, state.best_step = score, state.step
            # On the CPU: a second copy of the weights must not cost GPU memory.
            self.best_model = {k: v.detach().to("cpu", copy=True)
                               for k, v in unwrap(model).state_dict().items()}
        metrics["score"] = score
        state.history.append({k: v for k, v in metrics.items() if k != "epoch"})
        self.progress.scalars(state.step, {k: v for k, v in metrics.items() if "/" in k})
        if self.rank == 0 and self.has_val:
            _say(format_table(val, f"validation at step {state.step} (%)"))
        # The checkpoint holds the current weights and, when they are not the best, the best
        # ones too, and every rank's random state; restarts resume from here.
        best = self.best_model if state.best_step != state.step else None
        rng = gather_objects(rng_state())
        _report(metrics, self.snapshot(unwrap(model).state_dict(), best, rng), self.rank,
                layout.checkpoint_dir_name(state.step))

    def final_report(self) -> None:
        """Test recall of the best-by-validation weights, reported with them as the checkpoint,
        with what they retrieve for a few fixed test queries (for the run report)."""
        cfg, state, model = self.cfg, self.state, unwrap(self.model)
        final_weights = self.best_model if self.best_model is not None else model.state_dict()
        model.load_state_dict(final_weights)
        test, retrieved = evaluate_with_retrievals(
            model, cfg.data, cfg.eval.test_split, cfg.eval, rank=self.rank,
            world_size=self.world_size, device=self.device, precision=cfg.train.precision)
        final = {"step": state.step, "samples_seen": state.samples_seen,
                 "best_step": state.best_step, "resumes": state.resumes,
                 "workers": self.world_size, "resizes": resizes(state.attempts),
                 "restarts": [a["step"] for a in state.attempts[1:]],
                 "startup_s": state.attempts[-1].get("startup_s", {}) if state.attempts else {},
                 "nodes": state.attempts[-1]["nodes"] if state.attempts else [],
                 "score": state.best_score, layout.FINAL_FLAG: True}
        if cfg.train.compile != "none":
            final["compile"] = self.compile_watch.summary()
        final |= {f"test/{k}": v for k, v in test.items()}
        # The validation recall of these weights too, so a scheduler or searcher watching
        # `val/...` sees it in the final result as in every other.
        best_row = next((h for h in state.history
                         if h["step"] == state.best_step and "score" in h), {})
        final |= {k: v for k, v in best_row.items() if k.startswith("val/")}
        self.progress.scalars(state.step, {k: v for k, v in final.items()
                                           if k.startswith("test/")})
        self.progress.close()
        state.finished, state.final_metrics = True, final
        _report(final, self.snapshot(final_weights, None), self.rank, layout.FINAL_CHECKPOINT,
                files={layout.RETRIEVALS_FILE: json.dumps(retrieved)})
