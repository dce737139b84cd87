"""The driver side of a training run, in three seams that the CLI, Tune trials and the nightly
job all call.

    prepared = prepare_run(cfg)                      # once: data present, tokenizer, paths
    trainer = build_trainer(prepared, cfg, callbacks) # per run or per trial
    summary = finish_run(prepared, cfg, trainer.fit())  # metrics.json, report.html

`run_training(cfg)` is the three in a row with Ray started in between. Nothing here prints: the
progress lines come from the workers, the recall table from the command line. A Ray Train V2 run
is identified by its name and storage path, so building the trainer again for the same
`train.name` resumes that run from its last checkpoint (or, when it finished, returns it as it
is).

Ray itself (joining or starting it, the workers' resources, node checks) is `composeae.run.cluster`;
the names of the files a run writes are `composeae.run.layout`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from composeae import storage
from composeae.checkpoint import load_checkpoint
from composeae.config import (Config, config_from_dict, config_to_dict, dump_config,
                              global_batch, replace, worker_range)
from composeae.data.schema import MANIFEST
from composeae.data.shardset import has_split, load_corpus
from composeae.data.synth import generate
from composeae.errors import UserError
from composeae.models import model_class
from composeae.models.pretrained import check_pretrained
from composeae.report.run_page import write_report
from composeae.run import layout
from composeae.run.build import build_tokenizer
from composeae.run.cluster import (absolute_paths, check_local_paths_on_nodes,
                                   check_storage_on_nodes, init_ray,
                                   scaling_config, train_logging_config, wait_for_resources)
from composeae.run.layout import run_url
from composeae.run.nodefiles import check_node_files
from composeae.run.worker import train_loop_per_worker

log = logging.getLogger(__name__)

FAULT_ENV = "COMPOSEAE_FAULT_AT_STEP"
"""Fault injection for tests and drills: `STEP` or `STEP:RANK` kills that worker once at STEP."""


# -- the three seams ----------------------------------------------------------------------------
@dataclass
class PreparedRun:
    """What every run or trial of one experiment shares, built once by `prepare_run`."""
    cfg: Config
    """The experiment config with absolute paths (trials vary other keys of it)."""
    corpus: list[str]
    """The training texts, from which each text encoder's tokenizer is built."""
    tokenizers: dict[tuple, dict] = field(default_factory=dict)
    """Tokenizer states by text settings, so a sweep over text encoders builds each once."""

    def tokenizer_state(self, cfg: Config) -> dict:
        """The tokenizer of `cfg`'s text settings, built once per settings."""
        key = (cfg.model.text_encoder, cfg.model.bert_path, cfg.model.bert_vocab_size,
               cfg.train.init_from)
        if key not in self.tokenizers and cfg.train.init_from:
            # A warm start keeps the vocabulary its weights were trained with (word embeddings
            # are rows of it); words new since then map to the unknown token.
            self.tokenizers[key] = load_checkpoint(cfg.train.init_from)["tokenizer"]
        if key not in self.tokenizers:
            self.tokenizers[key] = build_tokenizer(
                cfg.model.text_encoder, self.corpus, bert_path=cfg.model.bert_path,
                vocab_size=cfg.model.bert_vocab_size).state()
        return self.tokenizers[key]


@dataclass(frozen=True)
class RunSummary:
    """What a finished run produced; `finish_run` has written it to the run directory."""
    run_url: str
    checkpoint_url: str
    """The final checkpoint (best-by-validation weights) as a URL `composeae eval` accepts."""
    metrics: dict[str, Any]
    """step, samples_seen, best_step, resumes, score and `test/R@K`."""
    history: list[dict[str, float]]
    """Logged training rows and validation rows, in step order."""
    already_finished: bool = False
    """The run had finished before it was submitted again: no worker started."""

    @property
    def test(self) -> dict[str, float]:
        return {k: v for k, v in self.metrics.items() if k.startswith("test/")}


def prepare_run(cfg: Config) -> PreparedRun:
    """Check the experiment, make its paths absolute, build CSS-synth if asked, read the corpus
    and build the tokenizer. Once per experiment or sweep, before Ray starts any trial."""
    model_class(cfg.model.name)  # an unknown model fails here, before anything is written
    check_pretrained(cfg.model)  # so do random frozen or missing pretrained encoders
    cfg = ensure_dataset(absolute_paths(cfg))
    if not has_split(cfg.data, cfg.eval.test_split):
        raise UserError(f"dataset {cfg.data.url} has no split {cfg.eval.test_split!r}")
    prepared = PreparedRun(cfg=cfg, corpus=load_corpus(cfg.data))
    prepared.tokenizer_state(cfg)
    return prepared


