"""The sweep page's row model: Tune's results and statuses as one `TrialRow` per trial.

`SweepState` takes the results Tune receives from each trial (metrics such as `step`,
`val/R@1`, `val/R@10`, `samples_seen`, and the closing result with `final: True` and
`test/R@...`) and the trials' statuses. It is plain data, updated by plain method calls, so it
is tested without Ray and saved with the experiment's state.

A trial "stopped early" is one that Tune terminated (for example ASHA) before it finished: it
never reported `final: True`, and, when `planned_steps` is given, its last `step` is below it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from composeae.run.layout import FINAL_FLAG
from composeae.sweep.values import is_finite_number, plain

PENDING = "PENDING"
RUNNING = "RUNNING"
PAUSED = "PAUSED"
TERMINATED = "TERMINATED"
ERROR = "ERROR"

_STATE_VERSION = 1
_MISSING = object()


@dataclass(frozen=True)
class SweepSpec:
    """What the page shows: the searched parameters and which metrics rank and fill the rows.

    `metric`/`mode` rank the trials (the best value a trial reached is its score);
    `extra_metrics` get a "best so far" column each (higher is better); `test_metric` is read
    from the trial's closing result (default: `metric` with `val/` replaced by `test/`);
    `planned_steps` is the step count of a trial that runs to its end (optional: a trial that
    reports `final: True` has finished whatever its step); `family_key` names the config key
    whose value is the model family of the bar chart.
    """

    params: tuple[str, ...]
    metric: str = "val/R@1"
    mode: str = "max"
    extra_metrics: tuple[str, ...] = ("val/R@10",)
    test_metric: str | None = None
    planned_steps: int | None = None
    family_key: str = "model.name"
    title: str = "composeae sweep"
    placement: str | None = None
    """How many trials run at once and what each reserves (a sentence), when known."""

    def __post_init__(self) -> None:
        if self.mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', not {self.mode!r}")
        object.__setattr__(self, "params", tuple(self.params))
        object.__setattr__(self, "extra_metrics",
                           tuple(m for m in self.extra_metrics if m != self.metric))
        if self.test_metric is None and self.metric.startswith("val/"):
            object.__setattr__(self, "test_metric", "test/" + self.metric[len("val/"):])

    @property
    def tracked(self) -> tuple[str, ...]:
        """Metrics whose value is kept for every evaluation."""
        return (self.metric, *self.extra_metrics)


@dataclass(frozen=True)
class TrialRow:
    """One trial as the page shows it."""

    trial_id: str
    status: str
    params: dict[str, Any]
    family: str | None
    best: float | None          # best value of `spec.metric` so far
    best_step: float | None     # the step where it was reached
    extras: dict[str, float | None]  # best value of each of `spec.extra_metrics`
    steps: float | None         # the last step reported
    evaluations: int            # evaluations (distinct steps) that reported `spec.metric`
    finished: bool              # ran to its end (`final: True` or `planned_steps` reached)
    stopped_early: bool         # terminated by Tune before finishing
    test: float | None          # `spec.test_metric` from the closing result
    samples_seen: float | None
    curve: tuple[tuple[float, float], ...]  # (step, value of `spec.metric`), by step
    is_best: bool = False


def flatten(result: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to one level with '/'-joined keys, as Tune flattens results."""
    out: dict[str, Any] = {}
    for key, value in result.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out


def lookup(config: Mapping[str, Any], key: str) -> Any:
    """`config[key]` for a flat dotted config, else the nested path `a.b.c`; `None` if absent."""
    if key in config:
        return config[key]
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            node = _MISSING
            break
        node = node[part]
    if node is not _MISSING:
        return node
    return flatten(config).get(key.replace(".", "/"))


