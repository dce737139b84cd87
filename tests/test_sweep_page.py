"""The sweep page: the row model and renderers (pure), the callback's wiring, and one small real
Tune run with ASHA that writes the page into a temporary sweep directory."""

from __future__ import annotations

import csv
import io
import os
import pickle
import time
import re
from types import SimpleNamespace

import pytest

from composeae.sweep.page.state import ERROR, PENDING, RUNNING, SweepSpec, SweepState, TERMINATED
from composeae.sweep.page.callback import SweepPageCallback
from composeae.sweep.page.render import (csv_columns, family_budgets, render_csv, render_html,
                                         render_md)

PARAMS = ("model.name", "optim.lr")


def _spec(**kw) -> SweepSpec:
    return SweepSpec(params=PARAMS, **kw)


def _feed(state: SweepState, tid: str, config: dict, values: list[float], step0: int = 10,
          final: dict | None = None) -> None:
    for i, v in enumerate(values):
        state.observe(tid, {"step": step0 * (i + 1), "val/R@1": v, "val/R@10": min(1.0, 2 * v),
                            "samples_seen": 64 * (i + 1), "training_iteration": i + 1}, config)
    if final is not None:
        state.observe(tid, {"step": step0 * len(values), "final": True, **final}, config)


def _sample_state(**spec_kw) -> SweepState:
    state = SweepState(_spec(**spec_kw))
    _feed(state, "t1", {"model.name": "composeae", "optim.lr": 1e-2, "loss.w_img_rec": 0.1},
          [0.2, 0.3, 0.35, 0.4], final={"test/R@1": 0.38})
    _feed(state, "t2", {"model.name": "tirg", "optim.lr": 1e-4}, [0.1, 0.12])
    _feed(state, "t3", {"model.name": "composeae", "optim.lr": 3e-3}, [0.25, 0.28])
    state.observe("t4", {}, {"model.name": "tirg", "optim.lr": 1e-5})
    state.set_status("t1", TERMINATED)
    state.set_status("t2", TERMINATED)
    state.set_status("t3", RUNNING)
    return state


def test_rows_best_trial_and_stopped_early():
    rows = _sample_state().rows()
    by_id = {r.trial_id: r for r in rows}
    assert [r.trial_id for r in rows] == ["t1", "t3", "t2", "t4"]  # best first, no result last
    t1 = by_id["t1"]
    assert t1.is_best and sum(r.is_best for r in rows) == 1
    assert t1.best == pytest.approx(0.4) and t1.best_step == 40
    assert t1.extras["val/R@10"] == pytest.approx(0.8)
    assert (t1.steps, t1.evaluations, t1.test, t1.samples_seen) == (40, 4, 0.38, 256)
    assert t1.finished and not t1.stopped_early
    assert t1.params == {"model.name": "composeae", "optim.lr": 1e-2}
    assert t1.family == "composeae"
    assert by_id["t2"].stopped_early and by_id["t2"].test is None  # TERMINATED, never final
    assert not by_id["t3"].stopped_early  # still running
    t4 = by_id["t4"]
    assert (t4.status, t4.best, t4.evaluations, t4.steps) == (PENDING, None, 0, None)


def test_budget_per_family_counts_trials_and_steps():
    state = _sample_state()
    budgets = family_budgets(state.rows(), state.spec)
    assert budgets[0][:5] == ["model family", "trials", "finished", "stopped early",
                              "steps trained"]
    # composeae: t1 (40 steps, finished) and t3 (20, running); tirg: t2 (20, stopped), t4.
    assert budgets[1:] == [["composeae", "2", "1", "0", "60", "40.00"],
                           ["tirg", "2", "0", "1", "20", "12.00"]]
    page = render_html(state.rows(), state.spec)
    assert "Budget per model family" in page and "<td>tirg</td><td class=n>2</td>" in page
    assert "| composeae | 2 | 1 | 0 | 60 | 40.00 |" in render_md(state.rows(), state.spec)


def test_a_key_of_one_family_is_blank_for_the_others():
    spec = SweepSpec(params=("model.name", "loss.w_sym"))
    state = SweepState(spec)
    _feed(state, "t1", {"model.name": "tirg"}, [0.3], final={"test/R@1": 0.25})
    _feed(state, "t2", {"model.name": "composeae", "loss.w_sym": 0.01}, [0.2])
    rows = state.rows()
    assert rows[0].params == {"model.name": "tirg", "loss.w_sym": None}
    page = render_html(rows, spec, ended=True)
    assert "(model.name=tirg)" in page  # the best trial's sentence names only its keys
    assert "tirg,,0.3" in render_csv(rows, spec)  # a blank cell, not a made-up value


