"""Recall tables as text, and the one rule for which keys of a metrics dict are recalls.

What belongs here: `is_recall_key` (every page, table and chart asks it, so a key such as
`val/R@10`, `test/joint/R@1` or `Rs@2` is shown as a percentage everywhere alike),
`recall_keys` (a table's recall keys in K order) and `format_table` (the small text table the
command line and the workers print).
"""

from __future__ import annotations

import re
from typing import Any

from composeae.evaluate import JOINT

_RECALL = re.compile(r"(?:.*/)?(Rs?)@(\d+)")


def is_recall_key(name: str) -> bool:
    """True for a recall key (`R@K` or the subset recall `Rs@K`, under any prefix): a fraction
    in [0, 1], shown in percent."""
    return _RECALL.fullmatch(name) is not None


def recall_keys(table: dict[str, float]) -> list[str]:
    """The recall keys of a table, by prefix then K (tables read back from JSON come sorted as
    text, which puts R@10 before R@5)."""
    def order(key: str) -> tuple[str, int]:
        prefix, _, k = key.rpartition("@")
        return prefix, int(k)

    return sorted((k for k in table if is_recall_key(k)), key=order)


def format_table(metrics: dict[str, float], title: str = "") -> str:
    """A small text table of R@K values (as percentages, like the papers), in the order of
    `metrics`; a legend line says which gallery each column used when the joint gallery was
    scored too."""
    keys = [k for k in metrics if is_recall_key(k)]
    widths = [max(10, len(k)) for k in keys]
    head = " ".join(f"{k:>{w}}" for k, w in zip(keys, widths))
    row = " ".join(f"{100 * metrics[k]:>{w}.2f}" for k, w in zip(keys, widths))
    legend = ("R@K: one gallery per category (mean over categories); joint/R@K: one gallery of "
              "all categories" if any(JOINT in k for k in keys) else "")
    return "\n".join(x for x in (title, head, row, legend) if x)


def metric_label(name: str) -> str:
    """A metric's name as a column or axis label: recalls say they are in percent."""
    return f"{name} (%)" if is_recall_key(name) else name


def fmt_value(value: Any) -> str:
    """A parameter or metric value in a table cell: floats to 4 significant digits."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
