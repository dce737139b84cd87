"""Sweep files: what `composeae tune --config SWEEP.yaml [--set ...]` searches, and how.

A sweep file names an experiment config (the *base*), fixes some of its keys for every trial,
and gives a search space over others, keyed by the same `section.key` names as `--set`:

```yaml
base: ../tiny.yaml            # experiment config; a relative path is relative to this file
name: tiny-sweep              # optional; default: this file's name without .yaml
set:                          # fixed overrides applied to the base for every trial
  train.steps: 8              # (a mapping, or a list of "section.key=value" strings)
  train.eval_every: 2
search:                       # one distribution per key
  model.name: {grid: [composeae, tirg]}
  loss.w_img_rec: {loguniform: [0.01, 1]}
  model.embed_dim: {choice: [128, 256, 512]}
num_samples: 2                # random draws; with `grid` keys, draws per grid point
metric: val/R@1               # what selects trials; must be a val/... metric
mode: max
scheduler:                    # or just `asha` / `none`
  name: asha
  grace_period: 1
  reduction_factor: 2
  max_t: null                 # null: one less than a trial's evaluations (see below)
searcher: random              # or optuna
seed: 0                       # searcher seed: the same seed draws the same trials
max_concurrent_trials: null   # null: as many as the cluster's resources hold
trial_cpus: 1                 # CPUs reserved by each trial's driver (fractions allowed)
max_failures: 1               # Tune retries of a failed trial
storage: null                 # null: the base config's train.storage (after `set`)
```

Top-level keys (only these; anything else is an error):

- `base` (required): the experiment YAML every trial starts from, read by `load_config`, so
  `ray.profile` and every rule of the config tree apply as for `composeae train`.
- `name`: the sweep's name; Tune's experiment lives at `<storage>/<name>` (submitting the same
  sweep again resumes it) and the Train run of trial T is named `<name>-<T>`.
- `set`: fixed `section.key` values applied after the base file, for every trial.
- `search`: the search space. A key applies to a trial only where the trial's model reads it
  (`loss.w_<t>` for the models with loss term `t`, `model.dropout` for the ComposeAE family, the
  text encoder's keys for models that read the modifier; `RetrievalModel.reads_key`): a TIRG
  trial of a sweep over ComposeAE's loss weights gets no value for them (blank on the page and
  in TensorBoard), and a key that no model of the sweep reads is left out with a note. Each
  value is a one-key mapping naming a distribution:

  - `{choice: [a, b, ...]}`: one of the values, uniformly at random (`tune.choice`);
  - `{grid: [a, b, ...]}`: every value, each crossed with `num_samples` draws of the other keys
    (`tune.grid_search`);
  - `{uniform: [low, high]}`: a float in [low, high) (`tune.uniform`);
  - `{loguniform: [low, high]}`: a float in [low, high), log-uniform, low > 0
    (`tune.loguniform`);
  - `{randint: [low, high]}`: an integer in [low, high], **both ends included**
    (`tune.randint(low, high + 1)`: Ray's upper bound is exclusive).

  Ranges need numbers with low < high. `1e-4` is read as a number here (plain YAML 1.1 would
  read a string). `ray.*` keys (the resources a trial reserves), `train.name` and
  `train.storage` cannot be searched; a key cannot be both fixed in `set` and searched.
- `num_samples` (default 1): number of random draws; the sweep runs
  `num_samples x (product of the grid sizes)` trials. Two trials never train the same
  effective config: the random searcher draws again (so each model family of a `grid` gets its
  `num_samples` distinct trials while its space holds them) and skips a draw it cannot make
  new; Optuna is asked again (`composeae.sweep.plan`).
- `metric` (default `val/R@1`), `mode` (default `max`): how trials are compared, by the ASHA
  scheduler and when the best trial is chosen. Only validation metrics (`val/...`, reported at
  every evaluation) are allowed: selecting on `test/...` would leak the test split into the model
  choice. `val/R@K` needs K in the config's `eval.ks`.
- `scheduler` (default `asha`): `asha` stops poor trials early (asynchronous successive halving);
  `none` runs every trial to the end. ASHA counts time in *reports*: a trial reports once per
  evaluation (every `train.eval_every` steps, and at the last step), so its evaluations number
  `ceil(train.steps / train.eval_every)`, then once more at its end with its test recall (and
  the validation recall of its best evaluation, so every report carries `metric`). ASHA
  compares trials at its rungs, `grace_period x reduction_factor^k` reports up to `max_t`, and
  stops a trial that falls below the best `1 / reduction_factor` of those recorded at a rung
  before it. `grace_period` (default 1) and `max_t` (default: one less than the number of
  evaluations) are in reports, with `grace_period <= max_t < evaluations`: rungs sit on
  evaluations before the last one (a rung on the last would stop a trial whose training is
  already done, throwing away its final report), and a trial that passes the last rung is not
  stopped, so it always finishes
  (test recall, checkpoint, run files). `reduction_factor` defaults to 2. ASHA compares trials at
  equal numbers of evaluations, so it refuses a search over `train.steps` or `train.eval_every`
  (use `scheduler: none` for that).
- `searcher` (default `random`): `random` is Tune's BasicVariantGenerator; `optuna` is Optuna's
  TPE through Ray's OptunaSearch and needs the optional extra
  (`.venv/bin/pip install -c constraints.txt -e '.[optuna]'`);
  Optuna samples, so it takes no `grid`.
- `seed` (default 0; null for an unseeded search): the searcher's random seed.
- `max_concurrent_trials` (default null): a cap on trials running at once; unset, the driver
  fits as many as the cluster's CPUs and GPUs hold (`Sweep.concurrency`).
- `trial_cpus` (default 1): CPUs reserved by each trial's driver process, which only builds the
  Train run and waits on it; the Train workers reserve their own (`ray.cpus_per_worker`). A
  fraction such as 0.1 lets a small sweep run on a laptop. On GPUs, `ray.gpus_per_worker: 0.25`
  in `set:` packs four single-worker trials on one GPU (small models leave most of a card idle);
  `composeae tune` and the sweep's page say how many trials run at once.
- `max_failures` (default 1): how many times Tune restarts a failed trial (its Train run then
  resumes from its last checkpoint). Worker failures inside a trial are `ray.max_failures`.
- `storage` (default: the base config's `train.storage`): where the sweep and its trials' Train
  runs are written, a local directory or `s3://bucket/prefix`.

`--set` on the command line of `composeae tune`: a key `section.key` of the config tree (`model`,
`optim`, ...) is a fixed override of the base config, applied after the file's `set`; when that key
is searched, it is pinned to the value and leaves the search space (`--set model.name=tirg` sweeps
TIRG only). `search.section.key={...}` adds or replaces a distribution. Any other key is a
top-level sweep key (`--set num_samples=8`, `--set scheduler=none`, `--set searcher=optuna`,
`--set scheduler.grace_period=2`); `--set base=PATH` is relative to the current directory.

Every check runs when the file is loaded, before Ray starts, and a problem is one `UserError`
line naming the key (`search.model.name: ...`). Each searched value (each choice, both ends of a
range) is applied on top of the base config and `set`, through the same `load_config` that
`composeae train` uses, so a value that training would refuse is refused here; combinations of
searched values are checked when a trial builds its config.

The Tune driver uses the loaded `Sweep`: `tune_config()` for metric, mode, scheduler, searcher
(which holds the search space) and concurrency, `trial_resources()` for `tune.with_resources`,
`failure_config()` for Tune's run config, and, inside each trial, `trial_config(params, name=...)`
for the trial's experiment config. `best_config_yaml(sweep, params)` writes the chosen trial as an
experiment YAML that `composeae train --config` trains again.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Iterable

import yaml

from composeae.config import Config, YamlLoader, load_config, parse_value
from composeae.errors import UserError
from composeae.sweep.spec import Dist, Sweep, checked_config
from composeae.sweep.tune_objects import require_optuna
from composeae.sweep.values import is_number, yaml_value

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
"""Distribution names a `search` entry may use."""

SCHEDULERS = ("asha", "none")
SEARCHERS = ("random", "optuna")
DEFAULT_METRIC = "val/R@1"
UNSEARCHABLE = ("train.name", "train.storage")
"""Keys that say where a trial runs, not what it learns (and every `ray.*` key)."""

_TOP_KEYS = ("base", "name", "set", "search", "num_samples", "metric", "mode", "scheduler",
             "searcher", "seed", "max_concurrent_trials", "trial_cpus", "max_failures", "storage")
_SCHEDULER_KEYS = ("name", "grace_period", "reduction_factor", "max_t")
_CONFIG_SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


def load_sweep(path: str | Path, overrides: Iterable[str] = ()) -> Sweep:
    """Read and validate a sweep file, with `--set` overrides (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sweep file {path} does not exist")
    try:
        raw = yaml.load(path.read_text(), Loader=YamlLoader)
    except yaml.YAMLError as exc:
        raise UserError(f"sweep file {path} is not valid YAML: {str(exc).splitlines()[0]}")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"sweep file {path} must be a mapping of sweep keys")
    for key in raw:
        if key not in _TOP_KEYS:
            raise UserError(f"unknown sweep key {key!r} in {path}; known: {', '.join(_TOP_KEYS)}")
    if "base" not in raw:
        raise UserError(f"sweep key base is missing in {path}: name the experiment config")
    fixed = _read_set(raw.get("set"))
    search_raw = raw.get("search") or {}
    if not isinstance(search_raw, dict):
        raise UserError(f"sweep key search must be a mapping of section.key: "
                        f"{{distribution: [...]}}, got {search_raw!r}")
    search_raw = dict(search_raw)
    scheduler = raw.get("scheduler", "asha")
    scheduler = dict(scheduler) if isinstance(scheduler, dict) else {"name": scheduler}
    base = Path(path.parent, str(raw["base"])) if isinstance(raw["base"], str) else raw["base"]

    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} must look like key=value")
        key, text = (s.strip() for s in item.split("=", 1))
        value = parse_value(text)
        parts = key.split(".")
        if parts[0] in _CONFIG_SECTIONS:
            fixed[key] = value  # pins a searched key
            search_raw.pop(key, None)
        elif parts[0] == "search" and len(parts) > 1:
            search_raw[".".join(parts[1:])] = value
        elif parts[0] == "scheduler" and len(parts) == 2:
            scheduler[parts[1]] = value
        elif key == "scheduler":
            scheduler["name"] = value
        elif key == "base":
            base = Path(value) if isinstance(value, str) else value
        elif key in _TOP_KEYS and key not in ("set", "search"):
            raw[key] = value
        else:
            raise UserError(f"override key {key!r} is neither a sweep key ({', '.join(_TOP_KEYS)})"
                            f" nor a config key section.key")
    for key in search_raw:
        if key in fixed:
            raise UserError(f"search.{key}: the key is also fixed in set; "
                            f"keep it in one of them")
    return _build(path, raw, base, fixed, search_raw, scheduler)


