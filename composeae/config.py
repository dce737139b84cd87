"""The one configuration tree: frozen dataclasses, one per YAML section.

`load_config(path, overrides)` reads a YAML file whose top-level sections map one-to-one onto
`Config`'s fields, applies dotted `section.key=value` overrides (values parsed as YAML scalars),
and validates everything. Unknown keys, wrong types and impossible values raise `UserError`
naming the key, so a bad config fails before any worker starts. `dump_config` writes the
resolved tree back to YAML (next to every run and inside every checkpoint).

One module, longer than most, on purpose: each key's documentation sits beside the type that
checks it, the rule that validates it and the loader that reads it, and every layer imports it.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from composeae.errors import UserError


class YamlLoader(yaml.SafeLoader):
    """YAML with YAML 1.2 floats: `1e-4` is a number, not the string '1e-4' (YAML 1.1)."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def parse_value(text: str) -> Any:
    """A value as written after `key=` on the command line (`1e-3` a float, `none` a string);
    text that is not valid YAML stays text."""
    if not text.strip():
        return None
    try:
        return yaml.load(text, Loader=YamlLoader)
    except yaml.YAMLError:
        return text


@dataclass(frozen=True)
class DataConfig:
    """`data`: the dataset and how its shards are streamed to the workers."""
    url: str = "shards/css-synth-small"
    """Dataset root: a local directory or `s3://bucket/prefix` holding `manifest.json`."""
    image_size: int = 64
    """Square side images are resized to before they reach the image encoder."""
    text_mode: Literal["modifier", "complete"] = "modifier"
    """Query text: the modification text, or the paper's "complete text query"."""
    loader_workers: int = 1
    """DataLoader worker processes per training rank."""
    shuffle_buffer: int = 500
    """Samples held in the streaming shuffle buffer."""
    augment: bool = False
    """Random resized crops and flips on training images (off for CSS-synth: positions matter).
    Otherwise, and always at evaluation: short side resized, centre crop."""
    pairs: Literal["per_step", "fixed"] = "per_step"
    """Training pairs of datasets stored as pairing groups (Fashion200k, MIT-States): `per_step`
    draws each reference's target afresh at every pass, as the original samplers did; `fixed`
    draws it once per seed. Other datasets' pairs are their annotations."""
    open_groups: int = 32
    """Pairing groups a loader worker draws pairs from at once (memory: their images)."""
    synth_preset: Literal["tiny", "small", "full"] = "small"
    """CSS-synth preset built when `url` holds no dataset and the config asks for synthesis."""
    synth_if_missing: bool = False
    """Build CSS-synth shards at `url` when no manifest is there (the demo's convenience)."""


