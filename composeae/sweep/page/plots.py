"""The sweep page's pictures: validation curves, the metric against each searched parameter, and
the best of each model family, each as base64 PNG text (`composeae.report.figures`)."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Iterable, Sequence

from composeae.report.figures import empty_panel, new_figure, png
from composeae.report.tables import fmt_value, is_recall_key, metric_label
from composeae.sweep.page.state import SweepSpec, TrialRow
from composeae.sweep.values import is_finite_number

def _scale(name: str) -> float:
    return 100.0 if is_recall_key(name) else 1.0


_BEST_COLOR = "#d62728"


def curves_png(rows: Sequence[TrialRow], spec: SweepSpec) -> str:
    """The validation metric of every trial over steps, one line per trial (base64 PNG)."""
    fig = new_figure(8.0, 4.2)
    ax = fig.add_subplot()
    drawn = [r for r in rows if r.curve]
    if not drawn:
        empty_panel(ax, "no validation results yet")
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
        ax.set_ylabel(metric_label(spec.metric))
        ax.grid(alpha=0.3)
        if len(drawn) <= 20:
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(f"{spec.metric} over steps (dashed, x: stopped early)")
    return png(fig)


def _categorical(values: Iterable[Any]) -> bool:
    return any(not is_finite_number(v) for v in values)


def params_png(rows: Sequence[TrialRow], spec: SweepSpec) -> str:
    """Each trial's best metric against each searched parameter (base64 PNG)."""
    params = list(spec.params)
    n = max(1, len(params))
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig = new_figure(4.0 * ncols, 3.3 * nrows)
    scored = [r for r in rows if r.best is not None]
    k = _scale(spec.metric)
    if not params or not scored:
        empty_panel(fig.add_subplot(), "no searched parameters" if not params
               else "no validation results yet")
        return png(fig)
    for i, name in enumerate(params):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        # Trials of a family that does not read the key have no value for it: not drawn.
        points = [(r.params[name], k * r.best, r) for r in scored
                  if r.params.get(name) is not None]
        if not points:
            empty_panel(ax, f"no result yet with {name}")
            continue
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
        ax.set_ylabel(f"best {metric_label(spec.metric)}", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"best {spec.metric} per trial (star: best; grey: stopped early)", fontsize=10)
    return png(fig)


def families_png(rows: Sequence[TrialRow], spec: SweepSpec) -> str:
    """The best metric of each model family (`spec.family_key`), one bar each (base64 PNG)."""
    fig = new_figure(6.0, 3.4)
    ax = fig.add_subplot()
    best: dict[str, float] = {}
    for r in rows:
        if r.best is None:
            continue
        fam = r.family if r.family is not None else "(unknown)"
        if fam not in best or (r.best > best[fam] if spec.mode == "max" else r.best < best[fam]):
            best[fam] = r.best
    if not best:
        empty_panel(ax, "no validation results yet")
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
        ax.set_ylabel(f"best {metric_label(spec.metric)}")
        ax.set_xlabel(spec.family_key)
        ax.grid(alpha=0.3, axis="y")
        ax.margins(y=0.15)
    ax.set_title(f"best {spec.metric} per model family")
    return png(fig)