def build_trainer(prepared: PreparedRun, cfg: Config | None = None,
                  callbacks: Iterable[Any] = ()):
    """The `TorchTrainer` for `cfg` (default: the prepared config): run `cfg.train.name` under
    `cfg.train.storage`, with Ray Train callbacks (e.g. Tune's `TuneReportCallback`)."""
    # deferred: Ray takes seconds to import; a driver reaches for it only to build the run
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    cfg = absolute_paths(cfg or prepared.cfg)
    if cfg.data.url != prepared.cfg.data.url:
        raise UserError(f"data.url {cfg.data.url} differs from the prepared {prepared.cfg.data.url}")
    model_class(cfg.model.name)
    url = run_url(cfg)
    storage.write_text(storage.join(url, layout.CONFIG_FILE), dump_config(cfg))
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": config_to_dict(cfg), "tokenizer": prepared.tokenizer_state(cfg),
                           "tensorboard_url": storage.join(url, layout.TENSORBOARD_DIR),
                           "fault": fault_plan(),
                           # the start of the start-up the workers time (`worker.Startup`)
                           "submitted_at": time.time()},
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(
            name=cfg.train.name, storage_path=cfg.train.storage, callbacks=list(callbacks),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            logging_config=train_logging_config(cfg),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.num_to_keep,
                                               checkpoint_score_attribute="score",
                                               checkpoint_score_order="max")),
    )


def checkpoint_url(cfg: Config, checkpoint) -> str:
    """A reported checkpoint as a URL: `s3://bucket/...` for S3 storage (pyarrow's path has no
    scheme), an absolute path locally."""
    return storage.join(run_url(cfg), Path(checkpoint.path).name)


def _summary(url: str, metrics: dict[str, Any], already_finished: bool = False) -> RunSummary:
    """A finished run's summary from its metrics (they name the final checkpoint, which holds
    the history)."""
    final = metrics["checkpoint"]
    history = json.loads(storage.read_text(storage.join(final, layout.HISTORY_FILE)))
    return RunSummary(run_url=url, checkpoint_url=final, metrics=metrics, history=history,
                      already_finished=already_finished)


def finish_run(prepared: PreparedRun, cfg: Config | None, result) -> RunSummary:
    """Check the run ended with its final report; write `report.html`, then `metrics.json`
    (last: its presence marks the run finished, so a driver killed between the two leaves a run
    that a resubmission finishes again rather than one without its report)."""
    cfg = absolute_paths(cfg or prepared.cfg)
    if result.checkpoint is None or not (result.metrics or {}).get(layout.FINAL_FLAG):
        raise RuntimeError(f"run {cfg.train.name} ended without its final report")
    url = run_url(cfg)
    metrics = {k: v for k, v in result.metrics.items() if k != layout.FINAL_FLAG}
    metrics["checkpoint"] = checkpoint_url(cfg, result.checkpoint)
    summary = _summary(url, metrics)
    text = json.dumps(metrics, indent=2) + "\n"
    metrics_url = storage.join(url, layout.METRICS_FILE)
    # A resubmitted finished run ends with the same metrics: its files stay as they are.
    if not storage.exists(metrics_url) or storage.read_text(metrics_url) != text:
        write_report(storage.join(url, layout.REPORT_FILE), cfg, summary.history, metrics,
                     retrievals=load_retrievals(summary.checkpoint_url))
        storage.write_text(metrics_url, text)
    return summary


def finished_run(prepared: PreparedRun) -> RunSummary | None:
    """The summary of this very run when it has already finished (its `metrics.json`, written
    only after the final report, is there, and its `config.yaml` is this config but for where
    it ran: `ray` and the per-worker batch), else None. The workers would only restore the final
    checkpoint and report it again; answering here spares a resubmission the seconds a worker
    group takes to start."""
    url = run_url(prepared.cfg)
    metrics_url = storage.join(url, layout.METRICS_FILE)
    started = started_config(prepared.cfg)
    if not (storage.exists(metrics_url) and started is not None
            and not changed_keys(started, prepared.cfg)):
        return None
    return _summary(url, json.loads(storage.read_text(metrics_url)), already_finished=True)


def started_config(cfg: Config) -> Config | None:
    """The config a run named like `cfg`'s was started with (its `config.yaml`), if it exists."""
    url = storage.join(run_url(absolute_paths(cfg)), layout.CONFIG_FILE)
    if not storage.exists(url):
        return None
    return config_from_dict(yaml.safe_load(storage.read_text(url)))


def _what_it_is(cfg: Config) -> dict[str, Any]:
    """The keys that make a run what it is: all but where and how it runs (`ray`, the
    per-worker batch that follows from the workers (the global batch stays), and
    `train.compile`, whose checkpoints are an eager run's)."""
    flat = {f"{section}.{key}": value for section, values in config_to_dict(cfg).items()
            if section != "ray" for key, value in values.items()
            if key not in ("batch_size", "compile")}
    return flat | {"global batch": global_batch(cfg)}


def changed_keys(started: Config, cfg: Config) -> list[str]:
    """`key (old -> new)` for each key of what the run is that `cfg` changes."""
    old, new = _what_it_is(started), _what_it_is(absolute_paths(cfg))
    return [f"{key} ({old[key]!r} -> {new[key]!r})" for key in old if old[key] != new[key]]