@dataclass(frozen=True)
class ModelConfig:
    """`model`: the model and its encoders (`composeae models` lists the models)."""
    name: str = "composeae"
    """Registered model name (`composeae models` lists them)."""
    embed_dim: int = 512
    """Dimension of the joint embedding space where queries and targets meet."""
    image_encoder: Literal["small_cnn", "resnet18", "resnet50"] = "small_cnn"
    """Image backbone; `small_cnn` is sized for 64 px synthetic scenes."""
    image_weights: str | None = None
    """Torchvision state dict for the ResNet: a file on every node or an `s3://` URL (fetched once
    per node into `COMPOSEAE_CACHE_DIR`); random init when unset."""
    image_dim: int = 512
    """Image feature size after the backbone's projection layer."""
    text_encoder: Literal["lstm", "bert"] = "lstm"
    """Text backbone: an LSTM over a corpus vocabulary, or BERT through `transformers`."""
    text_dim: int = 512
    """Text feature size (LSTM hidden size; BERT's hidden size is projected to it)."""
    word_dim: int = 256
    """LSTM word embedding size."""
    max_text_len: int = 32
    """Tokens kept per text."""
    bert_path: str | None = None
    """Pretrained BERT in `save_pretrained` layout: a directory on every node or an `s3://` prefix
    (fetched once per node into `COMPOSEAE_CACHE_DIR`); scratch BERT when unset."""
    bert_layers: int = 2
    """Scratch BERT: transformer layers."""
    bert_hidden: int = 256
    """Scratch BERT: hidden size."""
    bert_heads: int = 4
    """Scratch BERT: attention heads."""
    bert_vocab_size: int = 2000
    """Scratch BERT: WordPiece vocabulary size trained on the corpus."""
    freeze_text: bool = False
    """Keep the text encoder's weights fixed (the paper used a frozen BERT)."""
    freeze_image: bool = False
    """Keep the image backbone's weights fixed."""
    dropout: float = 0.5
    """Dropout in ComposeAE's image projection eta."""
    a_init: float = 10.0
    """Initial weight of a two-branch composer's main branch, the other starting at 1 (the
    learnable `a` of the official code, (1, 10)): rho against rho_conv in ComposeAE and its
    real-space ablations, the residual against the gated image in TIRG."""
    projection: Literal["shared", "separate"] = "shared"
    """ComposeAE's complex projection (eta, gamma): `shared` feeds rho and rho_conv from one, as
    the paper's figure draws it; `separate` gives each its own, as the official code does (its
    published numbers come from that)."""
    pretrained: bool = False
    """The config reproduces a published result: a ResNet needs `image_weights` and BERT needs
    `bert_path`, or the run stops before any worker starts (see `allow_random_init`)."""
    allow_random_init: bool = False
    """Run anyway when a frozen encoder, or an encoder of a `pretrained` config, has no weights."""


@dataclass(frozen=True)
class LossConfig:
    """`loss`: the base metric-learning loss and the weights of the auxiliary terms."""
    base: Literal["batch_classification", "soft_triplet"] = "batch_classification"
    """Metric-learning loss between composed queries and targets."""
    init_scale: float = 4.0
    """Initial value of the learnable scale on normalized similarities."""
    symmetric: bool = False
    """Batch classification in both directions (query->target and target->query)."""
    gather_negatives: bool = False
    """Use targets from every DDP rank as negatives (gradients flow to the local slice)."""
    soft_triplet_gradient: Literal["exact", "official"] = "exact"
    """Soft triplet backward: `official` halves the gradient as the official code's legacy
    backward does (it drops the 2 of d|a - b|^2 / da); only to reproduce its runs."""
    w_base: float = 1.0
    """Weight of the base loss."""
    w_img_rec: float = 0.1
    """Weight of ComposeAE's image reconstruction loss."""
    w_txt_rec: float = 0.1
    """Weight of ComposeAE's text reconstruction loss."""
    w_sym: float = 0.01
    """Weight of ComposeAE's rotational symmetry loss."""


@dataclass(frozen=True)
class OptimConfig:
    """`optim`: the optimizer and the learning-rate schedule."""
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    """Optimizer; the paper's is SGD with momentum 0.9."""
    lr: float = 1e-2
    """Learning rate of the composer, projections and text encoder."""
    backbone_lr_mult: float = 0.1
    """Image backbone learning rate = lr x this (the paper: 1e-3 vs 1e-2)."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-5
    """Weight decay."""
    schedule: Literal["step", "cosine", "constant"] = "step"
    """Learning-rate schedule over training steps."""
    decay_every: int = 50_000
    """Step schedule: multiply the rate by `decay_factor` every this many steps."""
    decay_factor: float = 0.1
    """Step schedule: the multiplier."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value; 0 disables."""


