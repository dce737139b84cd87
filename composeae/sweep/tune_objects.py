"""The Ray Tune objects a sweep is run with: scheduler, searcher (which holds the search
space), Tune config.

What belongs here: every use of `ray.tune` by the sweep spec, as the methods of `TuneObjects`
(mixed into `composeae.sweep.spec.Sweep`), and `OptunaSpace`. Ray is imported inside them, not at
the top: loading and checking a sweep file, and drawing its page, need no Ray.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from composeae.errors import UserError
from composeae.sweep.plan import plan_trials


def require_optuna() -> None:
    if importlib.util.find_spec("optuna") is None:
        raise UserError("searcher optuna needs the optuna package: "
                        ".venv/bin/pip install -c constraints.txt -e '.[optuna]'")


class TuneObjects:
    """The Tune side of a `Sweep` (its fields are the sweep's)."""

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
        """The seeded search algorithm, limited to `max_concurrent` running trials when given:
        `random` runs the sweep's `plan_trials` (`PlannedSearch`); `optuna` is Optuna's TPE over
        `OptunaSpace` (define-by-run: only the keys of the suggested family), never repeating a
        trial (`DistinctSearch`)."""
        from ray.tune.search import ConcurrencyLimiter  # deferred: see the module docstring

        from composeae.sweep.searchers import DistinctSearch, PlannedSearch

        if self.searcher == "optuna":
            require_optuna()
            from ray.tune.search.optuna import OptunaSearch

            optuna = OptunaSearch(space=OptunaSpace(self), metric=self.metric, mode=self.mode,
                                  seed=self.seed)
            searcher = DistinctSearch(optuna, self.trial_key, self.metric, self.mode)
        else:
            searcher = PlannedSearch(plan_trials(self).trials, self.metric, self.mode)
        return ConcurrencyLimiter(searcher, max_concurrent) if max_concurrent else searcher

    def tune_config(self, max_concurrent: int | None = None) -> Any:
        """`ray.tune.TuneConfig` with metric, mode, num_samples, scheduler and searcher. The
        concurrency is `max_concurrent` if given, else the file's `max_concurrent_trials`, else
        unlimited (pass `concurrency(ray.cluster_resources())`)."""
        from ray import tune  # deferred: see the module docstring

        limit = max_concurrent or self.max_concurrent_trials
        # The searcher holds the space and ends the search; num_samples only bounds it.
        return tune.TuneConfig(metric=self.metric, mode=self.mode, num_samples=self.num_trials,
                               scheduler=self.make_scheduler(),
                               search_alg=self.make_searcher(limit))

    def failure_config(self) -> Any:
        """`ray.tune.FailureConfig` for the Tuner's `ray.tune.RunConfig`."""
        from ray import tune  # deferred: see the module docstring

        return tune.FailureConfig(max_failures=self.max_failures)


class OptunaSpace:
    """Optuna's define-by-run search space of a sweep: the family first, then only the keys
    that apply to it, so a TIRG trial never samples ComposeAE's loss weights. A plain object (not
    a closure) so that the searcher pickles with the experiment."""

    def __init__(self, sweep):
        self.sweep = sweep

    def __call__(self, trial) -> None:
        sweep = self.sweep
        family = sweep.base_family
        if "model.name" in sweep.space:
            family = trial.suggest_categorical("model.name", list(sweep.space["model.name"].args))
        for key in sweep.keys_for(family):
            dist = sweep.space[key]
            if key == "model.name":
                continue
            if dist.kind == "choice":
                trial.suggest_categorical(key, list(dist.args))
            elif dist.kind == "randint":
                trial.suggest_int(key, *dist.args)
            else:
                trial.suggest_float(key, *dist.args, log=dist.kind == "loguniform")
