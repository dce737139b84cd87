"""Plain values for sweep files and Tune results: what a sampler or a result hands over (numpy
scalars, tuples) as the Python numbers, lists and YAML text the rest of the sweep code compares,
writes and prints. One home for these checks, shared by the spec, the driver and the page."""

from __future__ import annotations

import math
from typing import Any

import yaml


def yaml_value(value: Any) -> str:
    """`value` as YAML text that config.py's `yaml.safe_load` reads back as `value`."""
    value = plain(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf).strip()
    return text.removesuffix("...").strip()


def plain(value: Any) -> Any:
    """Numpy scalars (what some samplers return) as Python numbers, tuples as lists."""
    if hasattr(value, "item") and not isinstance(value, (list, tuple, dict, str)):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """A number (not a bool) that is neither NaN nor infinite: what a table cell can show."""
    return is_number(value) and math.isfinite(value)