@dataclass(frozen=True)
class TrainConfig:
    """`train`: the run: its name and storage, length, batch, evaluation cadence."""
    name: str = "composeae-demo"
    """Run name: a second submission with the same name and storage resumes the run as it was
    started (its own config; only the `ray` section is the new submission's) or, when it has
    finished, trains nothing; a line names the keys that differ."""
    storage: str = "runs"
    """Where runs live: a local directory or `s3://bucket/prefix`; on a cluster an absolute path
    every node sees, or `s3://` (never inside a job's temporary working-directory copy)."""
    steps: int = 1000
    """Total optimizer steps."""
    batch_size: int = 32
    """Batch per worker. The global batch is this x the most workers of `ray.num_workers` (it
    stays the same when an elastic group shrinks or grows). The experiment file fixes the global
    batch: when a profile or `--set ray.num_workers` changes the workers, this is derived (the
    file's global batch / the workers); only `--set train.batch_size` changes the global batch."""
    eval_every: int = 250
    """Evaluate on the validation split and checkpoint every this many steps."""
    log_every: int = 20
    """Log progress every this many steps."""
    seed: int = 0
    """Seed for weights, shuffling and dropout."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """`auto` uses bf16 autocast on GPU and fp32 on CPU."""
    init_from: str | None = None
    """Checkpoint (path or `s3://`) whose weights and tokenizer start a new run: a warm start.
    The model settings must match it; a resumed run continues from its own checkpoint."""
    compile: Literal["none", "default", "reduce-overhead", "max-autotune"] = "none"
    """`torch.compile` of the model and its loss in training (evaluation stays eager):
    `default` (inductor kernels), `reduce-overhead` (also CUDA graphs: GPU only) or
    `max-autotune` (also searches kernel configurations; slow to compile). The first steps
    compile (minutes on CPU, cached on disk for the next run); checkpoints are the same as an
    eager run's."""


@dataclass(frozen=True)
class EvalConfig:
    """`eval`: recall@K during and after training; the metric that picks the best weights."""
    ks: tuple[int, ...] = (1, 5, 10, 50)
    """Cut-offs K reported as R@K."""
    val_split: str = "val"
    """Split evaluated during training (skipped when the dataset has none)."""
    test_split: str = "test"
    """Split evaluated at the end of training."""
    batch_size: int = 128
    """Embedding batch size per rank."""
    chunk_size: int = 1024
    """Queries scored at once in recall@K (bounds memory for large galleries)."""
    selection_metric: str = "val/R@1"
    """Validation metric that picks the best checkpoint: `val/R@K` for a K of `ks`."""


@dataclass(frozen=True)
class RayConfig:
    """`ray`: where and on what the workers run (profiles of `ray_config.yaml` set these)."""
    profile: str = "local"
    """Profile of `ray_config.yaml` applied on top of the file (before `--set`)."""
    address: str | None = None
    """Ray address; unset starts an embedded local Ray (or joins the job's cluster)."""
    num_workers: int | tuple[int, int] = 2
    """Training workers (DDP ranks): a number, or `[min, max]` for an elastic group that goes
    on with what the cluster holds (at least `min`) after losing a node and grows back to
    `max` when room returns."""
    wait_for_resources_s: float = 600.0
    """How long a run on a joined cluster waits for room for `min` workers (an autoscaler adding
    nodes) before it fails; an embedded Ray never gains any, so there it fails at once."""
    resize_check_s: float = 60.0
    """How often (seconds) a running elastic group checks whether it can grow."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Where workers go: `PACK` fills few nodes, `SPREAD` one worker per node where it can
    (`STRICT_*` or fail to start)."""
    use_gpu: bool = False
    """Workers on GPUs (`ray.gpus_per_worker` each), NCCL; otherwise gloo on CPU."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker."""
    gpus_per_worker: float = 1.0
    """GPUs reserved per worker with `ray.use_gpu`: a fraction (0.25) lets Ray place several
    workers on one GPU, e.g. the single-worker trials of a sweep of small models, which leave
    most of a card idle alone; their memory is then shared too."""
    max_failures: int = 1
    """Worker-group failures survived by restarting from the last checkpoint."""
    num_to_keep: int = 2
    """Checkpoints kept (the best by `eval.selection_metric`)."""


