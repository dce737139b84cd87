"""The HTML report written at the end of a run: loss and recall curves, the recall table, what
the best weights retrieve for a few fixed test queries (`composeae.retrievals`), the config; and
the page of `composeae eval --report` (the recall table and the retrievals of one checkpoint).

One self-contained file (`report.html`, pictures inlined as base64 PNG) so it can be opened from
object storage or attached to a nightly notification.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from composeae.config import Config, dump_config


_NOT_LOSSES = {"step", "lr", "samples_per_s"}
"""Keys of a logged training row that are not loss terms."""


def figure_png(series: dict[str, tuple[list, list[float]]], title: str, ylabel: str,
               xlabel: str = "step") -> str:
    """A line chart as base64 PNG text (for `<img src="data:image/png;base64,...">`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, label=name, marker="o" if len(xs) < 40 else None)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    if any(isinstance(x, str) for xs, _ in series.values() for x in xs):
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _series(history: list[dict[str, float]], prefix: str) -> dict[str, tuple[list, list]]:
    out: dict[str, tuple[list, list]] = {}
    for row in history:
        for key, value in row.items():
            if key.startswith(prefix) and isinstance(value, (int, float)):
                xs, ys = out.setdefault(key.removeprefix(prefix), ([], []))
                xs.append(row["step"])
                ys.append(value)
    return out


def _recall_rows(metrics: dict[str, Any]) -> str:
    return "".join(f"<tr><td>{html.escape(k)}</td><td>{100 * v:.2f}</td></tr>"
                   for k, v in metrics.items() if "@" in k)


_STYLE = """<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .8em}</style>"""


def render_report(cfg: Config, history: list[dict[str, float]], metrics: dict[str, Any],
                  retrievals: dict[str, Any] | None = None) -> str:
    """The report page as an HTML string; `retrievals`: the final checkpoint's retrieval record
    (its images are read from the run's dataset)."""
    from composeae.retrievals import render_section

    # Loss terms are whatever the model declared: the keys of the logged training rows.
    terms = {k for row in history if "loss" in row for k in row} - _NOT_LOSSES
    losses = {k: v for k, v in _series(history, "").items() if k in terms}
    recalls = _series(history, "val/")
    rows = _recall_rows(metrics)
    section = render_section(retrievals, cfg.data.url,
                             "What the best weights retrieve") if retrievals else ""
    pictures = [f'<img alt="training loss" src="data:image/png;base64,'
                f'{figure_png(losses, "training loss", "loss")}">']
    if recalls:
        pictures.append(f'<img alt="validation recall" src="data:image/png;base64,'
                        f'{figure_png(recalls, "validation recall", "recall")}">')
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>composeae run {html.escape(cfg.train.name)}</title>
{_STYLE}</head>
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


def write_report(run_url: str, cfg: Config, history: list[dict[str, float]],
                 metrics: dict[str, Any], retrievals: dict[str, Any] | None = None) -> str:
    """Write `report.html` into the run directory; returns its URL."""
    from composeae import storage

    url = storage.join(run_url, "report.html")
    storage.write_text(url, render_report(cfg, history, metrics, retrievals))
    return url


def render_eval_report(checkpoint: str, data_url: str, split: str, table: dict[str, float],
                       retrievals: dict[str, Any] | None) -> str:
    """The page of `composeae eval --report`: one checkpoint's recall table on a dataset's split
    and what it retrieves for the split's fixed queries."""
    from composeae.retrievals import render_section

    section = render_section(retrievals, data_url, "What the checkpoint retrieves")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>composeae eval {html.escape(checkpoint)}</title>
{_STYLE}</head>
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
    from composeae import storage

    storage.write_text(url, render_eval_report(checkpoint, data_url, split, table, retrievals))
    return url
