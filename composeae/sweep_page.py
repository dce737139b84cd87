"""The sweep's own page: a live summary of a Ray Tune search, rewritten while the search runs.

What belongs here, in three layers:

- the row model: `SweepState` takes the results Tune receives from each trial (metrics such as
  `step`, `val/R@1`, `val/R@10`, `samples_seen`, and the closing result with `final: True` and
  `test/R@...`) and the trials' statuses, and turns them into one `TrialRow` per trial. It is
  plain data, updated by plain method calls, so it is tested without Ray and saved with the
  experiment's state;
- the renderers: `render_csv`, `render_md` and `render_html` turn rows into `summary.csv`,
  `summary.md` and `summary.html`, pure functions of their arguments. The HTML page is one
  self-contained file (matplotlib pictures inlined as base64 PNG, like the run report) that
  refreshes itself while the sweep runs;
- `SweepPageCallback`, the Tune callback that feeds the state from Tune's hooks and writes the
  three files into the sweep directory (a local path or an `s3://` URL) through
  `composeae.storage`, at most once every `min_interval_s` while results stream in and at
  once when a trial ends or the sweep ends.

A trial "stopped early" is one that Tune terminated (for example ASHA) before it finished: it
never reported `final: True`, and, when `planned_steps` is given, its last `step` is below it.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping, Sequence

from ray.tune import Callback

log = logging.getLogger(__name__)

PENDING = "PENDING"
RUNNING = "RUNNING"
PAUSED = "PAUSED"
TERMINATED = "TERMINATED"
ERROR = "ERROR"

FILES = ("summary.csv", "summary.md", "summary.html")
_STATE_VERSION = 1
_MISSING = object()


# ---------------------------------------------------------------------------------------------
# The row model


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


def _number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _plain(value: Any) -> Any:
    """A value that pickles, compares and prints plainly (numpy scalars become Python ones)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    item = getattr(value, "item", None)
    if callable(item):
        try:
            value = item()
        except (TypeError, ValueError):
            return str(value)
        if isinstance(value, (bool, int, float, str)):
            return value
    return str(value)


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
        rec["params"] = {p: _plain(lookup(config, p)) for p in self.spec.params}
        family = lookup(config, self.spec.family_key)
        if family is not None:
            rec["family"] = str(_plain(family))

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
        if flat.get("final") in (True, 1):
            rec["final"] = True
        for key, value in flat.items():
            if key.startswith("test/") and _number(value):
                rec["test"][key] = float(value)
        if _number(flat.get("samples_seen")):
            rec["samples_seen"] = max(rec["samples_seen"] or 0, flat["samples_seen"])
        step = flat.get("step")
        if not _number(step):
            step = flat.get("training_iteration")
        if not _number(step):
            return
        step = _step_key(step)
        if rec["last_step"] is None or step > rec["last_step"]:
            rec["last_step"] = step
        values = {m: float(flat[m]) for m in self.spec.tracked if _number(flat.get(m))}
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


# ---------------------------------------------------------------------------------------------
# Renderers (pure)


def _is_recall(name: str) -> bool:
    return "@" in name


def fmt_metric(name: str, value: float | None, empty: str = "–") -> str:
    """Recall-like metrics (`R@k`) as percentages, others with 4 significant digits."""
    if value is None:
        return empty
    return f"{100 * value:.2f}" if _is_recall(name) else f"{value:.4g}"


def _metric_label(name: str) -> str:
    return f"{name} (%)" if _is_recall(name) else name


