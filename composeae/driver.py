"""The driver side of a training run, in three seams that the CLI, Tune trials and the nightly
job all call; and starting or joining Ray.

    prepared = prepare_run(cfg)                      # once: data present, tokenizer, paths
    trainer = build_trainer(prepared, cfg, callbacks) # per run or per trial
    summary = finish_run(prepared, cfg, trainer.fit())  # metrics.json, report.html

`run_training(cfg)` is the three in a row with Ray started in between. Nothing here prints: the
progress lines come from the workers, the recall table from the command line. A Ray Train V2 run
is identified by its name and storage path, so building the trainer again for the same
`train.name` resumes that run from its last checkpoint (or, when it finished, returns it as it
is).

Ray: inside `ray job submit` (RAY_ADDRESS is set) or with `ray.address` configured, the driver
joins that cluster; otherwise it starts an embedded local Ray with `address="local"`, so a stray
cluster on the machine is never joined by accident.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from composeae.config import Config, config_to_dict, dump_config, replace
from composeae.errors import UserError

log = logging.getLogger(__name__)

FAULT_ENV = "COMPOSEAE_FAULT_AT_STEP"
"""Fault injection for tests and drills: `STEP` or `STEP:RANK` kills that worker once at STEP."""
STATE_TRACKING_ENV = "RAY_TRAIN_ENABLE_STATE_TRACKING"
"""Ray's dashboard shows Train runs only when the Train controller runs with this set to 1."""