def _step_key(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


class SweepState:
    """Per-trial records built from Tune results and statuses; plain data throughout.

    Feeding the same result twice changes nothing (evaluations are keyed by step, a re-reported
    step replaces the values it had), so the state can be re-fed from `trial.last_result` at any
    time, and a trial that resumes from an earlier checkpoint does not count its steps twice.
    """

    def __init__(self, spec: SweepSpec):
        self.spec = spec
        self.trials: dict[str, dict[str, Any]] = {}

    # -- updates --------------------------------------------------------------------------

    def _record(self, trial_id: str) -> dict[str, Any]:
        rec = self.trials.get(trial_id)
        if rec is None:
            rec = self.trials[trial_id] = {
                "status": PENDING, "params": {}, "family": None, "evals": {},
                "last_step": None, "final": False, "test": {}, "samples_seen": None,
            }
        return rec

    def set_config(self, trial_id: str, config: Mapping[str, Any] | None) -> None:
        if not config:
            return
        rec = self._record(trial_id)
        rec["params"] = {p: plain(lookup(config, p)) for p in self.spec.params}
        family = lookup(config, self.spec.family_key)
        if family is not None:
            rec["family"] = str(plain(family))

    def set_status(self, trial_id: str, status: str) -> None:
        self._record(trial_id)["status"] = str(status)

    def observe(self, trial_id: str, result: Mapping[str, Any] | None,
                config: Mapping[str, Any] | None = None) -> None:
        """Take one result of a trial (and its config, when known)."""
        rec = self._record(trial_id)
        self.set_config(trial_id, config)
        if not result:
            return
        flat = flatten(result)
        if flat.get(FINAL_FLAG) in (True, 1):
            rec["final"] = True
        for key, value in flat.items():
            if key.startswith("test/") and is_finite_number(value):
                rec["test"][key] = float(value)
        if is_finite_number(flat.get("samples_seen")):
            rec["samples_seen"] = max(rec["samples_seen"] or 0, flat["samples_seen"])
        step = flat.get("step")
        if not is_finite_number(step):
            step = flat.get("training_iteration")
        if not is_finite_number(step):
            return
        step = _step_key(step)
        if rec["last_step"] is None or step > rec["last_step"]:
            rec["last_step"] = step
        values = {m: float(flat[m]) for m in self.spec.tracked if is_finite_number(flat.get(m))}
        if values:
            rec["evals"].setdefault(step, {}).update(values)

    def sync(self, trial_id: str, status: str | None, config: Mapping[str, Any] | None,
             last_result: Mapping[str, Any] | None) -> None:
        """Bring one trial up to what Tune holds for it: status, config and last result."""
        self.observe(trial_id, last_result, config)
        if status:
            self.set_status(trial_id, status)

    # -- saving (Tune's callback state) --------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION,
                "trials": {tid: {**rec, "params": dict(rec["params"]), "test": dict(rec["test"]),
                                 "evals": {s: dict(v) for s, v in rec["evals"].items()}}
                           for tid, rec in self.trials.items()}}

    def load_dict(self, state: Mapping[str, Any]) -> None:
        """Merge saved records in (records already fed since keep their newer status)."""
        if not state or state.get("version") != _STATE_VERSION:
            return
        for tid, saved in state.get("trials", {}).items():
            rec = self._record(tid)
            if not rec["params"]:
                rec["params"] = dict(saved.get("params", {}))
            rec["family"] = rec["family"] or saved.get("family")
            for step, values in saved.get("evals", {}).items():
                merged = dict(values)
                merged.update(rec["evals"].get(step, {}))
                rec["evals"][step] = merged
            steps = [s for s in (rec["last_step"], saved.get("last_step")) if s is not None]
            rec["last_step"] = max(steps) if steps else None
            rec["final"] = rec["final"] or bool(saved.get("final"))
            rec["test"] = {**saved.get("test", {}), **rec["test"]}
            seen = [s for s in (rec["samples_seen"], saved.get("samples_seen")) if s is not None]
            rec["samples_seen"] = max(seen) if seen else None
            if rec["status"] == PENDING:
                rec["status"] = saved.get("status", PENDING)

    # -- reading -------------------------------------------------------------------------

    def _better(self, a: float, b: float) -> bool:
        return a > b if self.spec.mode == "max" else a < b

    def rows(self) -> list[TrialRow]:
        """One row per trial, best first; trials without a value yet last, by trial id."""
        spec = self.spec
        rows = []
        for tid, rec in self.trials.items():
            evals = sorted(rec["evals"].items())
            curve = tuple((step, v[spec.metric]) for step, v in evals if spec.metric in v)
            best = best_step = None
            for step, value in curve:
                if best is None or self._better(value, best):
                    best, best_step = value, step
            extras = {}
            for m in spec.extra_metrics:
                values = [v[m] for _, v in evals if m in v]
                extras[m] = max(values) if values else None
            last = rec["last_step"]
            finished = bool(rec["final"]) or (
                spec.planned_steps is not None and last is not None
                and last >= spec.planned_steps)
            rows.append(TrialRow(
                trial_id=tid, status=rec["status"], params=dict(rec["params"]),
                family=rec["family"], best=best, best_step=best_step, extras=extras,
                steps=last, evaluations=len(curve), finished=finished,
                stopped_early=rec["status"] == TERMINATED and not finished,
                test=rec["test"].get(spec.test_metric) if spec.test_metric else None,
                samples_seen=rec["samples_seen"], curve=curve))
        # Ties go to the lowest trial id, as the sweep driver names its best (trial ids number
        # trials in the order Tune created them, whatever order a restored sweep reports in).
        sign = -1.0 if spec.mode == "max" else 1.0
        rows.sort(key=lambda r: (r.best is None, sign * r.best if r.best is not None else 0.0,
                                 r.trial_id))
        if rows and rows[0].best is not None:
            rows[0] = replace(rows[0], is_best=True)
        return rows


def best_row(rows: Sequence[TrialRow]) -> TrialRow | None:
    return next((r for r in rows if r.is_best), None)