def fmt_value(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _fmt_step(value: float | None) -> str:
    return "–" if value is None else f"{value:g}"


def _counts(rows: Sequence[TrialRow]) -> str:
    status = Counter(r.status for r in rows)
    early = sum(r.stopped_early for r in rows)
    parts = [f"{status.get(RUNNING, 0)} running", f"{status.get(PENDING, 0)} pending"]
    if status.get(PAUSED):
        parts.append(f"{status[PAUSED]} paused")
    parts.append(f"{status.get(TERMINATED, 0)} terminated ({early} stopped early)")
    parts.append(f"{status.get(ERROR, 0)} errored")
    return f"{len(rows)} trials: " + ", ".join(parts)


def _best_sentence(best: TrialRow | None, spec: SweepSpec) -> str:
    """Plain-text sentence naming the best trial (escaped by the HTML renderer)."""
    if best is None:
        return "No trial has reported a result yet."
    pct = "%" if _is_recall(spec.metric) else ""
    text = (f"{best.trial_id}: {spec.metric} {fmt_metric(spec.metric, best.best)}{pct} "
            f"at step {_fmt_step(best.best_step)}")
    if best.params:
        text += " (" + ", ".join(f"{k}={fmt_value(v)}" for k, v in best.params.items()) + ")"
    if best.test is not None and spec.test_metric:
        text += f"; {spec.test_metric} {fmt_metric(spec.test_metric, best.test)}{pct}"
    return text + "."


def csv_columns(spec: SweepSpec) -> list[str]:
    return ["trial_id", "status", *spec.params, f"best {spec.metric}", "best_step",
            *[f"best {m}" for m in spec.extra_metrics], "steps", "evaluations",
            "stopped_early", *([spec.test_metric] if spec.test_metric else []),
            "samples_seen", "is_best"]


def render_csv(rows: Sequence[TrialRow], spec: SweepSpec) -> str:
    """`summary.csv`: one row per trial, metric values as reported (fractions, not percent)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(csv_columns(spec))

    def cell(value: Any) -> Any:
        return "" if value is None else value

    for r in rows:
        writer.writerow([
            r.trial_id, r.status, *[cell(r.params.get(p)) for p in spec.params],
            cell(r.best), cell(r.best_step), *[cell(r.extras.get(m)) for m in spec.extra_metrics],
            cell(r.steps), r.evaluations, r.stopped_early,
            *([cell(r.test)] if spec.test_metric else []), cell(r.samples_seen), r.is_best])
    return out.getvalue()


def _table_header(spec: SweepSpec) -> list[str]:
    return ["trial", "status", *spec.params, f"best {_metric_label(spec.metric)}", "at step",
            *[f"best {_metric_label(m)}" for m in spec.extra_metrics], "steps", "evaluations",
            "stopped early", *([_metric_label(spec.test_metric)] if spec.test_metric else [])]


def _table_cells(r: TrialRow, spec: SweepSpec) -> list[str]:
    return [r.trial_id, r.status, *[fmt_value(r.params.get(p)) for p in spec.params],
            fmt_metric(spec.metric, r.best), _fmt_step(r.best_step),
            *[fmt_metric(m, r.extras.get(m)) for m in spec.extra_metrics],
            _fmt_step(r.steps), str(r.evaluations), "yes" if r.stopped_early else "",
            *([fmt_metric(spec.test_metric, r.test)] if spec.test_metric else [])]


def _state_sentence(ended: bool, updated: str | None, refresh_s: int | None = None) -> str:
    when = f" Updated {updated}." if updated else ""
    if ended:
        return f"The sweep has ended.{when}"
    again = f" This page reloads every {refresh_s} s." if refresh_s else ""
    return f"The sweep is running.{when}{again}"


def render_md(rows: Sequence[TrialRow], spec: SweepSpec, *, ended: bool = False,
              updated: str | None = None) -> str:
    """`summary.md`: the same table in Markdown, best trial named above it."""

    def esc(text: str) -> str:
        return text.replace("|", "\\|")

    best = best_row(rows)
    header = _table_header(spec)
    lines = [f"# {spec.title}", "", _state_sentence(ended, updated), "", _counts(rows) + ".", "",
             f"**Best trial:** {esc(_best_sentence(best, spec))}", "",
             "| " + " | ".join(esc(h) for h in header) + " |",
             "|" + "|".join(" --- " for _ in header) + "|"]
    for r in rows:
        cells = [esc(c) for c in _table_cells(r, spec)]
        if r.is_best:
            cells[0] = f"**{cells[0]}**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# -- pictures --------------------------------------------------------------------------------


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _empty(fig, ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666")
    ax.set_xticks([])
    ax.set_yticks([])


def _scale(name: str) -> float:
    return 100.0 if _is_recall(name) else 1.0


_BEST_COLOR = "#d62728"


def curves_png(rows: Sequence[TrialRow], spec: SweepSpec) -> str:
    """The validation metric of every trial over steps, one line per trial (base64 PNG)."""
    fig = _new_figure(8.0, 4.2)
    ax = fig.add_subplot()
    drawn = [r for r in rows if r.curve]
    if not drawn:
        _empty(fig, ax, "no validation results yet")
    k = _scale(spec.metric)
    for i, r in enumerate(sorted(drawn, key=lambda r: r.is_best)):
        xs = [s for s, _ in r.curve]
        ys = [k * v for _, v in r.curve]
        style = {"linewidth": 2.6, "color": _BEST_COLOR, "zorder": 3} if r.is_best else {
            "linewidth": 1.2, "alpha": 0.85}
        label = r.trial_id + (" (best)" if r.is_best else "") + (
            " (stopped early)" if r.stopped_early else "")
        (line,) = ax.plot(xs, ys, linestyle="--" if r.stopped_early else "-",
                          marker="o" if len(xs) < 30 else None, markersize=3, label=label,
                          **style)
        if r.stopped_early:
            ax.plot(xs[-1:], ys[-1:], marker="x", markersize=8, color=line.get_color())
    if drawn:
        ax.set_xlabel("step")
        ax.set_ylabel(_metric_label(spec.metric))
        ax.grid(alpha=0.3)
        if len(drawn) <= 20:
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(f"{spec.metric} over steps (dashed, x: stopped early)")
    return _png(fig)


def _categorical(values: Iterable[Any]) -> bool:
    return any(not _number(v) for v in values)


def params_png(rows: Sequence[TrialRow], spec: SweepSpec) -> str:
    """Each trial's best metric against each searched parameter (base64 PNG)."""
    params = list(spec.params)
    n = max(1, len(params))
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig = _new_figure(4.0 * ncols, 3.3 * nrows)
    scored = [r for r in rows if r.best is not None]
    k = _scale(spec.metric)
    if not params or not scored:
        _empty(fig, fig.add_subplot(), "no searched parameters" if not params
               else "no validation results yet")
        return _png(fig)
    for i, name in enumerate(params):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        points = [(r.params.get(name), k * r.best, r) for r in scored]
        values = [v for v, _, _ in points]
        if _categorical(values):
            cats = sorted({fmt_value(v) for v in values})
            pos = {c: j for j, c in enumerate(cats)}
            seen: Counter = Counter()
            xs = []
            for v, _, _ in points:
                c = fmt_value(v)
                # Small deterministic spread so equal categories do not hide each other.
                xs.append(pos[c] + 0.08 * (((seen[c] + 1) // 2) * (-1) ** seen[c]))
                seen[c] += 1
            ax.set_xticks(range(len(cats)))
            ax.set_xticklabels(cats, rotation=20 if len(cats) > 3 else 0, fontsize=8)
            ax.set_xlim(-0.6, len(cats) - 0.4)
        else:
            xs = [float(v) for v in values]
            positive = [x for x in xs if x > 0]
            if len(positive) == len(xs) and max(xs) / min(xs) >= 100:
                ax.set_xscale("log")
        ys = [y for _, y, _ in points]
        colors = ["#999999" if r.stopped_early else "#1f77b4" for _, _, r in points]
        ax.scatter(xs, ys, c=colors, s=28, zorder=2)
        for x, y, (_, _, r) in zip(xs, ys, points):
            if r.is_best:
                ax.scatter([x], [y], marker="*", s=220, c=_BEST_COLOR, zorder=3)
        ax.set_xlabel(name)
        ax.set_ylabel(f"best {_metric_label(spec.metric)}", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"best {spec.metric} per trial (star: best; grey: stopped early)", fontsize=10)
    return _png(fig)


def families_png(rows: Sequence[TrialRow], spec: SweepSpec) -> str:
    """The best metric of each model family (`spec.family_key`), one bar each (base64 PNG)."""
    fig = _new_figure(6.0, 3.4)
    ax = fig.add_subplot()
    best: dict[str, float] = {}
    for r in rows:
        if r.best is None:
            continue
        fam = r.family if r.family is not None else "(unknown)"
        if fam not in best or (r.best > best[fam] if spec.mode == "max" else r.best < best[fam]):
            best[fam] = r.best
    if not best:
        _empty(fig, ax, "no validation results yet")
    else:
        k = _scale(spec.metric)
        names = sorted(best, key=lambda f: best[f], reverse=spec.mode == "max")
        heights = [k * best[f] for f in names]
        colors = [_BEST_COLOR if i == 0 else "#1f77b4" for i in range(len(names))]
        bars = ax.bar(range(len(names)), heights, color=colors)
        ax.bar_label(bars, labels=[f"{h:.2f}" if k == 100 else f"{h:.4g}" for h in heights],
                     fontsize=8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=20 if len(names) > 4 else 0, fontsize=8)
        ax.set_ylabel(f"best {_metric_label(spec.metric)}")
        ax.set_xlabel(spec.family_key)
        ax.grid(alpha=0.3, axis="y")
        ax.margins(y=0.15)
    ax.set_title(f"best {spec.metric} per model family")
    return _png(fig)


_CSS = """body{font-family:sans-serif;max-width:75em;margin:1.5em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.best td{background:#fff3c4;font-weight:bold}.best-box{background:#fff3c4;padding:.6em 1em;
border-left:4px solid #d62728}.RUNNING{color:#1565c0}.ERROR{color:#c62828}.PENDING{color:#777}
.TERMINATED{color:#2e7d32}.meta{color:#555}img{max-width:100%;display:block;margin:.5em 0 1.5em}"""


def render_html(rows: Sequence[TrialRow], spec: SweepSpec, *, ended: bool = False,
                updated: str | None = None, refresh_s: int = 15) -> str:
    """`summary.html`: status line, the best trial, the table and three pictures.

    While the sweep runs (`ended=False`) the page reloads itself every `refresh_s` seconds.
    """
    esc = html.escape
    best = best_row(rows)
    refresh = "" if ended or not refresh_s else \
        f'<meta http-equiv="refresh" content="{int(refresh_s)}">\n'
    header = "".join(f"<th>{esc(h)}</th>" for h in _table_header(spec))
    numeric_from = 2 + len(spec.params)
    body = []
    for r in rows:
        cells = _table_cells(r, spec)
        tds = []
        for j, c in enumerate(cells):
            cls = ' class="n"' if j >= numeric_from else (f' class="{esc(r.status)}"' if j == 1
                                                           else "")
            tds.append(f"<td{cls}>{esc(c)}</td>")
        body.append(f'<tr{" class=best" if r.is_best else ""}>{"".join(tds)}</tr>')
    pictures = [
        (f"validation {spec.metric} over steps", "validation curves", curves_png(rows, spec)),
        (f"{spec.metric} against each searched parameter", "metric against parameters",
         params_png(rows, spec)),
        (f"best {spec.metric} per model family", "best per model family",
         families_png(rows, spec)),
    ]
    figures = "\n".join(f'<h2>{esc(h)}</h2>\n<img alt="{esc(alt)}" '
                        f'src="data:image/png;base64,{png}">' for h, alt, png in pictures)
    return f"""<!doctype html>
<html><head><meta charset="utf-8">
{refresh}<title>{esc(spec.title)}</title>
<style>{_CSS}</style></head>
<body>
<h1>{esc(spec.title)}</h1>
<p class="meta">{esc(_state_sentence(ended, updated, refresh_s))} {esc(_counts(rows))}.</p>
<p class="best-box"><b>Best trial</b> {esc(_best_sentence(best, spec))}</p>
<table><tr>{header}</tr>
{chr(10).join(body)}
</table>
{figures}
</body></html>
"""


# ---------------------------------------------------------------------------------------------
# The Tune callback


class SweepPageCallback(Callback):
    """Keeps `summary.csv`, `summary.md` and `summary.html` in `sweep_url` current.

    Put it in `ray.tune.RunConfig(callbacks=[...])`. It runs on the Tune driver; its state is
    plain data, so Tune can pickle it with the run config and save it with the experiment
    (`get_state`/`set_state`). After `Tuner.restore` the state comes back from that save, and
    every trial Tune knows (finished ones included) is re-read from `trial.status`,
    `trial.config` and `trial.last_result` at the first step, so the page lists them all.

    While results stream in, the files are rewritten at most once every `min_interval_s` (longer
    when drawing a big sweep takes more than a tenth of that); trials ending (completed, stopped
    or errored) are written at the end of the Tune step they ended in, and the sweep's end at
    once. A failing write is logged, never raised: the page must not stop the search.
    """

    def __init__(self, sweep_url: str, params: Sequence[str], metric: str = "val/R@1",
                 mode: str = "max", title: str = "composeae sweep", *,
                 extra_metrics: Sequence[str] = ("val/R@10",), test_metric: str | None = None,
                 planned_steps: int | None = None, family_key: str = "model.name",
                 min_interval_s: float = 10.0, refresh_s: int = 15):
        self.sweep_url = sweep_url
        self.spec = SweepSpec(params=tuple(params), metric=metric, mode=mode,
                              extra_metrics=tuple(extra_metrics), test_metric=test_metric,
                              planned_steps=planned_steps, family_key=family_key, title=title)
        self.min_interval_s = float(min_interval_s)
        self.refresh_s = int(refresh_s)
        self.state = SweepState(self.spec)
        self.writes = 0
        self._last_write = -math.inf
        self._gap = self.min_interval_s
        self._dirty = False
        self._urgent = False
        self._ended = False
        self._synced = False

    # -- wiring --------------------------------------------------------------------------


    @classmethod
    def from_spec(cls, sweep_url: str, spec: SweepSpec, **options: Any) -> "SweepPageCallback":
        """The callback for a ready `SweepSpec` (e.g. `composeae.sweep.Sweep.page_spec()`)."""
        return cls(sweep_url, spec.params, spec.metric, spec.mode, spec.title,
                   extra_metrics=spec.extra_metrics, test_metric=spec.test_metric,
                   planned_steps=spec.planned_steps, family_key=spec.family_key, **options)

    def _sync_all(self, trials: Sequence[Any] | None) -> None:
        for trial in trials or ():
            self.state.sync(trial.trial_id, trial.status, trial.config, trial.last_result)

    def _write(self, trials: Sequence[Any] | None) -> None:
        from composeae import storage

        started = time.monotonic()
        self._sync_all(trials)
        rows = self.state.rows()
        updated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        try:
            storage.write_text(storage.join(self.sweep_url, "summary.csv"),
                               render_csv(rows, self.spec))
            storage.write_text(storage.join(self.sweep_url, "summary.md"),
                               render_md(rows, self.spec, ended=self._ended, updated=updated))
            storage.write_text(storage.join(self.sweep_url, "summary.html"),
                               render_html(rows, self.spec, ended=self._ended, updated=updated,
                                           refresh_s=self.refresh_s))
            self.writes += 1
        except Exception:  # noqa: BLE001 - the page must never stop the search
            log.warning("could not write the sweep page to %s", self.sweep_url, exc_info=True)
        self._dirty = self._urgent = False
        self._last_write = time.monotonic()
        # A big sweep draws slowly: keep drawing under about a tenth of the driver's time.
        self._gap = max(self.min_interval_s, 10 * (self._last_write - started))

    def _due(self) -> bool:
        return self._dirty and (
            self._urgent or time.monotonic() - self._last_write >= self._gap)

    # -- Tune hooks ----------------------------------------------------------------------

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
        self._ended = False
        self._synced = False
        self._last_write = -math.inf

    def on_step_begin(self, iteration: int, trials: list, **info):
        if not self._synced:
            # First step of a run, or of a restored one: list every trial Tune holds.
            self._synced = True
            self._write(trials)

    def on_step_end(self, iteration: int, trials: list, **info):
        # Trials that ended during this step are written here, all in one go.
        if self._due():
            self._write(trials)

    def on_trial_start(self, iteration: int, trials: list, trial, **info):
        self.state.sync(trial.trial_id, RUNNING, trial.config, trial.last_result)
        self._dirty = True

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info):
        self.state.observe(trial.trial_id, result, trial.config)
        self.state.set_status(trial.trial_id, RUNNING)
        self._dirty = True

    def on_trial_complete(self, iteration: int, trials: list, trial, **info):
        # Tune calls this before it marks the trial TERMINATED (right after it returns).
        self.state.sync(trial.trial_id, TERMINATED, trial.config, trial.last_result)
        self._dirty = self._urgent = True

    def on_trial_error(self, iteration: int, trials: list, trial, **info):
        self.state.sync(trial.trial_id, ERROR, trial.config, trial.last_result)
        self._dirty = self._urgent = True

    def on_trial_recover(self, iteration: int, trials: list, trial, **info):
        self._dirty = True

    def on_experiment_end(self, trials: list, **info):
        self._ended = True
        self._write(trials)

    def get_state(self) -> dict | None:
        return self.state.to_dict() if self.state.trials else None

    def set_state(self, state: dict) -> None:
        self.state.load_dict(state)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        # A clock reading means nothing in another process.
        state["_last_write"] = -math.inf
        return state
