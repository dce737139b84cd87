"""A sweep's trials as its random searcher will run them, without running any: what the sweep
tests compare (a seed reproduces a sweep, each draw builds a valid trial config). Needs no
running Ray."""

from __future__ import annotations

from typing import Any

from composeae.sweep.plan import plan_trials
from composeae.sweep.spec import Sweep


def preview(sweep: Sweep) -> list[dict[str, Any]]:
    """The trials' parameters as the random searcher hands them to Tune, in order."""
    return [dict(t) for t in plan_trials(sweep).trials]