@dataclass(frozen=True)
class NightlyConfig:
    """`nightly`: champion against challenger, the model registry, the night's new data."""
    registry: str = "runs/registry"
    """The model registry: a local directory or `s3://bucket/prefix` (on a cluster: an absolute
    path every node sees, or `s3://`)."""
    alias: str = "champion"
    """The alias that names the model in service; the nightly job promotes to it."""
    split: str = "test"
    """The frozen split both models are scored on: neither picked its weights on it, and new
    data is only ever appended to the training split."""
    metric: str | None = None
    """The recall that decides promotion, `<split>/R@K` on `split` (e.g. `test/R@1`; default:
    the R@K of `eval.selection_metric` on `split`)."""
    margin_points: float = 0.5
    """Promote when the challenger's metric beats the champion's by more than this many percent
    points (0.5: half a point of R@1). Negative accepts a small regression."""
    warm_start: bool = True
    """Start the challenger from the champion's weights and tokenizer; false: from scratch."""
    new_data: Literal["none", "synth_day"] = "none"
    """`synth_day`: append the night's seeded CSS-synth slice to the training shards first (the
    stand-in for a day's new catalogue); `none`: whatever writes the shards appends them."""
    day_sources: int = 50
    """Source scenes in a CSS-synth day slice (each gives the preset's queries per source)."""
    history_nights: int = 30
    """Nights of the champion's metric drawn in the nightly report."""


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    nightly: NightlyConfig = field(default_factory=NightlyConfig)

    def __post_init__(self) -> None:
        validate(self)


# Fields that must be > 0 and >= 0 respectively, as "section.key".
_POSITIVE = {
    "data.image_size", "data.shuffle_buffer",
    "model.embed_dim", "model.image_dim", "model.text_dim", "model.word_dim",
    "model.max_text_len", "model.bert_layers", "model.bert_hidden", "model.bert_heads",
    "model.bert_vocab_size", "loss.init_scale", "optim.lr", "optim.decay_every",
    "optim.decay_factor", "train.steps", "train.batch_size", "train.eval_every",
    "train.log_every", "eval.batch_size", "eval.chunk_size", "ray.resize_check_s",
    "ray.cpus_per_worker", "ray.gpus_per_worker", "ray.num_to_keep", "nightly.day_sources",
    "nightly.history_nights",
}
_NON_NEGATIVE = {
    "data.loader_workers", "loss.w_base", "loss.w_img_rec", "loss.w_txt_rec", "loss.w_sym",
    "optim.backbone_lr_mult", "optim.momentum", "optim.weight_decay", "optim.warmup_steps",
    "optim.grad_clip", "train.seed", "ray.max_failures", "ray.wait_for_resources_s", "model.dropout", "model.a_init",
}


def validate(cfg: Config) -> None:
    """Check values that types alone cannot (ranges, cross-field rules).

    Model names are checked where models are created (`composeae.models.zoo`): the config tree
    knows nothing of the model zoo."""
    for dotted in _POSITIVE | _NON_NEGATIVE:
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if dotted in _POSITIVE and not value > 0:
            raise UserError(f"config key {dotted} must be > 0, got {value!r}")
        if dotted in _NON_NEGATIVE and value < 0:
            raise UserError(f"config key {dotted} must be >= 0, got {value!r}")
    if not cfg.model.dropout < 1:
        raise UserError(f"config key model.dropout must be < 1, got {cfg.model.dropout!r}")
    if cfg.model.bert_hidden % cfg.model.bert_heads:
        raise UserError("config key model.bert_hidden must be a multiple of model.bert_heads")
    if not cfg.eval.ks or any(k <= 0 for k in cfg.eval.ks):
        raise UserError(f"config key eval.ks must be positive integers, got {cfg.eval.ks!r}")
    if cfg.eval.selection_metric not in {f"val/R@{k}" for k in cfg.eval.ks}:
        raise UserError(
            f"config key eval.selection_metric={cfg.eval.selection_metric!r} is not one of "
            f"val/R@K for eval.ks={list(cfg.eval.ks)}")
    split = cfg.nightly.split
    if cfg.nightly.metric is not None and cfg.nightly.metric not in {
            f"{split}/R@{k}" for k in cfg.eval.ks}:
        raise UserError(f"config key nightly.metric={cfg.nightly.metric!r} is not one of "
                        f"{split}/R@K (nightly.split {split!r}) for eval.ks={list(cfg.eval.ks)}")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*", cfg.nightly.alias):
        raise UserError(f"config key nightly.alias must be a name (letters, digits, '_.-'), "
                        f"got {cfg.nightly.alias!r}")
    _validate_workers(cfg)
    if cfg.ray.gpus_per_worker > 1:
        raise UserError(f"config key ray.gpus_per_worker must be at most 1 (one DDP worker drives "
                        f"one GPU; a fraction shares one), got {cfg.ray.gpus_per_worker!r}")
    if cfg.train.compile == "reduce-overhead" and not cfg.ray.use_gpu:
        raise UserError("config key train.compile=reduce-overhead records CUDA graphs, which need "
                        "ray.use_gpu=true; on CPU use train.compile=default")
    if not cfg.train.name or "/" in cfg.train.name:
        raise UserError(f"config key train.name must be a non-empty name without '/', "
                        f"got {cfg.train.name!r}")