def test_planned_steps_decide_finished_without_final():
    state = SweepState(_spec(planned_steps=20))
    _feed(state, "a", {"model.name": "m", "optim.lr": 0.1}, [0.3, 0.4])  # reaches step 20
    _feed(state, "b", {"model.name": "m", "optim.lr": 0.2}, [0.3])       # stops at step 10
    state.set_status("a", TERMINATED)
    state.set_status("b", TERMINATED)
    by_id = {r.trial_id: r for r in state.rows()}
    assert by_id["a"].finished and not by_id["a"].stopped_early
    assert by_id["b"].stopped_early


def test_mode_min_and_refeeding_is_idempotent():
    state = SweepState(SweepSpec(params=("optim.lr",), metric="val/loss", mode="min",
                                 extra_metrics=()))
    for tid, losses in (("a", [1.0, 0.5]), ("b", [0.9, 0.7])):
        for i, v in enumerate(losses):
            result = {"step": i + 1, "val/loss": v}
            state.observe(tid, result, {"optim": {"lr": 0.1}})  # nested config works too
            state.observe(tid, result)  # a result seen again (last_result) counts once
    rows = state.rows()
    assert rows[0].trial_id == "a" and rows[0].best == 0.5 and rows[0].evaluations == 2
    assert rows[0].params == {"optim.lr": 0.1}
    assert state.spec.test_metric == "test/loss"


def test_resumed_trial_rereports_steps_without_double_counting():
    state = SweepState(_spec())
    _feed(state, "a", {"model.name": "m", "optim.lr": 0.1}, [0.1, 0.2, 0.3])
    # The trial restarts from its step-20 checkpoint and reports step 30 again, then 40.
    state.observe("a", {"step": 30, "val/R@1": 0.31})
    state.observe("a", {"step": 40, "val/R@1": 0.35})
    row = state.rows()[0]
    assert row.evaluations == 4 and row.steps == 40 and row.best == pytest.approx(0.35)
    assert [s for s, _ in row.curve] == [10, 20, 30, 40]


def test_csv_parses_with_expected_columns():
    state = _sample_state()
    text = render_csv(state.rows(), state.spec)
    records = list(csv.DictReader(io.StringIO(text)))
    assert list(records[0]) == csv_columns(state.spec)
    assert list(records[0]) == [
        "trial_id", "status", "model.name", "optim.lr", "best val/R@1", "best_step",
        "best val/R@10", "steps", "evaluations", "stopped_early", "test/R@1", "samples_seen",
        "is_best"]
    by_id = {r["trial_id"]: r for r in records}
    assert set(by_id) == {"t1", "t2", "t3", "t4"}
    assert float(by_id["t1"]["best val/R@1"]) == pytest.approx(0.4)
    assert by_id["t1"]["is_best"] == "True" and by_id["t2"]["stopped_early"] == "True"
    assert float(by_id["t2"]["optim.lr"]) == 1e-4
    assert by_id["t4"]["best val/R@1"] == "" and by_id["t4"]["status"] == PENDING


def test_markdown_names_best_trial_above_table():
    state = _sample_state()
    md = render_md(state.rows(), state.spec, ended=True, updated="2026-01-01 00:00:00 UTC")
    best_at = md.index("**Best trial:** t1")
    table_at = md.index("| trial | status | model.name | optim.lr |")
    assert best_at < table_at
    assert "40.00%" in md and "| **t1** |" in md
    assert len([line for line in md.splitlines() if re.match(r"\| (\*\*)?t\d", line)]) == 4


def test_html_figures_refresh_and_highlight():
    state = _sample_state()
    rows = state.rows()
    running = render_html(rows, state.spec, ended=False, refresh_s=15)
    assert len(re.findall(r'<img alt="[^"]+" src="data:image/png;base64,[A-Za-z0-9+/=]+">',
                          running)) == 3
    for alt in ("validation curves", "metric against parameters", "best per model family"):
        assert f'alt="{alt}"' in running
    assert '<meta http-equiv="refresh" content="15">' in running
    assert running.count("<tr class=best>") == 1 and "<td>t1</td>" in running
    assert running.index("Best trial") < running.index("<table>")
    ended = render_html(rows, state.spec, ended=True)
    assert "http-equiv" not in ended and "The sweep has ended." in ended


def test_html_renders_before_any_result_and_escapes():
    spec = SweepSpec(params=(), title="<sweep & co>")
    state = SweepState(spec)
    state.observe("a<b>", None, {"model.name": "x"})
    page = render_html(state.rows(), spec)
    assert page.count("<img ") == 3 and "&lt;sweep &amp; co&gt;" in page
    assert "a&lt;b&gt;" in page and "No trial has reported" in page


def _trial(tid, status, config, last_result=None):
    return SimpleNamespace(trial_id=tid, status=status, config=config,
                           last_result=last_result or {})


def _read(tmp_path, name):
    return (tmp_path / name).read_text()


