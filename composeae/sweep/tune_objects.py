"""The Ray Tune objects a sweep is run with: search space, scheduler, searcher, Tune config.

What belongs here: every use of `ray.tune` by the sweep spec, as the methods of `TuneObjects`
(mixed into `composeae.sweep.spec.Sweep`) and `dist_to_tune`. Ray is imported inside them, not at
the top: loading and checking a sweep file, and drawing its page, need no Ray.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from composeae.errors import UserError
from composeae.sweep.values import plain


def dist_to_tune(dist) -> Any:
    """The Ray Tune domain (or grid_search spec) of a `Dist` for `Tuner(param_space=...)`."""
    from ray import tune  # deferred: see the module docstring

    values = [plain(v) for v in dist.args]
    if dist.kind == "choice":
        return tune.choice(values)
    if dist.kind == "grid":
        return tune.grid_search(values)
    low, high = values
    if dist.kind == "uniform":
        return tune.uniform(low, high)
    if dist.kind == "loguniform":
        return tune.loguniform(low, high)
    return tune.randint(low, high + 1)  # Ray's upper bound is exclusive


def require_optuna() -> None:
    if importlib.util.find_spec("optuna") is None:
        raise UserError("searcher optuna needs the optuna package: "
                        "pip install 'composeae[optuna]'")


class TuneObjects:
    """The Tune side of a `Sweep` (its fields are the sweep's)."""

    def param_space(self) -> dict[str, Any]:
        """`Tuner(param_space=...)`: searched `section.key` -> Ray Tune domain."""
        return {key: dist.to_tune() for key, dist in self.search}

    def make_scheduler(self) -> Any:
        """ASHA on `training_iteration` (one per report), or None (Tune's FIFO) for `none`. It
        takes metric and mode from `tune_config()`: Tune refuses them in both places. A trial
        that passes the last rung is never stopped (`stop_last_trials=False`): stopping it at
        `max_t` would kill it before its final report and the work after it."""
        if self.scheduler == "none":
            return None
        from ray.tune.schedulers import ASHAScheduler  # deferred: see the module docstring

        return ASHAScheduler(time_attr="training_iteration", max_t=self.max_t,
                             grace_period=self.grace_period,
                             reduction_factor=self.reduction_factor, stop_last_trials=False)

    def make_searcher(self, max_concurrent: int | None = None) -> Any:
        """The seeded search algorithm, limited to `max_concurrent` running trials when given
        (Tune ignores TuneConfig's limit for a BasicVariantGenerator passed in, so the limit is
        applied here)."""
        if self.searcher == "optuna":
            require_optuna()
            from ray.tune.search import ConcurrencyLimiter
            from ray.tune.search.optuna import OptunaSearch

            searcher = OptunaSearch(seed=self.seed)
            return ConcurrencyLimiter(searcher, max_concurrent) if max_concurrent else searcher
        from ray.tune.search import BasicVariantGenerator  # deferred: as above

        return BasicVariantGenerator(random_state=self.seed, max_concurrent=max_concurrent or 0)

    def tune_config(self, max_concurrent: int | None = None) -> Any:
        """`ray.tune.TuneConfig` with metric, mode, num_samples, scheduler and searcher. The
        concurrency is `max_concurrent` if given, else the file's `max_concurrent_trials`, else
        unlimited (pass `concurrency(ray.cluster_resources())`)."""
        from ray import tune  # deferred: see the module docstring

        limit = max_concurrent or self.max_concurrent_trials
        return tune.TuneConfig(metric=self.metric, mode=self.mode, num_samples=self.num_samples,
                               scheduler=self.make_scheduler(),
                               search_alg=self.make_searcher(limit))

    def failure_config(self) -> Any:
        """`ray.tune.FailureConfig` for the Tuner's `ray.tune.RunConfig`."""
        from ray import tune  # deferred: see the module docstring

        return tune.FailureConfig(max_failures=self.max_failures)