def worker_range(ray_cfg: RayConfig) -> tuple[int, int]:
    """(min, max) workers: equal for a fixed-size group."""
    n = ray_cfg.num_workers
    return (n, n) if isinstance(n, int) else (n[0], n[1])


def global_batch(cfg: Config) -> int:
    """Samples per optimizer step over all ranks: the same at every world size."""
    return cfg.train.batch_size * worker_range(cfg.ray)[1]


def _validate_workers(cfg: Config) -> None:
    n = cfg.ray.num_workers
    if isinstance(n, tuple) and len(n) != 2:
        raise UserError(f"config key ray.num_workers must be a number or [min, max], got {list(n)}")
    low, high = worker_range(cfg.ray)
    if low < 1 or low > high:
        raise UserError(f"config key ray.num_workers must be >= 1 (as [min, max]: "
                        f"1 <= min <= max), got {n if isinstance(n, int) else list(n)}")
    total = global_batch(cfg)
    uneven = [w for w in range(low, high + 1) if total % w]
    if uneven:
        raise UserError(f"the global batch {total} (train.batch_size {cfg.train.batch_size} x "
                        f"{high} workers) cannot be split evenly over {uneven[0]} workers of "
                        f"ray.num_workers {list(n)}; make it a multiple of every size in the range")


def _coerce(dotted: str, value: Any, annotation: Any) -> Any:
    """Check `value` against a field annotation (the subset used above) and convert lists."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if isinstance(value, (list, tuple)):  # `int | tuple[int, int]`: the list form
            inner = [a for a in inner if typing.get_origin(a) is tuple] or inner
        return _coerce(dotted, value, inner[0])
    if origin is Literal:
        if value not in args:
            raise UserError(f"config key {dotted} must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key {dotted} must be a list, got {value!r}")
        return tuple(_coerce(dotted, v, args[0]) for v in value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise UserError(f"config key {dotted} must be true or false, got {value!r}")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise UserError(f"config key {dotted} must be an integer, got {value!r}")
    if not isinstance(value, annotation):
        raise UserError(
            f"config key {dotted} must be of type {annotation.__name__}, got {value!r}")
    return value


def _build_section(section_cls: type, name: str, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"config section {name} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(section_cls)
    known = {f.name for f in dataclasses.fields(section_cls)}
    for key in raw:
        if key not in known:
            raise UserError(f"unknown config key {name}.{key}; known keys: {', '.join(sorted(known))}")
    return section_cls(**{k: _coerce(f"{name}.{k}", v, hints[k]) for k, v in raw.items()})


# -- keys and values whose spelling or unit changed ---------------------------------------------
RENAMED_KEYS = {"nightly.margin": ("nightly.margin_points", 100.0)}
"""Old key -> (new key, factor from the old unit to the new): a key whose unit changes gets a new
name, and a person's config naming the old one is refused (`refuse_old_spellings`)."""
RESPELLED_METRICS = {"eval.selection_metric": "val", "nightly.metric": "split"}
"""Metric keys once spelled `R@K`, now `<split>/R@K`: `val`, or `nightly.split`'s value."""


