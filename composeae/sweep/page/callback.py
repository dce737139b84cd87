"""`SweepPageCallback`: the Tune callback that keeps the sweep's page current.

It feeds `composeae.sweep.page.state` from Tune's hooks and writes the three files of
`composeae.sweep.page.render` into the sweep directory (a local path or an `s3://` URL), at most
once every `min_interval_s` while results stream in and at once when a trial ends or the sweep
ends.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Sequence

from ray.tune import Callback

from composeae import storage
from composeae.run import layout
from composeae.sweep.page.render import render_csv, render_html, render_md
from composeae.sweep.page.state import ERROR, RUNNING, TERMINATED, SweepSpec, SweepState

log = logging.getLogger(__name__)


class SweepPageCallback(Callback):
    """Keeps `summary.csv`, `summary.md` and `summary.html` in `sweep_url` current.

    Put it in `ray.tune.RunConfig(callbacks=[...])`. It runs on the Tune driver; its state is
    plain data, so Tune can pickle it with the run config and save it with the experiment
    (`get_state`/`set_state`). After `Tuner.restore` the state comes back from that save, and
    every trial Tune knows (finished ones included) is re-read from `trial.status`,
    `trial.config` and `trial.last_result` at the first step, so the page lists them all.

    While results stream in, the files are rewritten at most once every `min_interval_s` (longer
    when drawing a big sweep takes more than a tenth of that); trials ending (completed, stopped
    or errored) are written at the end of the Tune step they ended in, and the sweep's end at
    once. A failing write is logged, never raised: the page must not stop the search.
    """

    def __init__(self, sweep_url: str, spec: SweepSpec, *, min_interval_s: float = 10.0,
                 refresh_s: int = 15):
        self.sweep_url = sweep_url
        self.spec = spec
        self.min_interval_s = float(min_interval_s)
        self.refresh_s = int(refresh_s)
        self.state = SweepState(self.spec)
        self.writes = 0
        self._last_write = -math.inf
        self._gap = self.min_interval_s
        self._dirty = False
        self._urgent = False
        self._ended = False
        self._synced = False

    # -- wiring --------------------------------------------------------------------------

    def _sync_all(self, trials: Sequence[Any] | None) -> None:
        for trial in trials or ():
            self.state.sync(trial.trial_id, trial.status, trial.config, trial.last_result)

    def _write(self, trials: Sequence[Any] | None) -> None:
        started = time.monotonic()
        self._sync_all(trials)
        rows = self.state.rows()
        updated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        try:
            storage.write_text(storage.join(self.sweep_url, layout.SUMMARY_CSV),
                               render_csv(rows, self.spec))
            storage.write_text(storage.join(self.sweep_url, layout.SUMMARY_MD),
                               render_md(rows, self.spec, ended=self._ended, updated=updated))
            storage.write_text(storage.join(self.sweep_url, layout.SUMMARY_HTML),
                               render_html(rows, self.spec, ended=self._ended, updated=updated,
                                           refresh_s=self.refresh_s))
            self.writes += 1
        except Exception:  # noqa: BLE001 - the page must never stop the search
            log.warning("could not write the sweep page to %s", self.sweep_url, exc_info=True)
        self._dirty = self._urgent = False
        self._last_write = time.monotonic()
        # A big sweep draws slowly: keep drawing under about a tenth of the driver's time.
        self._gap = max(self.min_interval_s, 10 * (self._last_write - started))

    def _due(self) -> bool:
        return self._dirty and (
            self._urgent or time.monotonic() - self._last_write >= self._gap)

    # -- Tune hooks ----------------------------------------------------------------------

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
        self._ended = False
        self._synced = False
        self._last_write = -math.inf

    def on_step_begin(self, iteration: int, trials: list, **info):
        if not self._synced:
            # First step of a run, or of a restored one: list every trial Tune holds.
            self._synced = True
            self._write(trials)

    def on_step_end(self, iteration: int, trials: list, **info):
        # Trials that ended during this step are written here, all in one go.
        if self._due():
            self._write(trials)

    def on_trial_start(self, iteration: int, trials: list, trial, **info):
        self.state.sync(trial.trial_id, RUNNING, trial.config, trial.last_result)
        self._dirty = True

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info):
        self.state.observe(trial.trial_id, result, trial.config)
        self.state.set_status(trial.trial_id, RUNNING)
        self._dirty = True

    def on_trial_complete(self, iteration: int, trials: list, trial, **info):
        # Tune calls this before it marks the trial TERMINATED (right after it returns).
        self.state.sync(trial.trial_id, TERMINATED, trial.config, trial.last_result)
        self._dirty = self._urgent = True

    def on_trial_error(self, iteration: int, trials: list, trial, **info):
        self.state.sync(trial.trial_id, ERROR, trial.config, trial.last_result)
        self._dirty = self._urgent = True

    def on_trial_recover(self, iteration: int, trials: list, trial, **info):
        self._dirty = True

    def on_experiment_end(self, trials: list, **info):
        self._ended = True
        self._write(trials)

    def get_state(self) -> dict | None:
        return self.state.to_dict() if self.state.trials else None

    def set_state(self, state: dict) -> None:
        self.state.load_dict(state)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        # A clock reading means nothing in another process.
        state["_last_write"] = -math.inf
        return state