# -- Ray ----------------------------------------------------------------------------------------
def init_ray(cfg: Config) -> None:
    """Join the configured or job's cluster, or start an embedded local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # Processes of the embedded Ray inherit this environment: the Train page gets its runs.
    os.environ.setdefault(STATE_TRACKING_ENV, "1")
    # Enough logical CPUs for the workers (plus the Train controller), whatever the core count.
    need = int(cfg.ray.num_workers * cfg.ray.cpus_per_worker) + 1
    # The dashboard stays on: people watch runs there, and Ray Train's cleanup polls its state API.
    ray.init(address="local", num_cpus=max(need, os.cpu_count() or 1), log_to_driver=True)


def absolute_url(url: str) -> str:
    """A local path made absolute (Ray workers do not run in the driver's directory); `s3://`
    URLs unchanged (pyarrow and boto3 honour AWS_ENDPOINT_URL for S3-compatible servers)."""
    return url if url.startswith("s3://") else str(Path(url).resolve())


def absolute_paths(cfg: Config) -> Config:
    """The config with its local paths made absolute: dataset, run storage, the model registry
    and the files every worker opens (`model.image_weights`, `model.bert_path`,
    `train.init_from`)."""
    files = {k: absolute_url(v) for k, v in (("image_weights", cfg.model.image_weights),
                                              ("bert_path", cfg.model.bert_path)) if v}
    train = {"storage": absolute_url(cfg.train.storage)}
    if cfg.train.init_from:
        train["init_from"] = absolute_url(cfg.train.init_from)
    return replace(cfg, data={"url": absolute_url(cfg.data.url)}, train=train, model=files,
                   nightly={"registry": absolute_url(cfg.nightly.registry)})


def run_url(cfg: Config) -> str:
    """Where the run named `train.name` lives: checkpoints, metrics.json, report, events."""
    from composeae import storage

    return storage.join(cfg.train.storage, cfg.train.name)


class _Box:
    """One value handed from a worker to the driver through Ray (a zero-CPU actor), so results
    never depend on a file the driver and rank 0 would both have to see."""

    def __init__(self) -> None:
        self.value: Any = None

    def put(self, value: Any) -> None:
        self.value = value

    def get(self) -> Any:
        return self.value


def result_box():
    """A `_Box` actor handle; pass it to workers, `ray.get(box.get.remote())` afterwards."""
    import ray

    return ray.remote(num_cpus=0)(_Box).remote()


def check_local_paths_on_nodes(paths: dict[str, str]) -> None:
    """Each local path in {what: path} must exist on every node of the connected cluster.

    On one machine this is the driver's view; on a multi-node cluster a path that exists only on
    the driver's disk (a dataset or checkpoint the workers cannot read) fails here, in one line
    naming it and the node, instead of inside a worker. `s3://` URLs are skipped.
    """
    from composeae.run.nodefiles import missing_on_nodes

    local = {what: path for what, path in paths.items() if not path.startswith("s3://")}
    for what, nodes in missing_on_nodes(local).items():
        raise UserError(f"{what}: {local[what]} does not exist on node {', '.join(nodes)} "
                        f"(use s3:// or a filesystem shared by every node)")


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
        from composeae.run.build import build_tokenizer

        key = (cfg.model.text_encoder, cfg.model.bert_path, cfg.model.bert_vocab_size,
               cfg.train.init_from)
        if key not in self.tokenizers and cfg.train.init_from:
            # A warm start keeps the vocabulary its weights were trained with (word embeddings
            # are rows of it); words new since then map to the unknown token.
            from composeae.checkpoint import load_checkpoint

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

    @property
    def test(self) -> dict[str, float]:
        return {k: v for k, v in self.metrics.items() if k.startswith("test/")}


def prepare_run(cfg: Config) -> PreparedRun:
    """Check the experiment, make its paths absolute, build CSS-synth if asked, read the corpus
    and build the tokenizer. Once per experiment or sweep, before Ray starts any trial."""
    from composeae.data.shardset import has_split, load_corpus
    from composeae.models.zoo import model_class

    model_class(cfg.model.name)  # an unknown model fails here, before anything is written
    from composeae.models.pretrained import check_pretrained
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
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from composeae import storage
    from composeae.models.zoo import model_class
    from composeae.train import train_loop_per_worker

    cfg = absolute_paths(cfg or prepared.cfg)
    if cfg.data.url != prepared.cfg.data.url:
        raise UserError(f"data.url {cfg.data.url} differs from the prepared {prepared.cfg.data.url}")
    model_class(cfg.model.name)
    url = run_url(cfg)
    storage.write_text(storage.join(url, "config.yaml"), dump_config(cfg))
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": config_to_dict(cfg), "tokenizer": prepared.tokenizer_state(cfg),
                           "tensorboard_url": storage.join(url, "tensorboard"),
                           "fault": fault_plan()},
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker={"CPU": cfg.ray.cpus_per_worker}),
        run_config=RunConfig(
            name=cfg.train.name, storage_path=cfg.train.storage, callbacks=list(callbacks),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.num_to_keep,
                                               checkpoint_score_attribute="score",
                                               checkpoint_score_order="max")),
    )


def checkpoint_url(cfg: Config, checkpoint) -> str:
    """A reported checkpoint as a URL: `s3://bucket/...` for S3 storage (pyarrow's path has no
    scheme), an absolute path locally."""
    from composeae import storage

    return storage.join(run_url(cfg), Path(checkpoint.path).name)


def finish_run(prepared: PreparedRun, cfg: Config | None, result) -> RunSummary:
    """Check the run ended with its final report; write `metrics.json` and `report.html`."""
    from composeae import storage
    from composeae.report import write_report
    from composeae.retrievals import load_record
    from composeae.train import HISTORY_FILE

    cfg = absolute_paths(cfg or prepared.cfg)
    if result.checkpoint is None or not (result.metrics or {}).get("final"):
        raise RuntimeError(f"run {cfg.train.name} ended without its final report")
    url = run_url(cfg)
    final = checkpoint_url(cfg, result.checkpoint)
    history = json.loads(storage.read_text(storage.join(final, HISTORY_FILE)))
    metrics = {k: v for k, v in result.metrics.items() if k != "final"}
    metrics["checkpoint"] = final
    text = json.dumps(metrics, indent=2) + "\n"
    metrics_url = storage.join(url, "metrics.json")
    # A resubmitted finished run ends with the same metrics: its files stay as they are.
    if not storage.exists(metrics_url) or storage.read_text(metrics_url) != text:
        storage.write_text(metrics_url, text)
        write_report(url, cfg, history, metrics, retrievals=load_record(final))
    return RunSummary(run_url=url, checkpoint_url=final, metrics=metrics, history=history)


def run_training(cfg: Config | PreparedRun) -> RunSummary:
    """Prepare (unless given a prepared run), start or join Ray, train, and finish the run."""
    prepared = cfg if isinstance(cfg, PreparedRun) else prepare_run(cfg)
    init_ray(prepared.cfg)
    from composeae.run.nodefiles import check_node_files

    check_node_files(prepared.cfg)
    check_local_paths_on_nodes({"data.url": prepared.cfg.data.url}
                               | ({"train.init_from": prepared.cfg.train.init_from}
                                  if prepared.cfg.train.init_from else {}))
    result = build_trainer(prepared).fit()
    return finish_run(prepared, None, result)


def fault_plan() -> dict | None:
    """The worker fault planned by COMPOSEAE_FAULT_AT_STEP in the driver's environment."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    import tempfile
    import uuid

    marker = Path(tempfile.gettempdir()) / f"composeae-fault-{uuid.uuid4().hex}"
    return {"spec": spec, "marker": str(marker)}


def describe(cfg: Config) -> str:
    """The line the command line prints when a run starts."""
    kind = "GPU" if cfg.ray.use_gpu else "CPU"
    return (f"training {cfg.model.name} on {cfg.data.url} with {cfg.ray.num_workers} {kind} "
            f"worker(s); run {run_url(cfg)}")


def ensure_dataset(cfg: Config) -> Config:
    """Fail early on a missing dataset, or build CSS-synth there when the config asks to."""
    from composeae import storage
    from composeae.data.schema import MANIFEST

    if storage.exists(storage.join(cfg.data.url, MANIFEST)):
        return cfg
    if not cfg.data.synth_if_missing:
        raise UserError(f"no dataset at {cfg.data.url} (manifest.json not found); build one with "
                        f"`composeae shards synth` or `composeae shards convert`")
    from composeae.data.synth import generate

    log.info("building CSS-synth '%s' shards at %s", cfg.data.synth_preset, cfg.data.url)
    generate(cfg.data.url, preset=cfg.data.synth_preset, seed=cfg.train.seed,
             image_size=cfg.data.image_size)
    return cfg
