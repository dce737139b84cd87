"""A loaded sweep: the searched keys and their distributions (`Dist`), and the `Sweep` that turns
them into each trial's experiment config, its resources, its page and its text.

What belongs here: the validated sweep as plain data and what follows from it alone. Reading and
checking a sweep file is `composeae.sweep.load` (its docstring documents the file); the Ray Tune
objects built from a sweep are `composeae.sweep.tune_objects`, the only place Ray is imported.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import yaml

from composeae import storage
from composeae.config import Config, load_config, worker_range
from composeae.errors import UserError
from composeae.run.cluster import worker_resources
from composeae.storage import absolute_url
from composeae.sweep.page.state import SweepSpec
from composeae.sweep.tune_objects import TuneObjects
from composeae.sweep.values import plain, yaml_value


@dataclass(frozen=True)
class Dist:
    """One searched key's distribution: `kind` one of `composeae.sweep.load.DISTRIBUTIONS`;
    `args` the values (choice, grid) or `(low, high)` (uniform, loguniform: high exclusive;
    randint: high inclusive)."""
    kind: str
    args: tuple

    def to_yaml(self) -> dict[str, list]:
        return {self.kind: [plain(v) for v in self.args]}

    def sample(self, rng: np.random.Generator) -> Any:
        """One draw as a plain Python value: a value of a choice or grid, a float in [low, high)
        (log-uniform for loguniform), an integer in [low, high] for randint."""
        if self.kind in ("choice", "grid"):
            return plain(self.args[int(rng.integers(len(self.args)))])
        low, high = self.args
        if self.kind == "uniform":
            return float(rng.uniform(low, high))
        if self.kind == "loguniform":
            return float(math.exp(rng.uniform(math.log(low), math.log(high))))
        return int(rng.integers(low, high + 1))

    def candidates(self) -> tuple:
        """Values checked against the config: every choice, or both ends of a range."""
        return self.args

    def __str__(self) -> str:
        return f"{self.kind}({', '.join(yaml_value(v) for v in self.args)})"


@dataclass(frozen=True)
class Sweep(TuneObjects):
    """A validated sweep file with its `--set` overrides applied (`composeae.sweep.load`
    documents the file and builds this)."""
    name: str
    base_path: Path
    """The experiment config every trial starts from (absolute)."""
    fixed: tuple[tuple[str, Any], ...]
    """`set` entries, `(section.key, value)`, the file's then the command line's."""
    search: tuple[tuple[str, Dist], ...]
    """Searched keys and their distributions, in file order (`space` as a dict)."""
    num_samples: int
    metric: str
    mode: str
    scheduler: str
    grace_period: int
    reduction_factor: float
    max_t: int
    """ASHA's last rung is at or below this many reports (at most `evaluations`)."""
    evaluations: int
    """Evaluations a trial makes, ceil(train.steps / train.eval_every) (the most any trial
    makes when either is searched, which only `scheduler: none` allows)."""
    searcher: str
    seed: int | None
    max_concurrent_trials: int | None
    trial_cpus: float
    max_failures: int
    storage: str
    path: Path | None = field(default=None, compare=False)
    """The sweep file this came from."""
    ignored: tuple[str, ...] = field(default=(), compare=False)
    """Keys of the file's search that no model of the sweep reads (`model_reads_key`), left
    out of `search` and named by `describe`."""

    # ----- what the sweep is

    @property
    def space(self) -> dict[str, Dist]:
        return dict(self.search)

    @property
    def base_overrides(self) -> list[str]:
        """The `set` entries as `section.key=value` overrides for `load_config`."""
        return [f"{k}={yaml_value(v)}" for k, v in self.fixed]

    @property
    def num_trials(self) -> int:
        """Trials asked for: `num_samples` per grid point (fewer run when a family's space holds
        fewer distinct configs, see `composeae.sweep.plan`)."""
        grid = math.prod(len(d.args) for _, d in self.search if d.kind == "grid")
        return self.num_samples * grid

    # ----- which keys apply to which trial

    @functools.cached_property
    def base_family(self) -> str:
        """The model of every trial when `model.name` is not searched."""
        return self.base_config().model.name

    @property
    def families(self) -> tuple[str, ...]:
        """The model families the sweep trains."""
        dist = self.space.get("model.name")
        return tuple(dist.args) if dist is not None else (self.base_family,)

    def family_of(self, params: Mapping[str, Any]) -> str:
        return str(params.get("model.name", self.base_family))

    def keys_for(self, family: str) -> tuple[str, ...]:
        """The searched keys that apply to a trial of `family`, in file order: `model.name`
        and every key the model reads (`RetrievalModel.reads_key`)."""
        from composeae.models import model_reads_key  # deferred: the models import torch

        return tuple(k for k, _ in self.search
                     if k == "model.name" or model_reads_key(family, k))

    def trial_key(self, params: Mapping[str, Any]) -> tuple:
        """What makes two trials the same training run: their searched values, as text."""
        return tuple(sorted((k, yaml_value(v)) for k, v in params.items()))

    @property
    def experiment_url(self) -> str:
        """Where Tune keeps the sweep: `<storage>/<name>`."""
        return storage.join(self.storage, self.name)

    def base_config(self) -> Config:
        """The base config with `set` applied (searched keys at their base values)."""
        return checked_config(self.base_path, self.base_overrides + self._storage_override(),
                               check_model="model.name" not in self.space)

    def trial_run_name(self, trial_id: str) -> str:
        """The Train run name of trial `trial_id` (deterministic, so a restarted trial resumes)."""
        return f"{self.name}-{trial_id}"

    def trial_config(self, params: Mapping[str, Any], *, name: str | None = None) -> Config:
        """The experiment config of one trial: the base file, `set`, then `params` (one value per
        searched key that applies to the trial's family, `keys_for`, as Tune passes them),
        applied through `load_config`; `train.storage` is the sweep's storage and `train.name`
        is `name` when given (see `trial_run_name`)."""
        keys = self.keys_for(self.family_of(params))
        missing = [k for k in keys if k not in params]
        extra = [k for k in params if k not in keys]
        if missing or extra:
            raise ValueError(f"trial parameters must be exactly the searched keys of its "
                             f"model; missing {missing}, unknown {extra}")
        overrides = self.base_overrides + [f"{k}={yaml_value(params[k])}" for k in keys]
        overrides += self._storage_override()
        if name is not None:
            overrides.append(f"train.name={yaml_value(name)}")
        return checked_config(self.base_path, overrides)

    def _storage_override(self) -> list[str]:
        return [f"train.storage={yaml_value(self.storage)}"]

    def absolute(self) -> Sweep:
        """The sweep with local paths (storage, data.url, model weight files) made absolute, as
        the driver needs before trials start: Tune runs each trial in its own directory."""
        cfg = self.base_config()
        paths = {"data.url": cfg.data.url, "model.image_weights": cfg.model.image_weights,
                 "model.bert_path": cfg.model.bert_path}
        fixed = dict(self.fixed)
        for key, value in paths.items():
            if value is not None and key not in self.space and absolute_url(value) != value:
                fixed[key] = absolute_url(value)
        return dataclasses.replace(self, fixed=tuple(fixed.items()),
                                   storage=absolute_url(self.storage))

    def trial_resources(self) -> dict[str, float]:
        """What each trial's driver reserves: `tune.with_resources(trainable, ...)`."""
        return {"CPU": self.trial_cpus}

    def resources_per_trial(self) -> dict[str, float]:
        """All a trial reserves: its driver's `trial_cpus` and its Train workers' resources
        (`ray.cpus_per_worker`, and `ray.gpus_per_worker` with `ray.use_gpu`, from `set:`)."""
        ray_cfg = self.base_config().ray
        workers = worker_range(ray_cfg)[1]
        need = {res: workers * amount for res, amount in worker_resources(ray_cfg).items()}
        need["CPU"] += self.trial_cpus
        return need

    def concurrency(self, cluster: Mapping[str, float]) -> int:
        """Trials that fit at once in `cluster` (e.g. `ray.cluster_resources()`): each reserves
        `resources_per_trial`, capped by `max_concurrent_trials` and the number of trials; at
        least 1. Ray packs fractional GPUs by its own accounting: four trials of one worker at
        `ray.gpus_per_worker: 0.25` share one GPU."""
        need = self.resources_per_trial()
        fits = min(int(cluster.get(res, 0.0) / amount + 1e-9) for res, amount in need.items())
        caps = [self.num_trials] + ([self.max_concurrent_trials]
                                    if self.max_concurrent_trials else [])
        return max(1, min([fits] + caps))

    def placement(self, cluster: Mapping[str, float]) -> str:
        """One sentence: how many trials run at once in `cluster` and what each reserves."""
        need = self.resources_per_trial()
        each = ", ".join(f"{amount:g} {res}" for res, amount in need.items())
        has = ", ".join(f"{cluster.get(res, 0.0):g} {res}" for res in need)
        return (f"{self.concurrency(cluster)} trial(s) at once: each reserves {each} of the "
                f"cluster's {has}")

    def page_spec(self, placement: str | None = None) -> SweepSpec:
        """What the sweep's page (`composeae.sweep.page`) shows: the searched keys, the metric
        that ranks trials, R@10 beside it when evaluated, a finished trial's step count, and
        `placement` (how many trials run at once)."""
        cfg = self.base_config()
        extra = tuple(f"val/R@{k}" for k in (10,) if k in cfg.eval.ks)
        steps = None if "train.steps" in self.space else cfg.train.steps
        return SweepSpec(params=tuple(self.space), metric=self.metric, mode=self.mode,
                         extra_metrics=extra, planned_steps=steps,
                         title=f"composeae sweep {self.name}", placement=placement)

    # ----- text

    def to_dict(self) -> dict[str, Any]:
        """The resolved sweep as a sweep file's contents (defaults filled in, base absolute)."""
        return {
            "base": str(self.base_path), "name": self.name,
            "set": {k: plain(v) for k, v in self.fixed},
            "search": {k: d.to_yaml() for k, d in self.search},
            "num_samples": self.num_samples, "metric": self.metric, "mode": self.mode,
            "scheduler": {"name": self.scheduler, "grace_period": self.grace_period,
                          "reduction_factor": self.reduction_factor, "max_t": self.max_t},
            "searcher": self.searcher, "seed": self.seed,
            "max_concurrent_trials": self.max_concurrent_trials, "trial_cpus": self.trial_cpus,
            "max_failures": self.max_failures, "storage": self.storage,
        }

    def to_yaml(self) -> str:
        """The resolved sweep file (what `load_sweep` reads back as an equal `Sweep`)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def changes_from(self, text: str) -> list[str]:
        """The keys (`num_samples`, `search.loss.w_sym`, ...) where this sweep differs from the
        resolved sweep file `text` (`to_yaml` of the sweep when it started)."""
        def flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
            out: dict[str, Any] = {}
            for key, value in d.items():
                if isinstance(value, Mapping) and key in ("set", "search", "scheduler"):
                    out.update(flat(value, f"{prefix}{key}."))
                else:
                    out[f"{prefix}{key}"] = value
            return out

        old, new = flat(yaml.safe_load(text) or {}), flat(self.to_dict())
        return [k for k in dict.fromkeys([*old, *new]) if old.get(k) != new.get(k)]

    def describe(self) -> str:
        """A few lines for people: trials, fixed and searched keys, selection, storage."""
        lines = [f"sweep {self.name}: {self.num_trials} trial(s) of {self.base_path.name}"]
        if self.fixed:
            lines.append("  set:    " + ", ".join(f"{k}={yaml_value(v)}" for k, v in self.fixed))
        families = self.families
        for i, (key, dist) in enumerate(self.search):
            only = [f for f in families if key in self.keys_for(f)]
            scope = f"  (only {', '.join(only)})" if len(only) < len(families) else ""
            lines.append(("  search: " if i == 0 else " " * 10) + f"{key} ~ {dist}{scope}")
        if self.ignored:
            lines.append(f"  not searched: {', '.join(self.ignored)} (no model of this sweep "
                         f"reads them)")
        sched = (f"asha (grace_period {self.grace_period}, reduction_factor "
                 f"{self.reduction_factor:g}, max_t {self.max_t} of {self.evaluations} evaluations)"
                 if self.scheduler == "asha" else "none")
        seed = "unseeded" if self.seed is None else f"seed {self.seed}"
        lines.append(f"  select: {self.mode} {self.metric}; scheduler {sched}; "
                     f"searcher {self.searcher} ({seed})")
        lines.append(f"  at:     {self.experiment_url}")
        return "\n".join(lines)


def checked_config(base: Path, overrides: list[str], check_model: bool = True) -> Config:
    """`load_config` plus the model-name check that the model zoo makes when a model is built."""
    cfg = load_config(base, overrides)
    if not check_model:
        return cfg
    from composeae.models import list_models  # deferred: the models import torch

    if cfg.model.name not in list_models():
        raise UserError(f"config key model.name: unknown model {cfg.model.name!r}; "
                        f"registered: {', '.join(list_models())}")
    return cfg