def resume_as_started(cfg: Config) -> tuple[Config, str | None]:
    """`cfg`, or for a run that exists the config it was started with (with `cfg`'s `ray`
    section and `train.compile`, and the per-worker batch that keeps its global batch on those
    workers), and one line naming the keys that differ and what happens; None when nothing
    differs.

    The rule: an unfinished run resumes as it was started; a finished run trains nothing. To
    run a changed config, give it another `train.name`."""
    started = started_config(cfg)
    if started is None:
        return cfg, None
    name, workers = cfg.train.name, worker_range(cfg.ray)[1]
    total = global_batch(started)
    if total % workers:
        raise UserError(f"run {name} was started with a global batch of {total}, which cannot "
                        f"be split evenly over {workers} workers (ray.num_workers); resume it on "
                        f"a number of workers that divides it, or give it a new train.name")
    resumed = replace(started, ray=config_to_dict(cfg)["ray"],
                      train={"batch_size": total // workers, "compile": cfg.train.compile})
    changed = changed_keys(started, cfg)
    if not changed:
        return resumed, None
    listed = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
    finished = storage.exists(storage.join(run_url(absolute_paths(cfg)), layout.METRICS_FILE))
    what = ("has finished; its config differs in {}, which is ignored: nothing is trained"
            if finished else "exists and was started with another config: {} differ; it resumes "
            "as it was started (only the ray section and train.compile follow this "
            "submission)").format(listed)
    return resumed, (f"run {name} {what}; to run the changed config, give it a new name: "
                     f"--set train.name={name}-2")


def run_training(cfg: Config | PreparedRun) -> RunSummary:
    """Prepare (unless given a prepared run), start or join Ray, train, and finish the run (a
    run that has already finished is returned as it is, without starting Ray)."""
    prepared = cfg if isinstance(cfg, PreparedRun) else prepare_run(cfg)
    check_outside_job_copy("train.storage", prepared.cfg.train.storage)
    done = finished_run(prepared)
    if done is not None:
        return done
    init_ray(prepared.cfg)
    wait_for_resources(prepared.cfg)
    check_node_files(prepared.cfg)
    check_local_paths_on_nodes({"data.url": prepared.cfg.data.url}
                               | ({"train.init_from": prepared.cfg.train.init_from}
                                  if prepared.cfg.train.init_from else {}))
    check_storage_on_nodes("train.storage", prepared.cfg.train.storage)
    result = build_trainer(prepared).fit()
    return finish_run(prepared, None, result)


def fault_plan() -> dict | None:
    """The worker fault planned by COMPOSEAE_FAULT_AT_STEP in the driver's environment."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    marker = Path(tempfile.gettempdir()) / f"composeae-fault-{uuid.uuid4().hex}"
    return {"spec": spec, "marker": str(marker)}


def describe(cfg: Config) -> str:
    """The line the command line prints when a run starts."""
    kind = "GPU" if cfg.ray.use_gpu else "CPU"
    low, high = worker_range(cfg.ray)
    workers = f"{high}" if low == high else f"{low} to {high} (elastic)"
    return (f"training {cfg.model.name} on {cfg.data.url} with {workers} {kind} worker(s), "
            f"global batch {global_batch(cfg)} = {high} x {cfg.train.batch_size} per worker; "
            f"run {run_url(cfg)}")


RAY_JOB_COPY = ("working_dir_files", "_ray_pkg_")
"""Ray unpacks a job's `--working-dir` into `.../runtime_resources/working_dir_files/_ray_pkg_<hash>/`
and deletes it later: what a job writes there under a relative path is lost."""


def check_outside_job_copy(what: str, url: str) -> None:
    """Refuse a local store (`what`: the config key) that would land inside the job's temporary
    copy of its working directory, in one line naming what to pass instead."""
    if storage.is_s3(url):
        return
    parts = Path(storage.absolute_url(url)).parts
    inside = any(a == RAY_JOB_COPY[0] and b.startswith(RAY_JOB_COPY[1])
                 for a, b in zip(parts, parts[1:]))
    if inside:
        raise UserError(f"{what} {url} is inside this Ray job's temporary copy of its working "
                        f"directory, which Ray deletes: pass an absolute path that every node "
                        f"sees (e.g. --set {what}=$PWD/runs when submitting) or an s3:// URL")


def ensure_dataset(cfg: Config) -> Config:
    """Fail early on a missing dataset, or build CSS-synth there when the config asks to."""
    if storage.exists(storage.join(cfg.data.url, MANIFEST)):
        return cfg
    if not cfg.data.synth_if_missing:
        raise UserError(f"no dataset at {cfg.data.url} (manifest.json not found); build one with "
                        f"`composeae shards synth` or `composeae shards convert`")
    log.info("building CSS-synth '%s' shards at %s", cfg.data.synth_preset, cfg.data.url)
    generate(cfg.data.url, preset=cfg.data.synth_preset, seed=cfg.train.seed,
             image_size=cfg.data.image_size)
    return cfg


def load_retrievals(checkpoint_url: str) -> dict[str, Any] | None:
    """The retrieval record in a checkpoint directory, None when it has none (older runs)."""
    url = storage.join(checkpoint_url, layout.RETRIEVALS_FILE)
    if not storage.exists(url):
        return None
    return json.loads(storage.read_text(url))
