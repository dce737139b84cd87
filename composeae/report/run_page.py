"""The HTML report written at the end of a run: loss and recall curves, the recall table, what
the best weights retrieve for a few fixed test queries (`composeae.report.retrievals`), the
config; and
the page of `composeae eval --report` (the recall table and the retrievals of one checkpoint).

One self-contained file (`report.html`, pictures inlined as base64 PNG) so it can be opened from
object storage or attached to a nightly notification.
"""

from __future__ import annotations

import html
from typing import Any

from composeae import storage
from composeae.config import Config, dump_config
from composeae.report.figures import img, line_chart_png, page_style
from composeae.report.retrievals import render_section
from composeae.report.tables import is_recall_key

_NOT_LOSSES = {"step", "lr", "samples_per_s"}
"""Keys of a logged training row that are not loss terms."""


def _series(history: list[dict[str, float]], prefix: str) -> dict[str, tuple[list, list]]:
    out: dict[str, tuple[list, list]] = {}
    for row in history:
        for key, value in row.items():
            if key.startswith(prefix) and isinstance(value, (int, float)):
                xs, ys = out.setdefault(key.removeprefix(prefix), ([], []))
                xs.append(row["step"])
                ys.append(value)
    return out


def _spans_decades(series: dict[str, tuple[list, list[float]]]) -> bool:
    """Whether positive values span more than two orders of magnitude (loss terms often do:
    a base loss near 1 beside a symmetry term near 0.01): then a log axis shows them all."""
    values = [y for _, ys in series.values() for y in ys]
    return bool(values) and min(values) > 0 and max(values) / min(values) > 100


def _recall_rows(metrics: dict[str, Any]) -> str:
    return "".join(f"<tr><td>{html.escape(k)}</td><td>{100 * v:.2f}</td></tr>"
                   for k, v in metrics.items() if is_recall_key(k))


def render_report(cfg: Config, history: list[dict[str, float]], metrics: dict[str, Any],
                  retrievals: dict[str, Any] | None = None) -> str:
    """The report page as an HTML string; `retrievals`: the final checkpoint's retrieval record
    (its images are read from the run's dataset)."""
    # Loss terms are whatever the model declared: the keys of the logged training rows.
    terms = {k for row in history if "loss" in row for k in row} - _NOT_LOSSES
    losses = {k: v for k, v in _series(history, "").items() if k in terms}
    recalls = _series(history, "val/")
    rows = _recall_rows(metrics)
    section = render_section(retrievals, cfg.data.url,
                             "What the best weights retrieve") if retrievals else ""
    # Where the worker group restarted from a checkpoint (a failure, a resize, a resubmission).
    marks = {step: "resumed" for step in metrics.get("restarts", [])}
    pictures = [img(line_chart_png(losses, "training loss", "loss", log_y=_spans_decades(losses),
                                   marks=marks), "training loss")]
    if recalls:
        recalls = {k: (xs, [100 * y for y in ys]) for k, (xs, ys) in recalls.items()}
        pictures.append(img(line_chart_png(recalls, "validation recall", "recall (%)",
                                           marks=marks),
                            "validation recall"))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>composeae run {html.escape(cfg.train.name)}</title>
{page_style()}</head>
<body>
<h1>{html.escape(cfg.model.name)} on {html.escape(cfg.data.url)}</h1>
<p>run <code>{html.escape(cfg.train.name)}</code>: {metrics.get("step")} steps,
{metrics.get("samples_seen")} samples; best validation step {metrics.get("best_step")}.</p>
<h2>Recall (%)</h2>
<table><tr><th>metric</th><th>value</th></tr>{rows}</table>
{section}<h2>Curves</h2>
{"".join(pictures)}
<h2>Config</h2>
<pre>{html.escape(dump_config(cfg))}</pre>
</body></html>
"""


def write_report(url: str, cfg: Config, history: list[dict[str, float]],
                 metrics: dict[str, Any], retrievals: dict[str, Any] | None = None) -> str:
    """Write the run's page to `url` (the run directory's `report.html`); returns `url`."""
    storage.write_text(url, render_report(cfg, history, metrics, retrievals))
    return url


def render_eval_report(checkpoint: str, data_url: str, split: str, table: dict[str, float],
                       retrievals: dict[str, Any] | None) -> str:
    """The page of `composeae eval --report`: one checkpoint's recall table on a dataset's split
    and what it retrieves for the split's fixed queries."""
    section = render_section(retrievals, data_url, "What the checkpoint retrieves")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>composeae eval {html.escape(checkpoint)}</title>
{page_style()}</head>
<body>
<h1>Evaluation on {html.escape(data_url)} [{html.escape(split)}]</h1>
<p>checkpoint <code>{html.escape(checkpoint)}</code></p>
<h2>Recall (%)</h2>
<table><tr><th>metric</th><th>value</th></tr>{_recall_rows(table)}</table>
{section}</body></html>
"""


def write_eval_report(url: str, checkpoint: str, data_url: str, split: str,
                      table: dict[str, float], retrievals: dict[str, Any] | None) -> str:
    """Write `render_eval_report`'s page to `url` (a path or s3://); returns `url`."""
    storage.write_text(url, render_eval_report(checkpoint, data_url, split, table, retrievals))
    return url