def _old_spellings(raw: dict[str, Any], split: str | None = None
                   ) -> list[tuple[str, str, Any, str]]:
    """(old key, new key, new value, why) for every old spelling in a nested config dict
    (`split`: the nightly split an old `nightly.metric` is on, default the dict's own)."""
    split = split or str((raw.get("nightly") or {}).get("split", NightlyConfig.split))
    found = []
    for old, (new, factor) in RENAMED_KEYS.items():
        section, key = old.split(".")
        values = raw.get(section) or {}
        if isinstance(values, dict) and key in values:
            value = values[key]
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            found.append((old, new, value * factor if number else value,
                          f"{old} is now {new} (percent points: {value!r} -> "
                          f"{value * factor if number else '?'})"))
    for dotted in RESPELLED_METRICS:
        section, key = dotted.split(".")
        value = (raw.get(section) or {}).get(key) if isinstance(raw.get(section), dict) else None
        if isinstance(value, str) and re.fullmatch(r"R@\d+", value):
            new = f"{'val' if RESPELLED_METRICS[dotted] == 'val' else split}/{value}"
            found.append((dotted, dotted, new, f"{dotted}: {value!r} is now spelled {new!r}"))
    return found


def refuse_old_spellings(raw: dict[str, Any], where: str, split: str | None = None) -> None:
    """One line naming the new key or spelling when a person's config (`where`: a file or
    `--set`) uses an old one, so no existing config silently means something else."""
    for _, _, _, why in _old_spellings(raw, split):
        raise UserError(f"{where}: {why}")


def upgrade_stored(raw: dict[str, Any]) -> dict[str, Any]:
    """A config the project wrote earlier (a checkpoint's, a run's `config.yaml`) with its old
    spellings translated: their units are known, so nothing is guessed."""
    found = _old_spellings(raw)
    if not found:
        return raw
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for old, new, value, _ in found:
        section, key = old.split(".")
        del merged[section][key]
        new_section, new_key = new.split(".")
        merged.setdefault(new_section, {})[new_key] = value
    return merged


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a `Config` from a nested dict (a parsed YAML file, or a config the
    project stored, whose old spellings are translated: `upgrade_stored`)."""
    if not isinstance(raw, dict):
        raise UserError("config must be a mapping of sections")
    raw = upgrade_stored(raw)
    hints = typing.get_type_hints(Config)
    for name in raw:
        if name not in hints:
            raise UserError(f"unknown config section {name!r}; known: {', '.join(hints)}")
    return Config(**{name: _build_section(hints[name], name, raw.get(name))
                     for name in hints if name in raw})


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `raw` with each `section.key=value` applied (value parsed as YAML)."""
    merged = {k: dict(v or {}) for k, v in raw.items()}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} must look like section.key=value")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) != 2:
            raise UserError(f"override key {dotted!r} must be section.key")
        value = parse_value(text)
        merged.setdefault(parts[0], {})[parts[1]] = value
    return merged


def _read_yaml(path: Path, what: str) -> Any:
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    try:
        return yaml.load(path.read_text(), Loader=YamlLoader)
    except yaml.YAMLError as exc:
        raise UserError(f"{what} {path} is not valid YAML: {str(exc).splitlines()[0]}")


RAY_CONFIG = "ray_config.yaml"


def _find_ray_config() -> Path | None:
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (root / RAY_CONFIG).is_file():
            return root / RAY_CONFIG
    return None


def _rebase(url: str, local_root: str, root: str) -> str:
    """`shards/x` -> `<root>/x` when a profile moves the embedded stores elsewhere."""
    if url == local_root or url.startswith(local_root + "/"):
        return root.rstrip("/") + url[len(local_root):]
    return url


