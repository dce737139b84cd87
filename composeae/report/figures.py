"""Pictures and styles shared by every page: the run report, `composeae eval --report`, the
sweep page and the nightly report.

What belongs here: making a matplotlib figure without pyplot's global state (`new_figure`),
encoding it as base64 PNG text for `<img src="data:image/png;base64,...">` (`png`, the only PNG
encoder), the two chart kinds more than one page draws (`line_chart_png`, `bars_png`), an empty
panel's message, and the page style every page starts from (`page_style`). Pages inline their
pictures, so each is one self-contained file that opens from object storage.
"""

from __future__ import annotations

import base64
import io

PAGE_CSS = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .8em}")
"""The base style of every page; a page appends its own rules (`page_style`)."""


def page_style(extra: str = "") -> str:
    """A `<style>` element: the base style, then `extra` rules (which win on equal selectors)."""
    return f"<style>{PAGE_CSS}{extra}</style>"


def new_figure(width: float, height: float):
    """A matplotlib Figure of `width` x `height` inches at 100 dpi, outside pyplot (no global
    figure list to leak into, safe from any thread)."""
    from matplotlib.figure import Figure  # deferred: matplotlib takes a second to import

    return Figure(figsize=(width, height), dpi=100)


def png(fig) -> str:
    """The figure as base64 PNG text (for a `data:image/png;base64,` URI)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def img(png_text: str, alt: str) -> str:
    """An `<img>` element showing base64 PNG text."""
    return f'<img alt="{alt}" src="data:image/png;base64,{png_text}">'


def empty_panel(ax, text: str) -> None:
    """An axes that only says `text` (no data yet)."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666")
    ax.set_xticks([])
    ax.set_yticks([])


def line_chart_png(series: dict[str, tuple[list, list[float]]], title: str, ylabel: str,
                   xlabel: str = "step", log_y: bool = False,
                   marks: dict[float, str] | None = None) -> str:
    """A line chart, one line per {name: (xs, ys)}, as base64 PNG text; `log_y` for values
    that differ by orders of magnitude, `marks` {x: label} as dashed vertical lines."""
    fig = new_figure(6.4, 3.6)
    ax = fig.add_subplot()
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, label=name, marker="o" if len(xs) < 40 else None)
    if log_y:
        ax.set_yscale("log")
    for x, label in (marks or {}).items():
        ax.axvline(x, color="#888", linestyle="--", linewidth=1)
        ax.annotate(label, (x, 1), xycoords=("data", "axes fraction"), xytext=(2, -10),
                    textcoords="offset points", fontsize=7, color="#555")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    if any(isinstance(x, str) for xs, _ in series.values() for x in xs):
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    return png(fig)


def bars_png(tables: dict[str, dict[str, float]], keys: list[str], title: str) -> str:
    """Grouped bars in percent: one group per key, one bar per {name: table} (base64 PNG)."""
    fig = new_figure(6.4, 3.6)
    ax = fig.add_subplot()
    width = 0.8 / len(tables)
    for i, (name, table) in enumerate(tables.items()):
        xs = [j + (i - (len(tables) - 1) / 2) * width for j in range(len(keys))]
        bars = ax.bar(xs, [100 * table[k] for k in keys], width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(keys)), [k.split("/")[-1] for k in keys])
    ax.set_ylabel("recall (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return png(fig)
