"""Ray Tune searchers that never train one effective config twice (`composeae.sweep.plan`).

`PlannedSearch` hands out a random search's `Plan`, drawn before the sweep starts; `DistinctSearch`
wraps a sequential searcher (Optuna's) and asks it again when it suggests a config an earlier trial
already has, telling it the repeat failed so its model moves on. Both save their state with the
experiment, so a restored sweep continues where it stopped. This module imports Ray at the top:
`composeae.sweep.tune_objects` imports it when it builds a searcher.
"""

from __future__ import annotations

import logging
import pickle
from typing import Any, Callable, Mapping

from ray.tune.search import Searcher

logger = logging.getLogger(__name__)


class _PickledState(Searcher):
    """Saves and restores the searcher's attributes (what Tune keeps with the experiment)."""

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


class PlannedSearch(_PickledState):
    """Suggests the planned trials in order, then `FINISHED`."""

    def __init__(self, trials: list[Mapping[str, Any]], metric: str, mode: str):
        super().__init__(metric=metric, mode=mode)
        self._trials = [dict(t) for t in trials]
        self._next = 0

    def suggest(self, trial_id: str) -> dict[str, Any] | str:
        if self._next >= len(self._trials):
            return Searcher.FINISHED
        self._next += 1
        return dict(self._trials[self._next - 1])

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        pass  # the plan does not learn from results


class DistinctSearch(_PickledState):
    """`inner`'s suggestions, without a config equal (by `key`) to an earlier trial's: a repeat
    is reported to `inner` as a failed trial and `inner` is asked again, up to `max_asks` times,
    after which the search ends (the space holds nothing new as far as `inner` can tell)."""

    def __init__(self, inner: Searcher, key: Callable[[Mapping[str, Any]], Any],
                 metric: str, mode: str, max_asks: int = 50):
        super().__init__(metric=metric, mode=mode)
        self._inner, self._key, self._max_asks = inner, key, max_asks
        self._seen: dict[Any, str] = {}
        self._inner_ids: dict[str, str] = {}
        self.repeats = 0

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        for attempt in range(self._max_asks):
            inner_id = f"{trial_id}-{attempt}"
            params = self._inner.suggest(inner_id)
            if params is None or params == Searcher.FINISHED:
                return params
            key = self._key(params)
            if key not in self._seen:
                self._seen[key] = trial_id
                self._inner_ids[trial_id] = inner_id
                return params
            self.repeats += 1
            logger.info("searcher suggested trial %s's config again; asking again",
                        self._seen[key])
            self._inner.on_trial_complete(inner_id, None, error=True)
        logger.warning("the searcher suggested only configs already tried %d times in a row: "
                       "ending the search", self._max_asks)
        return Searcher.FINISHED

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._inner_ids:
            self._inner.on_trial_result(self._inner_ids[trial_id], result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if trial_id in self._inner_ids:
            self._inner.on_trial_complete(self._inner_ids.pop(trial_id), result, error)