def apply_profile(raw: dict[str, Any], name: str) -> dict[str, Any]:
    """Apply profile `name` of ray_config.yaml: its `ray` values, and its shard/run roots, which
    replace the leading `shards/` of data.url and `runs` of train.storage and nightly.registry."""
    if name == "local" and _find_ray_config() is None:
        return raw
    path = _find_ray_config()
    if path is None:
        raise UserError(f"config key ray.profile={name!r} needs {RAY_CONFIG}, which was not found")
    profiles = _read_yaml(path, "ray config") or {}
    if name not in profiles:
        raise UserError(f"config key ray.profile: unknown profile {name!r} in {path}; "
                        f"known: {', '.join(profiles)}")
    profile = profiles[name] or {}
    unknown = set(profile) - {"shards_root", "runs_root", "ray"}
    if unknown:
        raise UserError(f"unknown key {sorted(unknown)[0]!r} in profile {name!r} of {path}")
    merged = {k: dict(v or {}) for k, v in raw.items()}
    merged.setdefault("ray", {}).update(profile.get("ray") or {})
    data, train = merged.setdefault("data", {}), merged.setdefault("train", {})
    if profile.get("shards_root"):
        data["url"] = _rebase(data.get("url", DataConfig.url), "shards", profile["shards_root"])
    if profile.get("runs_root"):
        train["storage"] = _rebase(train.get("storage", TrainConfig.storage), "runs",
                                   profile["runs_root"])
        nightly = merged.setdefault("nightly", {})
        nightly["registry"] = _rebase(nightly.get("registry", NightlyConfig.registry), "runs",
                                      profile["runs_root"])
    return merged


DEFAULT, FILE, SET, DERIVED = "default", "file", "--set", "derived"
"""Where a resolved value came from (a profile's values: `profile <name>`)."""


@dataclass(frozen=True)
class Resolved:
    """A loaded config, where each of its values came from, and the global batch's story."""
    cfg: Config
    sources: dict[str, str]
    """`section.key` -> DEFAULT, FILE, `profile <name>`, SET or DERIVED."""
    batch_note: str
    """One line: the global and per-worker batch, and why they differ from the file's if so."""
    batch_moved: bool = False
    """The workers or the per-worker batch differ from the file's (the line says how)."""


def _flatten(raw: dict[str, Any]) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in raw.items()
            for key, value in (values or {}).items()}


def resolve_config(path: str | Path | None, overrides: list[str] = ()) -> Resolved:
    """`load_config`, and where each value came from: defaults < experiment file < the
    `ray.profile` of ray_config.yaml < `--set`. A profile is about where a run goes, so when it
    (or `--set ray.num_workers`) changes the workers, the per-worker `train.batch_size` is
    derived to keep the global batch the experiment file implies; only `--set
    train.batch_size` changes that."""
    raw: dict[str, Any] = {}
    what = "the defaults"
    if path is not None:
        what = str(path)
        raw = _read_yaml(Path(path), "config file") or {}
        if not isinstance(raw, dict):
            raise UserError(f"config file {path} must be a mapping of sections")
        for name, section in raw.items():
            if section is not None and not isinstance(section, dict):
                raise UserError(f"config section {name} must be a mapping, got {section!r}")
        refuse_old_spellings(raw, f"config file {path}")
    overrides = list(overrides)
    set_only, with_set = apply_overrides({}, overrides), apply_overrides(raw, overrides)
    refuse_old_spellings(set_only, "--set", split=(with_set.get("nightly") or {}).get("split"))
    profile = (with_set.get("ray") or {}).get("profile", RayConfig.profile)
    if not isinstance(profile, str):
        raise UserError(f"config key ray.profile must be a profile name, got {profile!r}")
    profiled = apply_profile(raw, profile)
    merged = apply_overrides(profiled, overrides)
    defaults, in_file = _flatten(config_to_dict(Config())), _flatten(raw)
    sources = {key: DEFAULT for key in defaults} | {key: FILE for key in in_file}
    sources |= {key: f"profile {profile}" for key, value in _flatten(profiled).items()
                if value != in_file.get(key, defaults.get(key))}
    sources |= {key: SET for key in _flatten(set_only)}
    note, moved = _derive_batch(raw, merged, sources, what)
    return Resolved(config_from_dict(merged), sources, note, moved)