def test_callback_wiring_throttles_and_survives_pickling(tmp_path):
    cb = SweepPageCallback(str(tmp_path), SweepSpec(PARAMS), min_interval_s=3600)
    cb.setup(num_samples=2)
    a = _trial("a", PENDING, {"model.name": "composeae", "optim.lr": 0.01})
    b = _trial("b", PENDING, {"model.name": "tirg", "optim.lr": 0.001})
    trials = [a, b]
    cb.on_step_begin(iteration=0, trials=trials)
    cb.flush()  # the page is drawn on a thread of its own
    assert cb.writes == 1 and {"summary.csv", "summary.md", "summary.html"} <= set(
        os.listdir(tmp_path))
    a.status = b.status = RUNNING
    for step in (10, 20):
        for t, v in ((a, 0.3), (b, 0.1)):
            result = {"step": step, "val/R@1": v + step / 1000, "training_iteration": step // 10}
            cb.on_trial_result(iteration=1, trials=trials, trial=t, result=result)
            t.last_result = result
        cb.on_step_end(iteration=1, trials=trials)
    cb.flush()
    assert cb.writes == 1  # throttled while results stream in
    cb.on_trial_complete(iteration=2, trials=trials, trial=b)  # Tune still says RUNNING here
    b.status = TERMINATED  # what Tune does right after the hook
    cb.on_step_end(iteration=2, trials=trials)  # a trial ended: written at its step's end
    cb.flush()
    assert cb.writes == 2
    rows = {r["trial_id"]: r for r in csv.DictReader(io.StringIO(_read(tmp_path, "summary.csv")))}
    assert rows["b"]["status"] == TERMINATED and rows["b"]["stopped_early"] == "True"
    assert rows["a"]["status"] == RUNNING and rows["a"]["is_best"] == "True"
    assert "http-equiv" in _read(tmp_path, "summary.html")

    clone = pickle.loads(pickle.dumps(cb))  # Tune pickles callbacks with the run config
    assert clone.state.rows() == cb.state.rows()

    a.status = ERROR
    cb.on_trial_error(iteration=3, trials=trials, trial=a)
    cb.on_step_end(iteration=3, trials=trials)
    cb.flush()
    assert cb.writes == 3
    cb.on_experiment_end(trials=trials)
    assert cb.writes == 4
    assert "http-equiv" not in _read(tmp_path, "summary.html")
    rows = {r["trial_id"]: r for r in csv.DictReader(io.StringIO(_read(tmp_path, "summary.csv")))}
    assert rows["a"]["status"] == ERROR and rows["a"]["stopped_early"] == "False"


def test_callback_rebuilds_after_restore(tmp_path):
    """A restored sweep: saved state comes back through set_state, and every trial Tune lists
    (finished ones too) appears from its last_result at the first step, even without state."""
    done = _trial("done", TERMINATED, {"model.name": "composeae", "optim.lr": 0.01},
                  {"step": 40, "val/R@1": 0.4, "final": True, "test/R@1": 0.37})
    cut = _trial("cut", TERMINATED, {"model.name": "tirg", "optim.lr": 1e-4},
                 {"step": 10, "val/R@1": 0.1})
    waiting = _trial("waiting", PENDING, {"model.name": "tirg", "optim.lr": 1e-3})

    first = SweepPageCallback(str(tmp_path), SweepSpec(PARAMS))
    first.on_trial_result(iteration=1, trials=[], trial=done,
                          result={"step": 20, "val/R@1": 0.3})
    saved = pickle.loads(pickle.dumps(first.get_state()))

    for state in (saved, None):
        cb = pickle.loads(pickle.dumps(SweepPageCallback(str(tmp_path), SweepSpec(PARAMS))))
        if state is not None:
            cb.set_state(state)
        cb.setup()
        cb.on_step_begin(iteration=0, trials=[done, cut, waiting])
        cb.flush()
        rows = {r["trial_id"]: r
                for r in csv.DictReader(io.StringIO(_read(tmp_path, "summary.csv")))}
        assert set(rows) == {"done", "cut", "waiting"}
        assert rows["done"]["is_best"] == "True" and rows["done"]["stopped_early"] == "False"
        assert float(rows["done"]["test/R@1"]) == pytest.approx(0.37)
        assert rows["done"]["evaluations"] == ("2" if state is not None else "1")
        assert rows["cut"]["stopped_early"] == "True"
        assert rows["waiting"]["status"] == PENDING


def test_drawing_leaves_the_hooks_at_once_and_the_end_waits_for_it(tmp_path, monkeypatch):
    """A slow page (a big sweep, a slow bucket) costs Tune's loop nothing while results stream
    in; the sweep's end returns only once the page shows the final state."""
    import composeae.sweep.page.callback as callback

    slow = callback.render_html
    monkeypatch.setattr(callback, "render_html",
                        lambda *a, **k: (time.sleep(1.0), slow(*a, **k))[1])
    cb = SweepPageCallback(str(tmp_path), SweepSpec(PARAMS), min_interval_s=0)
    trial = _trial("a", RUNNING, {"model.name": "composeae", "optim.lr": 0.01})
    started = time.monotonic()
    cb.on_step_begin(iteration=0, trials=[trial])
    assert time.monotonic() - started < 0.5 and cb.writes == 0  # still drawing
    trial.status = TERMINATED
    cb.on_trial_complete(iteration=1, trials=[trial], trial=trial)
    cb.on_experiment_end(trials=[trial])
    assert cb.writes >= 1  # the newest state is drawn; an older one in hand may be skipped
    assert "http-equiv" not in _read(tmp_path, "summary.html")  # the final page stops refreshing
    rows = list(csv.DictReader(io.StringIO(_read(tmp_path, "summary.csv"))))
    assert [r["status"] for r in rows] == [TERMINATED]


def test_write_failure_does_not_raise(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cb = SweepPageCallback(str(blocker / "sweep"), SweepSpec(PARAMS))
    cb.on_experiment_end(trials=[_trial("a", TERMINATED, {"optim.lr": 0.1})])
    assert cb.writes == 0 and "could not write the sweep page" in caplog.text


# ---------------------------------------------------------------------------------------------
# One small real Tune run


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_tune_sweep_writes_the_page(ray_local, tmp_path):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    # Defined here so that it is pickled by value: Ray workers cannot import test modules.
    def _fake_trial(config):
        import time

        from ray import tune

        good = config["optim.lr"] >= 1e-2
        value = 0.1
        for i in range(1, 9):
            # Both good trials report the same curve, so ASHA compares good with bad only.
            value = (0.4 if good else 0.1) + 0.01 * i
            tune.report({"step": 10 * i, "val/R@1": value, "val/R@10": min(1.0, 2 * value),
                         "samples_seen": 32 * i})
            time.sleep(0.05)
        tune.report({"step": 80, "val/R@1": value, "final": True, "test/R@1": value - 0.02})

    sweep_url = str(tmp_path / "sweep")
    page = SweepPageCallback(sweep_url, SweepSpec(PARAMS, title="test sweep"), min_interval_s=1.0)
    tuner = tune.Tuner(
        tune.with_resources(_fake_trial, {"cpu": 0.25}),
        # Grid order: the two good trials run first (2 at a time), so the bad ones meet a rung
        # that already holds good values and ASHA stops them.
        param_space={"optim.lr": tune.grid_search([3e-2, 1e-2, 1e-4, 1e-5]),
                     "model.name": tune.sample_from(
                         lambda config: "composeae" if config["optim.lr"] > 2e-2 else "tirg")},
        tune_config=tune.TuneConfig(
            metric="val/R@1", mode="max", max_concurrent_trials=2,
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=9, grace_period=2,
                                    reduction_factor=2)),
        run_config=tune.RunConfig(name="page", storage_path=str(tmp_path / "ray"),
                                  callbacks=[page], verbose=0),
    )
    results = tuner.fit()
    assert not results.errors

    records = list(csv.DictReader(io.StringIO((tmp_path / "sweep" / "summary.csv").read_text())))
    assert len(records) == 4 and {r["status"] for r in records} == {TERMINATED}
    early = [r for r in records if r["stopped_early"] == "True"]
    assert early and all(float(r["optim.lr"]) < 1e-2 for r in early)
    best = next(r for r in records if r["is_best"] == "True")
    assert float(best["optim.lr"]) >= 1e-2 and float(best["test/R@1"]) == pytest.approx(0.46)
    assert {r["model.name"] for r in records} == {"composeae", "tirg"}
    html_page = (tmp_path / "sweep" / "summary.html").read_text()
    assert html_page.count("<img ") == 3 and "http-equiv" not in html_page
    for r in records:
        assert r["trial_id"] in html_page
    assert "**Best trial:** " + best["trial_id"] in (tmp_path / "sweep" / "summary.md").read_text()

    # Restoring the finished sweep (the callback comes back pickled with the run config, its
    # state from the experiment save) writes the page again with every trial listed.
    for name in ("summary.csv", "summary.md", "summary.html"):
        os.remove(tmp_path / "sweep" / name)
    restored = tune.Tuner.restore(str(tmp_path / "ray" / "page"),
                                  tune.with_resources(_fake_trial, {"cpu": 0.25}))
    restored.fit()
    again = list(csv.DictReader(io.StringIO((tmp_path / "sweep" / "summary.csv").read_text())))
    assert sorted(r["trial_id"] for r in again) == sorted(r["trial_id"] for r in records)
    assert {r["status"] for r in again} == {TERMINATED}
    assert sum(r["stopped_early"] == "True" for r in again) == len(early)