def _read_set(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if isinstance(raw, dict):
        items = list(raw.items())
    elif isinstance(raw, list):
        items = []
        for entry in raw:
            if not isinstance(entry, str) or "=" not in entry:
                raise UserError(f"set entry {entry!r} must look like section.key=value")
            key, text = entry.split("=", 1)
            items.append((key.strip(), parse_value(text)))
    else:
        raise UserError(f"sweep key set must be a mapping or a list of section.key=value, "
                        f"got {raw!r}")
    fixed: dict[str, Any] = {}
    for key, value in items:
        if not isinstance(key, str) or key.split(".")[0] not in _CONFIG_SECTIONS:
            raise UserError(f"set.{key}: not a config key section.key "
                            f"(sections: {', '.join(_CONFIG_SECTIONS)})")
        fixed[key] = value
    return fixed


def _build(path: Path, raw: dict, base: Any, fixed: dict[str, Any], search_raw: dict,
           scheduler: dict) -> Sweep:
    """Check every top-level key in the order the module docstring documents them, and build
    the `Sweep`. One function on purpose: each check is a few lines next to its default, and
    later checks read values the earlier ones settled (the base config, the search space)."""
    if not isinstance(base, Path):
        raise UserError(f"sweep key base must be a path to an experiment config, got {base!r}")
    base = base.resolve()

    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not name or "/" in name:
        raise UserError(f"sweep key name must be a non-empty name without '/', got {name!r}")

    # The base and `set`, checked as `composeae train` would.
    try:
        load_config(base)
    except UserError as exc:
        raise UserError(f"base: {exc}") from None
    set_overrides = [f"{k}={yaml_value(v)}" for k, v in fixed.items()]
    try:
        base_cfg = checked_config(base, set_overrides,
                                   check_model="model.name" not in search_raw)
    except UserError as exc:
        named = [k for k in fixed if k in str(exc)]
        raise UserError(f"set.{named[0]}: {exc}" if named else f"set: {exc}") from None

    search = tuple((key, _check_dist(key, spec, base, set_overrides))
                   for key, spec in search_raw.items())
    search, ignored = _drop_unread_keys(search, base_cfg.model.name)
    space = dict(search)

    num_samples = raw.get("num_samples", 1)
    _check_integer("num_samples", num_samples, 1)

    metric = raw.get("metric", DEFAULT_METRIC)
    _check_metric(metric, base_cfg, space)
    mode = raw.get("mode", "max")
    if mode not in ("max", "min"):
        raise UserError(f"sweep key mode must be max or min, got {mode!r}")

    searcher = raw.get("searcher", "random")
    if searcher not in SEARCHERS:
        raise UserError(f"sweep key searcher must be one of {list(SEARCHERS)}, got {searcher!r}")
    if searcher == "optuna":
        grids = [k for k, d in search if d.kind == "grid"]
        if grids:
            raise UserError(f"search.{grids[0]}: searcher optuna samples and takes no grid; "
                            f"use choice (or searcher random)")
        require_optuna()
    seed = raw.get("seed", 0)
    _check_integer("seed", seed, 0, nullable=True)

    evaluations = _max_evaluations(base_cfg, space)
    sched = _check_scheduler(scheduler, evaluations)
    budget = [k for k in ("train.steps", "train.eval_every") if k in space]
    if sched["scheduler"] == "asha" and budget:
        raise UserError(f"search.{budget[0]}: ASHA compares trials at equal numbers of "
                        f"evaluations; searching the budget needs scheduler none")

    max_concurrent = raw.get("max_concurrent_trials")
    _check_integer("max_concurrent_trials", max_concurrent, 1, nullable=True)
    trial_cpus = raw.get("trial_cpus", 1)
    if not is_number(trial_cpus) or not trial_cpus > 0:
        raise UserError(f"sweep key trial_cpus must be a number > 0 (fractions allowed), "
                        f"got {trial_cpus!r}")
    max_failures = raw.get("max_failures", 1)
    _check_integer("max_failures", max_failures, 0)
    storage = raw.get("storage")
    if storage is None:
        storage = base_cfg.train.storage
    if not isinstance(storage, str) or not storage.strip():
        raise UserError(f"sweep key storage must be a directory or s3:// URL, got {storage!r}")

    return Sweep(name=name, base_path=base, fixed=tuple(fixed.items()), search=search,
                 num_samples=num_samples, metric=metric, mode=mode, **sched,
                 evaluations=evaluations, searcher=searcher, seed=seed,
                 max_concurrent_trials=max_concurrent, trial_cpus=float(trial_cpus),
                 max_failures=max_failures, storage=storage, path=path.resolve(),
                 ignored=ignored)


def _drop_unread_keys(search: tuple[tuple[str, Dist], ...], base_model: str
                      ) -> tuple[tuple[tuple[str, Dist], ...], tuple[str, ...]]:
    """The search without the keys that no model of the sweep reads (`--set model.name=tirg`
    on a sweep of ComposeAE's loss weights leaves nothing to search in them), and those keys."""
    from composeae.models import model_reads_key  # deferred: the models import torch

    space = dict(search)
    families = space["model.name"].args if "model.name" in space else (base_model,)
    ignored = tuple(k for k, _ in search if k != "model.name"
                    and not any(model_reads_key(f, k) for f in families))
    return tuple((k, d) for k, d in search if k not in ignored), ignored


def _check_dist(key: Any, spec: Any, base: Path, set_overrides: list[str]) -> Dist:
    where = f"search.{key}"
    if not isinstance(key, str):
        raise UserError(f"{where}: search keys are section.key names")
    section = key.split(".")[0]
    if section == "ray" or key in UNSEARCHABLE:
        raise UserError(f"{where}: cannot be searched (it sets where a trial runs or what it "
                        f"reserves, not what it learns); fix it in set")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise UserError(f"{where}: expected one distribution, e.g. {{choice: [a, b]}} or "
                        f"{{loguniform: [low, high]}}, got {spec!r}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise UserError(f"{where}: unknown distribution {kind!r}; known: "
                        f"{', '.join(DISTRIBUTIONS)}")
    if not isinstance(args, list):
        raise UserError(f"{where}: {kind} takes a list, got {args!r}")
    if kind in ("choice", "grid"):
        if not args:
            raise UserError(f"{where}: {kind} needs at least one value")
    else:
        if len(args) != 2 or not all(is_number(a) for a in args):
            raise UserError(f"{where}: {kind} takes [low, high] numbers, got {args!r}")
        low, high = args
        if not low < high:
            raise UserError(f"{where}: {kind} needs low < high, got [{low}, {high}]")
        if kind == "loguniform" and not low > 0:
            raise UserError(f"{where}: loguniform needs low > 0, got {low}")
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise UserError(f"{where}: randint takes integers [low, high] (both included), "
                            f"got {args!r}")
        if kind in ("uniform", "loguniform"):
            args = [float(a) for a in args]  # what the distribution draws: floats
    dist = Dist(kind, tuple(args))
    for value in dist.candidates():
        try:
            checked_config(base, set_overrides + [f"{key}={yaml_value(value)}"])
        except UserError as exc:
            what = "value" if kind in ("choice", "grid") else "bound"
            raise UserError(f"{where}: {what} {yaml_value(value)}: {exc}") from None
    return dist


def _check_metric(metric: Any, base_cfg: Config, space: dict[str, Dist]) -> None:
    if not isinstance(metric, str) or not metric.startswith("val/") or metric == "val/":
        hint = (" (selecting on the test split would leak it into the model choice)"
                if isinstance(metric, str) and metric.startswith("test/") else "")
        raise UserError(f"sweep key metric must be a validation metric val/..., "
                        f"got {metric!r}{hint}")
    name = metric.removeprefix("val/")
    if name.startswith("R@") and name[2:].isdigit() and "eval.ks" not in space:
        if int(name[2:]) not in base_cfg.eval.ks:
            raise UserError(f"sweep key metric {metric!r} is never reported: eval.ks is "
                            f"{list(base_cfg.eval.ks)}")


def _candidates_of(key: str, base_value: int, space: dict[str, Dist]) -> list:
    dist = space.get(key)
    return list(dist.args) if dist is not None else [base_value]


def _max_evaluations(base_cfg: Config, space: dict[str, Dist]) -> int:
    steps = max(_candidates_of("train.steps", base_cfg.train.steps, space))
    every = min(_candidates_of("train.eval_every", base_cfg.train.eval_every, space))
    return math.ceil(steps / every)


def _check_scheduler(raw: dict, evaluations: int) -> dict[str, Any]:
    for key in raw:
        if key not in _SCHEDULER_KEYS:
            raise UserError(f"unknown sweep key scheduler.{key}; known: "
                            f"{', '.join(_SCHEDULER_KEYS)}")
    name = raw.get("name", "asha")
    name = "none" if name is None else name
    if name not in SCHEDULERS:
        raise UserError(f"sweep key scheduler must be one of {list(SCHEDULERS)}, got {name!r}")
    grace = raw.get("grace_period", 1)
    _check_integer("scheduler.grace_period", grace, 1, unit=" (reports)")
    factor = raw.get("reduction_factor", 2)
    if not is_number(factor) or not factor > 1:
        raise UserError(f"sweep key scheduler.reduction_factor must be a number > 1, "
                        f"got {factor!r}")
    max_t = raw.get("max_t")
    if max_t is None:
        max_t = evaluations - 1
    if not isinstance(max_t, int) or isinstance(max_t, bool):
        raise UserError(f"sweep key scheduler.max_t must be an integer (reports) or null, "
                        f"got {max_t!r}")
    if name == "asha":
        if evaluations < 2:
            raise UserError(
                f"scheduler asha needs a trial to evaluate at least twice (it compares trials at "
                f"evaluations before the last), but train.steps / train.eval_every make "
                f"{evaluations}; lower train.eval_every in set, or use scheduler: none")
        if max_t >= evaluations:
            raise UserError(
                f"sweep key scheduler.max_t={max_t} puts a rung on or past the last of the "
                f"{evaluations} evaluations of a trial, where stopping it would only throw away "
                f"finished training; omit it (default {evaluations - 1})")
        if grace > max_t:
            raise UserError(
                f"sweep key scheduler.grace_period={grace} exceeds scheduler.max_t={max_t} "
                f"(a trial makes {evaluations} evaluation(s)), so ASHA could never stop a "
                f"trial; lower it, or raise train.steps / lower train.eval_every in set")
    return {"scheduler": name, "grace_period": grace, "reduction_factor": factor,
            "max_t": max_t}


def _check_integer(key: str, value: Any, minimum: int, *, nullable: bool = False,
                   unit: str = "") -> None:
    """One line naming the sweep key unless `value` is an integer >= minimum (or null when
    allowed); booleans are not integers here."""
    if value is None and nullable:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise UserError(f"sweep key {key} must be an integer >= {minimum}{unit}"
                        f"{' or null' if nullable else ''}, got {value!r}")