def _max_workers(raw: dict[str, Any]) -> int:
    n = (raw.get("ray") or {}).get("num_workers", RayConfig.num_workers)
    if isinstance(n, (list, tuple)) and n:
        n = n[-1]
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1


def _derive_batch(raw: dict[str, Any], merged: dict[str, Any], sources: dict[str, str],
                  what: str) -> tuple[str, bool]:
    """Set the per-worker batch in `merged` so the file's global batch holds (see
    `resolve_config`); returns the one line that states the batch, and whether the workers or
    the per-worker batch moved from the file's."""
    file_batch = (raw.get("train") or {}).get("batch_size", TrainConfig.batch_size)
    file_workers, workers = _max_workers(raw), _max_workers(merged)
    batch = (merged.get("train") or {}).get("batch_size", TrainConfig.batch_size)
    if not all(isinstance(b, int) and not isinstance(b, bool) for b in (file_batch, batch)):
        return "", False  # not a number: building the config names the key
    implied = file_batch * file_workers
    kept = f"{what}: {file_workers} x {file_batch}"
    if workers == file_workers or sources["train.batch_size"] == SET:
        line = f"global batch {batch * workers} = {workers} x {batch} per worker"
        if workers == file_workers and batch == file_batch:
            return line, False
        return f"{line} (train.batch_size set by --set; {kept} = {implied})", True
    if implied % workers:
        raise UserError(f"the global batch {implied} of {kept} cannot be split evenly over the "
                        f"{workers} workers of ray.num_workers ({sources['ray.num_workers']}); "
                        f"set train.batch_size (per worker) with --set")
    merged.setdefault("train", {})["batch_size"] = implied // workers
    sources["train.batch_size"] = DERIVED
    return (f"global batch {implied} = {workers} x {implied // workers} per worker "
            f"(kept from {kept})"), True


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or the defaults when `path` is None), apply the `ray.profile` of
    ray_config.yaml, then the `section.key=value` overrides (`resolve_config` says where each
    value came from)."""
    return resolve_config(path, overrides).cfg


def nightly_metric(cfg: Config) -> str:
    """The `<split>/R@K` that decides a nightly promotion (`nightly.metric` or its default)."""
    return cfg.nightly.metric or (
        f"{cfg.nightly.split}/{cfg.eval.selection_metric.removeprefix('val/')}")


def format_resolved(resolved: Resolved, title: str) -> str:
    """The resolved config as YAML, each value followed by a comment naming its source
    (`composeae config show`)."""
    lines = [f"# {title}", f"# {resolved.batch_note}"] if resolved.batch_note else [f"# {title}"]
    for section, values in config_to_dict(resolved.cfg).items():
        lines.append(f"{section}:")
        for key, value in values.items():
            text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
            text = text.removesuffix("\n...").removesuffix("...").strip()
            lines.append(f"  {f'{key}: {text}':<44} # {resolved.sources[f'{section}.{key}']}")
    return "\n".join(lines)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved tree as plain Python values (tuples become lists)."""
    def plain(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v
    return {f.name: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, f.name)).items()}
            for f in dataclasses.fields(cfg)}


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def replace(cfg: Config, **sections: dict[str, Any]) -> Config:
    """A copy of `cfg` with some keys changed, e.g. `replace(cfg, train={"steps": 5})`."""
    raw = config_to_dict(cfg)
    for name, values in sections.items():
        raw[name].update(values)
    return config_from_dict(raw)


def add_override_option(parser, help: str = "override a config value (repeatable)",
                        metavar: str = "SECTION.KEY=VALUE") -> None:
    """The `--set` option of a subcommand (an `argparse` parser): repeatable `key=value`
    overrides, collected in `args.set` for `load_config` (or `load_sweep`)."""
    parser.add_argument("--set", action="append", default=[], metavar=metavar, help=help)
