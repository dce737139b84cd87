"""The trials of a random search, drawn before any runs: a grid over the `grid` keys (usually
`model.name`) crossed with `num_samples` draws of the other keys, each draw holding only the keys
that apply to its model family (`Sweep.keys_for`).

Two trials that train the same effective config would waste a trial and tie on every metric, so
a draw equal to an earlier trial (`Sweep.trial_key`) is drawn again, up to `MAX_REDRAWS` times;
when the family's space holds no new config (TIRG in a sweep of ComposeAE's loss weights has
one), the draw is skipped and listed in `Plan.duplicates`. Pure: a seed gives the same plan.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

# `sweep` arguments are `composeae.sweep.spec.Sweep`s, named as strings only: the spec's Tune
# objects import this module, so it cannot import the spec back.

MAX_REDRAWS = 100
"""Draws tried for one trial before it is skipped as a duplicate."""


@dataclass(frozen=True)
class Plan:
    trials: tuple[dict[str, Any], ...]
    """Each trial's searched values (only the keys of its family), in the order they run."""
    duplicates: tuple[dict[str, Any], ...]
    """Draws skipped because every redraw equalled an earlier trial."""

    def per_family(self, sweep: "Sweep") -> dict[str, int]:
        """Trials per model family, in the sweep's family order."""
        counts = {family: 0 for family in sweep.families}
        for params in self.trials:
            counts[sweep.family_of(params)] += 1
        return counts

    def describe(self, sweep: "Sweep") -> str:
        """One line: trials per family, and the skipped duplicates."""
        counts = ", ".join(f"{family} {n}" for family, n in self.per_family(sweep).items())
        line = f"  trials: {len(self.trials)} ({counts})"
        if self.duplicates:
            line += (f"; {len(self.duplicates)} draw(s) skipped: their model's searched keys "
                     f"hold no config not already drawn")
        return line


def plan_trials(sweep: "Sweep") -> Plan:
    """The random searcher's trials (see the module docstring)."""
    rng = np.random.default_rng(sweep.seed)
    grid = [(key, dist) for key, dist in sweep.search if dist.kind == "grid"]
    points = [dict(zip((k for k, _ in grid), values))
              for values in itertools.product(*(dist.args for _, dist in grid))]
    seen: set[tuple] = set()
    trials: list[dict[str, Any]] = []
    duplicates: list[dict[str, Any]] = []
    for _ in range(sweep.num_samples):
        for point in points:
            keys = sweep.keys_for(sweep.family_of(point))
            for _ in range(MAX_REDRAWS):
                params = {k: point[k] if k in point else sweep.space[k].sample(rng) for k in keys}
                if sweep.trial_key(params) not in seen:
                    seen.add(sweep.trial_key(params))
                    trials.append(params)
                    break
            else:
                duplicates.append(params)
    return Plan(tuple(trials), tuple(duplicates))
