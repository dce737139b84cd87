"""`SweepPageCallback`: the Tune callback that keeps the sweep's page current.

It feeds `composeae.sweep.page.state` from Tune's hooks and writes the three files of
`composeae.sweep.page.render` into the sweep directory (a local path or an `s3://` URL), at most
once every `min_interval_s` while results stream in and at once when a trial ends or the sweep
ends. Drawing (plots, about a second) happens on a thread of its own, off Tune's event loop; the
sweep's end waits for it, so the page ends with the final state.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
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
    once. The hooks only copy the rows (plain data); a background thread draws the latest copy,
    so Tune's loop never waits for matplotlib or S3. `flush()` waits for the drawing in hand.
    A failing write is logged, never raised: the page must not stop the search.
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
        self._start_drawer()

    def _start_drawer(self) -> None:
        self._lock = threading.Condition()
        self._pending: tuple | None = None
        self._drawing = False

    # -- wiring --------------------------------------------------------------------------

    def _sync_all(self, trials: Sequence[Any] | None) -> None:
        for trial in trials or ():
            self.state.sync(trial.trial_id, trial.status, trial.config, trial.last_result)

    def _write(self, trials: Sequence[Any] | None) -> None:
        """Copy the rows now; hand them to the drawing thread (the newest copy wins)."""
        self._sync_all(trials)
        # A deep copy: the hooks go on updating the state's dicts while the thread draws.
        job = (copy.deepcopy(self.state.rows()), self._ended,
               time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
        self._dirty = self._urgent = False
        self._last_write = time.monotonic()
        with self._lock:
            self._pending = job
            if not self._drawing:
                self._drawing = True
                threading.Thread(target=self._drain, name="sweep-page", daemon=True).start()

    def _drain(self) -> None:
        while True:
            with self._lock:
                job, self._pending = self._pending, None
                if job is None:
                    self._drawing = False
                    self._lock.notify_all()
                    return
            self._draw(*job)

    def flush(self) -> None:
        """Wait until the page shows the last state handed to the drawing thread."""
        with self._lock:
            self._lock.wait_for(lambda: not self._drawing)

    def _draw(self, rows: list[dict], ended: bool, updated: str) -> None:
        started = time.monotonic()
        try:
            storage.write_text(storage.join(self.sweep_url, layout.SUMMARY_CSV),
                               render_csv(rows, self.spec))
            storage.write_text(storage.join(self.sweep_url, layout.SUMMARY_MD),
                               render_md(rows, self.spec, ended=ended, updated=updated))
            storage.write_text(storage.join(self.sweep_url, layout.SUMMARY_HTML),
                               render_html(rows, self.spec, ended=ended, updated=updated,
                                           refresh_s=self.refresh_s))
            self.writes += 1
        except Exception:  # noqa: BLE001 - the page must never stop the search
            log.warning("could not write the sweep page to %s", self.sweep_url, exc_info=True)
        # A big sweep draws slowly: keep drawing to about a tenth of the time.
        self._gap = max(self.min_interval_s, 10 * (time.monotonic() - started))

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
        self.flush()

    def get_state(self) -> dict | None:
        return self.state.to_dict() if self.state.trials else None

    def set_state(self, state: dict) -> None:
        self.state.load_dict(state)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        # A clock reading means nothing in another process; a lock does not pickle.
        state["_last_write"] = -math.inf
        for name in ("_lock", "_pending", "_drawing"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._start_drawer()
