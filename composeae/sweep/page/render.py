"""The sweep page's three files from its rows: `summary.csv`, `summary.md` and `summary.html`.

Pure functions of their arguments. The HTML page is one self-contained file (pictures inlined as
base64 PNG, like the run report, from `composeae.sweep.page.plots`) that refreshes itself while
the sweep runs.
"""

from __future__ import annotations

import csv
import html
import io
from collections import Counter
from typing import Any, Sequence

from composeae.report.figures import page_style
from composeae.report.tables import fmt_value, is_recall_key, metric_label
from composeae.sweep.page.plots import curves_png, families_png, params_png
from composeae.sweep.page.state import (ERROR, PAUSED, PENDING, RUNNING, TERMINATED, SweepSpec,
                                        TrialRow, best_row)


def fmt_metric(name: str, value: float | None, empty: str = "–") -> str:
    """Recall-like metrics (`R@k`) as percentages, others with 4 significant digits."""
    if value is None:
        return empty
    return f"{100 * value:.2f}" if is_recall_key(name) else f"{value:.4g}"


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
    pct = "%" if is_recall_key(spec.metric) else ""
    text = (f"{best.trial_id}: {spec.metric} {fmt_metric(spec.metric, best.best)}{pct} "
            f"at step {_fmt_step(best.best_step)}")
    shown = {k: v for k, v in best.params.items() if v is not None}  # its family's keys
    if shown:
        text += " (" + ", ".join(f"{k}={fmt_value(v)}" for k, v in shown.items()) + ")"
    if best.test is not None and spec.test_metric:
        text += f"; {spec.test_metric} {fmt_metric(spec.test_metric, best.test)}{pct}"
    return text + "."


def family_budgets(rows: Sequence[TrialRow], spec: SweepSpec) -> list[list[str]]:
    """Per model family: trials, finished, stopped early, training steps summed over its trials
    and its best value of `spec.metric`, so a comparison across families shows whether each
    had the same budget. The header row first."""
    out = [["model family", "trials", "finished", "stopped early", "steps trained",
            f"best {metric_label(spec.metric)}"]]
    for family in dict.fromkeys(r.family or "–" for r in rows):
        mine = [r for r in rows if (r.family or "–") == family]
        values = [r.best for r in mine if r.best is not None]
        best = (max(values) if spec.mode == "max" else min(values)) if values else None
        out.append([family, str(len(mine)), str(sum(r.finished for r in mine)),
                    str(sum(r.stopped_early for r in mine)),
                    f"{sum(r.steps or 0 for r in mine):g}", fmt_metric(spec.metric, best)])
    return out


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
    return ["trial", "status", *spec.params, f"best {metric_label(spec.metric)}", "at step",
            *[f"best {metric_label(m)}" for m in spec.extra_metrics], "steps", "evaluations",
            "stopped early", *([metric_label(spec.test_metric)] if spec.test_metric else [])]


def _table_cells(r: TrialRow, spec: SweepSpec) -> list[str]:
    return [r.trial_id, r.status, *[fmt_value(r.params.get(p)) for p in spec.params],
            fmt_metric(spec.metric, r.best), _fmt_step(r.best_step),
            *[fmt_metric(m, r.extras.get(m)) for m in spec.extra_metrics],
            _fmt_step(r.steps), str(r.evaluations), "yes" if r.stopped_early else "",
            *([fmt_metric(spec.test_metric, r.test)] if spec.test_metric else [])]


def _counts_line(rows: Sequence[TrialRow], spec: SweepSpec) -> str:
    """The trial counts, and how many run at once when the sweep said so."""
    return _counts(rows) + "." + (f" {spec.placement}." if spec.placement else "")


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
    lines = [f"# {spec.title}", "", _state_sentence(ended, updated), "", _counts_line(rows, spec), "",
             f"**Best trial:** {esc(_best_sentence(best, spec))}", "",
             "| " + " | ".join(esc(h) for h in header) + " |",
             "|" + "|".join(" --- " for _ in header) + "|"]
    for r in rows:
        cells = [esc(c) for c in _table_cells(r, spec)]
        if r.is_best:
            cells[0] = f"**{cells[0]}**"
        lines.append("| " + " | ".join(cells) + " |")
    budgets = family_budgets(rows, spec)
    lines += ["", "## Budget per model family", "", "| " + " | ".join(budgets[0]) + " |",
              "|" + "|".join(" --- " for _ in budgets[0]) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in budgets[1:]]
    return "\n".join(lines) + "\n"


_CSS = """body{max-width:75em;margin:1.5em auto;padding:0 1em;color:#222}
table{font-size:.9em}td,th{padding:.25em .6em}
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
    budgets = family_budgets(rows, spec)
    budget_rows = ["<tr>" + "".join(f"<th>{esc(h)}</th>" for h in budgets[0]) + "</tr>"]
    for row in budgets[1:]:  # the family's name, then numbers
        budget_rows.append("<tr>" + "".join(f'<td{" class=n" if j else ""}>{esc(c)}</td>'
                                            for j, c in enumerate(row)) + "</tr>")
    budget_table = ("<h2>Budget per model family</h2>\n<table>" + "\n".join(budget_rows)
                    + "</table>")
    figures = "\n".join(f'<h2>{esc(h)}</h2>\n<img alt="{esc(alt)}" '
                        f'src="data:image/png;base64,{png}">' for h, alt, png in pictures)
    return f"""<!doctype html>
<html><head><meta charset="utf-8">
{refresh}<title>{esc(spec.title)}</title>
{page_style(_CSS)}</head>
<body>
<h1>{esc(spec.title)}</h1>
<p class="meta">{esc(_state_sentence(ended, updated, refresh_s))} {esc(_counts_line(rows, spec))}</p>
<p class="best-box"><b>Best trial</b> {esc(_best_sentence(best, spec))}</p>
<table><tr>{header}</tr>
{chr(10).join(body)}
</table>
{budget_table}
{figures}
</body></html>
"""
