"""Sweep files: parsing, validation before Ray starts, Tune objects, and the best trial's YAML."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from composeae.config import Config, load_config
from composeae.errors import UserError
from composeae.sweep.spec import Dist
from composeae.sweep.best import best_config_yaml
from composeae.sweep.load import load_sweep
from support.sweeps import preview

ROOT = Path(__file__).parents[1]
SWEEPS = ROOT / "jobs" / "configs" / "sweeps"
TINY_SWEEP = SWEEPS / "tiny.yaml"
TINY = ROOT / "jobs" / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def tiny():
    return load_sweep(TINY_SWEEP)


def write_sweep(tmp_path, body: str, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(f"base: {TINY}\n" + body)
    return path


def test_tiny_sweep_loads_and_its_trials_validate(tiny):
    assert tiny.name == "tiny-sweep" and tiny.base_path == TINY.resolve()
    assert list(tiny.space) == ["model.name", "loss.w_img_rec", "loss.w_sym", "model.a_init"]
    assert tiny.num_trials == 4 and tiny.num_samples == 2
    assert (tiny.metric, tiny.mode, tiny.scheduler, tiny.searcher) == ("val/R@1", "max", "asha",
                                                                      "random")
    # 24 steps, an evaluation every 6: 4 evaluations, and ASHA's last rung at most at the 3rd.
    assert tiny.evaluations == 4 and tiny.max_t == 3 and tiny.grace_period == 1
    assert tiny.trial_cpus == 0.1 and tiny.storage == "runs"
    assert tiny.experiment_url == "runs/tiny-sweep"

    trials = preview(tiny)
    assert len(trials) == tiny.num_trials
    assert sorted(t["model.name"] for t in trials) == ["composeae", "composeae", "tirg", "tirg"]
    for params in trials:
        cfg = tiny.trial_config(params, name=tiny.trial_run_name("abc_00001"))
        assert isinstance(cfg, Config)
        assert cfg.model.name == params["model.name"]
        assert cfg.model.a_init == params["model.a_init"]
        # ComposeAE's loss weights reach ComposeAE's trials only: TIRG has no such terms.
        if params["model.name"] == "composeae":
            assert cfg.loss.w_sym == params["loss.w_sym"]
        else:
            assert set(params) == {"model.name", "model.a_init"}
            assert cfg.loss.w_sym == tiny.base_config().loss.w_sym
        assert cfg.train.steps == 24 and cfg.train.eval_every == 6  # `set`
        assert cfg.model.embed_dim == 32  # untouched base value
        assert cfg.train.name == "tiny-sweep-abc_00001" and cfg.train.storage == "runs"
    assert "4 trial(s)" in tiny.describe()


def test_trial_config_wants_exactly_the_searched_keys(tiny):
    params = preview(tiny)[0]
    with pytest.raises(ValueError, match="missing"):
        tiny.trial_config({k: v for k, v in params.items() if k != "loss.w_sym"})
    with pytest.raises(ValueError, match="unknown"):
        tiny.trial_config(params | {"optim.lr": 0.1})
    # A combination that only fails together is refused when the trial builds its config.
    with pytest.raises(UserError, match="loss.w_sym"):
        tiny.trial_config(params | {"loss.w_sym": -1.0})


def test_shipped_css_synth_sweep(tmp_path):
    sweep = load_sweep(SWEEPS / "css-synth.yaml")
    assert sweep.base_path.name == "demo.yaml"
    assert sweep.space["model.name"] == Dist("grid", ("composeae", "tirg", "concat",
                                                     "realspace_concat_ae"))
    assert sweep.num_trials == 4 * sweep.num_samples
    trials = preview(sweep)
    for family in sweep.space["model.name"].args:  # equal budget per family
        assert sum(t["model.name"] == family for t in trials) == sweep.num_samples
    for params in trials:
        sweep.trial_config(params)


ERRORS = [
    # (sweep body after `base:`, --set overrides, text the one-line message must contain)
    ("serach: {}\n", [], "serach"),
    ("search:\n  model.nmae: {choice: [1]}\n", [], "search.model.nmae"),
    ("search:\n  modle.name: {choice: [tirg]}\n", [], "search.modle.name"),
    ("search:\n  lr: {choice: [0.1]}\n", [], "search.lr"),
    ("set:\n  loss.w_sym: 0.1\nsearch:\n  loss.w_sym: {uniform: [0, 1]}\n", [],
     "search.loss.w_sym"),
    ("set: [loss.w_sym=0.1]\nsearch:\n  loss.w_sym: {uniform: [0, 1]}\n", [], "search.loss.w_sym"),
    ("search:\n  model.embed_dim: {choice: []}\n", [], "search.model.embed_dim"),
    ("search:\n  optim.lr: {loguniform: [1e-2, 1e-4]}\n", [], "search.optim.lr"),
    ("search:\n  optim.lr: {uniform: [0.1, 0.1]}\n", [], "search.optim.lr"),
    ("search:\n  optim.lr: {loguniform: [0, 1]}\n", [], "search.optim.lr"),
    ("search:\n  model.dropout: {uniform: [a, 0.5]}\n", [], "search.model.dropout"),
    ("search:\n  model.dropout: {uniform: [0.1]}\n", [], "search.model.dropout"),
    ("search:\n  model.dropout: {uniform: [0, 1]}\n", [], "search.model.dropout"),  # dropout < 1
    ("search:\n  loss.w_sym: {normal: [0, 1]}\n", [], "search.loss.w_sym"),
    ("search:\n  loss.w_sym: 0.1\n", [], "search.loss.w_sym"),
    ("search:\n  loss.w_sym: {choice: 0.1}\n", [], "search.loss.w_sym"),
    ("search:\n  model.name: {choice: [composeae, resnet_magic]}\n", [], "search.model.name"),
    ("search:\n  model.embed_dim: {choice: [64, -4]}\n", [], "search.model.embed_dim"),
    ("search:\n  model.embed_dim: {uniform: [64, 128]}\n", [], "search.model.embed_dim"),
    ("search:\n  train.steps: {randint: [2, 8.5]}\n", [], "search.train.steps"),
    ("search:\n  data.text_mode: {choice: [modifier, caption]}\n", [], "search.data.text_mode"),
    ("search:\n  ray.num_workers: {choice: [1, 2]}\n", [], "search.ray.num_workers"),
    ("search:\n  train.name: {choice: [a, b]}\n", [], "search.train.name"),
    ("set:\n  train.steps: -1\n", [], "set.train.steps"),
    ("set:\n  model.nmae: 1\n", [], "set.model.nmae"),
    ("set:\n  model.name: resnet_magic\n", [], "set.model.name"),
    ("set: [train.steps]\n", [], "train.steps"),
    ("num_samples: 0\n", [], "num_samples"),
    ("num_samples: 2.5\n", [], "num_samples"),
    ("metric: test/R@1\n", [], "metric"),
    ("metric: R@1\n", [], "metric"),
    ("metric: val/R@50\n", [], "metric"),  # tiny.yaml's eval.ks has no 50
    ("mode: maximum\n", [], "mode"),
    ("scheduler: hyperband\n", [], "scheduler"),
    ("scheduler: {name: asha, max_t: 5}\n", [], "scheduler.max_t"),  # past the evaluations
    ("scheduler: {name: asha, max_t: 2}\n", [], "scheduler.max_t"),  # on the last one
    ("set:\n  train.eval_every: 24\n", [], "train.eval_every"),  # one evaluation: no rung
    ("scheduler: {name: asha, max_t: 1, grace_period: 2}\n", [], "scheduler.grace_period"),
    ("search:\n  train.steps: {choice: [6, 12]}\n", [], "search.train.steps"),  # ASHA
    ("scheduler: {name: asha, grace_period: 0}\n", [], "scheduler.grace_period"),
    ("scheduler: {name: asha, grace_period: 9}\n", [], "scheduler.grace_period"),
    ("scheduler: {name: asha, reduction_factor: 1}\n", [], "scheduler.reduction_factor"),
    ("scheduler: {name: asha, grace: 1}\n", [], "scheduler.grace"),
    ("searcher: bayes\n", [], "searcher"),
    ("seed: x\n", [], "seed"),
    ("max_concurrent_trials: 0\n", [], "max_concurrent_trials"),
    ("trial_cpus: 0\n", [], "trial_cpus"),
    ("max_failures: -1\n", [], "max_failures"),
    ("storage: ''\n", [], "storage"),
    ("name: a/b\n", [], "name"),
    ("", ["num_samples=0"], "num_samples"),
    ("", ["nmu_samples=3"], "nmu_samples"),
    ("", ["metric=test/R@1"], "metric"),
    ("", ["scheduler.max_t=9"], "scheduler.max_t"),
    ("", ["search.model.name={choice: [nope]}"], "search.model.name"),
    ("", ["model.embed_dim=-1"], "set.model.embed_dim"),
    ("", ["num_samples"], "num_samples"),
]


@pytest.mark.parametrize("body, overrides, needle", ERRORS)
def test_errors_are_one_line_naming_the_key(tmp_path, body, overrides, needle):
    with pytest.raises(UserError) as err:
        load_sweep(write_sweep(tmp_path, body), overrides)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_searching_the_budget_without_asha(tmp_path):
    body = ("scheduler: none\nsearch:\n  train.steps: {choice: [6, 12]}\n"
            "  train.eval_every: {randint: [2, 3]}\n")
    sweep = load_sweep(write_sweep(tmp_path, body))
    assert sweep.evaluations == 6  # the most any trial makes: 12 steps, every 2
    assert sweep.page_spec().planned_steps is None
    assert load_sweep(write_sweep(tmp_path, "scheduler: {name: asha, max_t: 1}\n")).max_t == 1


def test_file_and_base_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_sweep(tmp_path / "nope.yaml")
    missing_base = tmp_path / "m.yaml"
    missing_base.write_text("num_samples: 2\n")
    with pytest.raises(UserError, match="base"):
        load_sweep(missing_base)
    bad_base = tmp_path / "b.yaml"
    bad_base.write_text("base: nowhere.yaml\n")
    with pytest.raises(UserError, match="^base: .*nowhere.yaml"):
        load_sweep(bad_base)
    with pytest.raises(UserError, match="not valid YAML"):
        load_sweep(write_sweep(tmp_path, "search: {a: [\n"))
    with pytest.raises(UserError, match="test split"):
        load_sweep(write_sweep(tmp_path, "metric: test/R@1\n"))


def test_base_is_relative_to_the_sweep_file(tmp_path):
    (tmp_path / "configs" / "sweeps").mkdir(parents=True)
    (tmp_path / "configs" / "exp.yaml").write_text(TINY.read_text())
    path = tmp_path / "configs" / "sweeps" / "mine.yaml"
    path.write_text("base: ../exp.yaml\n")
    sweep = load_sweep(path)
    assert sweep.base_path == tmp_path / "configs" / "exp.yaml"
    assert sweep.name == "mine" and sweep.num_trials == 1 and sweep.space == {}
    assert sweep.trial_config({}) == load_config(TINY)


def test_optuna_needs_its_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # as if it were not installed
    with pytest.raises(UserError) as err:
        load_sweep(write_sweep(tmp_path, "searcher: optuna\n"))
    assert "-e '.[optuna]'" in str(err.value) and "\n" not in str(err.value)


def test_optuna_searcher(tmp_path):
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from composeae.sweep.searchers import DistinctSearch

    body = "searcher: optuna\nseed: 3\nsearch:\n  model.name: {choice: [composeae, tirg]}\n"
    sweep = load_sweep(write_sweep(tmp_path, body))
    searcher = sweep.make_searcher()
    assert isinstance(searcher, DistinctSearch) and isinstance(searcher._inner, OptunaSearch)
    assert isinstance(sweep.make_searcher(max_concurrent=2), ConcurrencyLimiter)
    with pytest.raises(UserError, match="search.model.name"):  # Optuna samples: no grid
        load_sweep(write_sweep(tmp_path, body.replace("choice", "grid")))


def test_command_line_overrides(tiny):
    sweep = load_sweep(TINY_SWEEP, [
        "num_samples=3", "scheduler=none", "seed=7", "trial_cpus=0.25",
        "model.name=tirg",                              # pins a searched key
        "optim.lr=1e-3",                                # a fixed config override; 1e-3 a number
        "search.model.embed_dim={choice: [16, 32]}",    # adds a distribution
        "storage=s3://bucket/sweeps",
    ])
    assert "model.name" not in sweep.space and ("model.name", "tirg") in sweep.fixed
    assert sweep.space["model.embed_dim"] == Dist("choice", (16, 32))
    # TIRG alone: ComposeAE's loss weights leave the search, with a note.
    assert sweep.ignored == ("loss.w_img_rec", "loss.w_sym")
    assert "not searched: loss.w_img_rec, loss.w_sym" in sweep.describe()
    assert list(sweep.space) == ["model.a_init", "model.embed_dim"]
    assert sweep.num_trials == 3 and sweep.seed == 7 and sweep.trial_cpus == 0.25
    assert sweep.scheduler == "none" and sweep.make_scheduler() is None
    assert sweep.experiment_url == "s3://bucket/sweeps/tiny-sweep"
    params = {"model.a_init": 1.0, "model.embed_dim": 16}
    cfg = sweep.trial_config(params)
    assert (cfg.model.name, cfg.optim.lr, cfg.model.embed_dim) == ("tirg", 0.001, 16)
    assert cfg.train.storage == "s3://bucket/sweeps"  # trials' Train runs live with the sweep
    # A config-tree key reaches the base: the cluster profile moves the default storage to S3.
    cluster = load_sweep(TINY_SWEEP, ["ray.profile=cluster"])
    assert cluster.storage.startswith("s3://")
    assert cluster.base_config().ray.num_workers == 1  # `set` still wins over the profile


def test_best_config_yaml_round_trips(tiny, tmp_path):
    params = preview(tiny)[1]
    text = best_config_yaml(tiny, params, trial_id="f00d_00001", metrics={"val/R@1": 42.5})
    path = tmp_path / "best.yaml"
    path.write_text(text)
    assert load_config(path) == tiny.trial_config(params, name="tiny-sweep-best")
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert "tiny-sweep" in header[0] and "f00d_00001" in header[0]
    assert any("val/R@1 = 42.5" in line for line in header)
    assert [line.split("=")[0].strip("# ") for line in header if " = " in line
            and "val/" not in line] == list(params)
    assert "--set" not in text  # nothing to add: the file alone reproduces the trial

    # Named as the trial's own run, it is the trial's config exactly.
    own = best_config_yaml(tiny, params, name=tiny.trial_run_name("f00d_00001"))
    path.write_text(own)
    assert load_config(path) == tiny.trial_config(params, name="tiny-sweep-f00d_00001")


def test_best_config_yaml_under_a_profile_names_the_sets_it_needs(tmp_path):
    # The cluster profile would overwrite the trial's ray.num_workers=1 when the file is loaded:
    # the header gives the --set that keeps it.
    sweep = load_sweep(TINY_SWEEP, ["ray.profile=cluster"])
    params = preview(sweep)[0]
    text = best_config_yaml(sweep, params)
    path = tmp_path / "best.yaml"
    path.write_text(text)
    command = next(line for line in text.splitlines() if "composeae train" in line)
    sets = [part for part in command.split(" --set ")[1:]]
    assert "ray.num_workers=1" in sets
    assert load_config(path, sets) == sweep.trial_config(params, name="tiny-sweep-best")


def test_distributions_draw_within_their_bounds(tmp_path):
    body = ("search:\n"
            "  model.name: {grid: [composeae, tirg]}\n"
            "  model.embed_dim: {choice: [16, 32, 64]}\n"
            "  optim.lr: {loguniform: [1e-4, 1e-2]}\n"
            "  model.dropout: {uniform: [0, 0.5]}\n"
            "  train.batch_size: {randint: [4, 8]}\n")
    space = load_sweep(write_sweep(tmp_path, body)).space
    rng = np.random.default_rng(0)
    draws = {key: [dist.sample(rng) for _ in range(400)] for key, dist in space.items()}
    assert set(draws["model.name"]) == {"composeae", "tirg"}
    assert set(draws["model.embed_dim"]) == {16, 32, 64}
    assert all(type(v) is int for v in draws["model.embed_dim"] + draws["train.batch_size"])
    lr = np.log10(draws["optim.lr"])
    assert lr.min() >= -4 and lr.max() < -2 and abs(np.median(lr) + 3) < 0.2  # log-uniform
    assert 0 <= min(draws["model.dropout"]) and max(draws["model.dropout"]) < 0.5
    assert set(draws["train.batch_size"]) == {4, 5, 6, 7, 8}  # randint includes both ends


def test_seed_makes_sampling_reproducible(tiny):
    again = load_sweep(TINY_SWEEP)
    assert preview(tiny) == preview(again)
    other = preview(load_sweep(TINY_SWEEP, ["seed=1"]))
    assert ([t.get("loss.w_sym") for t in other]
            != [t.get("loss.w_sym") for t in preview(tiny)])


def test_a_grid_over_families_gives_each_its_share_of_distinct_trials(tmp_path):
    """Family-only keys never reach another family's trials; no two trials are the same
    effective config; a family whose space runs out of configs gets fewer trials, reported."""
    from composeae.sweep.plan import plan_trials

    body = ("num_samples: 3\nsearch:\n"
            "  model.name: {grid: [composeae, tirg, image_only]}\n"
            "  loss.w_sym: {loguniform: [0.001, 0.1]}\n"
            "  model.dropout: {uniform: [0.0, 0.5]}\n"
            "  model.a_init: {choice: [1.0, 10.0]}\n"
            "  model.text_dim: {choice: [16, 24]}\n")
    sweep = load_sweep(write_sweep(tmp_path, body))
    plan = plan_trials(sweep)
    keys = {family: set(sweep.keys_for(family)) for family in sweep.families}
    assert keys["composeae"] == set(sweep.space)
    assert keys["tirg"] == {"model.name", "model.a_init", "model.text_dim"}
    assert keys["image_only"] == {"model.name"}  # reads neither a_init nor text keys
    for params in plan.trials:
        assert set(params) == keys[sweep.family_of(params)]
        sweep.trial_config(params)  # exactly the keys of its family
    assert len({sweep.trial_key(p) for p in plan.trials}) == len(plan.trials)
    # TIRG's 4 configs hold 3 distinct draws; image_only has one config, so two draws skip.
    assert plan.per_family(sweep) == {"composeae": 3, "tirg": 3, "image_only": 1}
    assert [sweep.family_of(p) for p in plan.duplicates] == ["image_only", "image_only"]
    assert "2 draw(s) skipped" in plan.describe(sweep)
    assert "(only composeae)" in sweep.describe()


def test_tune_objects(tiny):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter, Searcher

    from composeae.sweep.searchers import PlannedSearch

    scheduler = tiny.make_scheduler()
    assert isinstance(scheduler, ASHAScheduler)
    assert scheduler._time_attr == "training_iteration" and scheduler._max_t == tiny.max_t
    # Never stopped for reaching max_t: a trial past the last rung runs to its final report.
    assert scheduler._stop_last_trials is False
    # Rungs at the 1st and 2nd evaluations of 4 (rf 2 from grace 1 up to max_t 3), none on the
    # last, where a stop would only throw away a trained trial's final report.
    (bracket,) = scheduler._brackets
    assert sorted(milestone for milestone, _ in bracket._rungs) == [1, 2]
    config = tiny.tune_config()
    assert isinstance(config, tune.TuneConfig)
    assert (config.metric, config.mode, config.num_samples) == ("val/R@1", "max", 4)
    assert isinstance(config.search_alg, ConcurrencyLimiter)
    assert config.search_alg.max_concurrent == 2  # the file's max_concurrent_trials
    planned = config.search_alg.searcher
    assert isinstance(planned, PlannedSearch)
    assert [planned.suggest(f"t{i}") for i in range(5)] == preview(tiny) + [Searcher.FINISHED]
    assert tiny.failure_config().max_failures == 0
    assert tiny.trial_resources() == {"CPU": 0.1}


def test_concurrency_from_cluster_resources(tiny):
    # A tiny trial reserves 0.1 CPU for its driver + 1 worker x 0.5 CPU.
    assert tiny.concurrency({"CPU": 1.0}) == 1
    assert tiny.concurrency({"CPU": 2.0}) == 2           # capped by max_concurrent_trials
    assert tiny.concurrency({"CPU": 0.2}) == 1           # at least one
    gpu = load_sweep(SWEEPS / "css-synth.yaml", ["ray.use_gpu=true"])
    assert gpu.concurrency({"CPU": 64.0, "GPU": 4.0}) == 2  # 2 workers x 1 GPU per trial
    assert gpu.concurrency({"CPU": 1000.0, "GPU": 1000.0}) == gpu.num_trials


def test_fractional_gpus_pack_trials_on_one_gpu():
    """Without a GPU here, the packing is checked where it is decided: what each trial's
    workers ask Ray for, and how many such trials the driver lets run at once; Ray's own
    accounting of fractional resources runs for real with fractional CPUs in test_tune.py."""
    from composeae.config import load_config
    from composeae.run.cluster import scaling_config

    packed = load_sweep(SWEEPS / "css-synth.yaml", ["ray.use_gpu=true", "ray.num_workers=1",
                                                     "ray.gpus_per_worker=0.25"])
    assert packed.resources_per_trial()["GPU"] == 0.25
    one_gpu = {"CPU": 64.0, "GPU": 1.0}
    assert packed.concurrency(one_gpu) == min(4, packed.num_trials)
    assert packed.placement(one_gpu).startswith(f"{min(4, packed.num_trials)} trial(s) at once")
    alone = load_sweep(SWEEPS / "css-synth.yaml", ["ray.use_gpu=true", "ray.num_workers=1"])
    assert alone.concurrency(one_gpu) == 1
    cfg = load_config(SWEEPS.parent / "tiny.yaml", ["ray.use_gpu=true", "ray.gpus_per_worker=0.5"])
    assert scaling_config(cfg).resources_per_worker == {"CPU": cfg.ray.cpus_per_worker, "GPU": 0.5}
    assert "GPU" not in scaling_config(load_config(SWEEPS.parent / "tiny.yaml")).resources_per_worker


def test_resolved_sweep_round_trips(tiny, tmp_path):
    path = tmp_path / "resolved.yaml"
    path.write_text(tiny.to_yaml())
    assert load_sweep(path) == tiny
    absolute = tiny.absolute()
    assert Path(absolute.storage).is_absolute()
    cfg = absolute.trial_config(preview(tiny)[0])
    assert Path(cfg.data.url).is_absolute() and Path(cfg.train.storage).is_absolute()
    assert yaml.safe_load(absolute.to_yaml())["set"]["data.url"] == cfg.data.url


def test_loading_a_sweep_starts_no_ray():
    code = ("import sys; from composeae.sweep.load import load_sweep; "
            f"load_sweep({str(TINY_SWEEP)!r}); print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_page_spec(tiny):
    spec = tiny.page_spec()
    assert spec.params == tuple(tiny.space) and spec.metric == "val/R@1"
    assert spec.planned_steps == 24 and spec.test_metric == "test/R@1"


def test_optuna_asks_only_the_family_keys_and_never_repeats_a_trial(tmp_path):
    from ray.tune.search import Searcher

    body = ("searcher: optuna\nseed: 1\nnum_samples: 8\nsearch:\n"
            "  model.name: {choice: [composeae, tirg]}\n"
            "  model.a_init: {choice: [1.0, 10.0]}\n"
            "  loss.w_sym: {choice: [0.01, 0.1]}\n")
    sweep = load_sweep(write_sweep(tmp_path, body))
    searcher = sweep.make_searcher()
    suggested = []
    for i in range(sweep.num_trials):
        params = searcher.suggest(f"t{i}")
        if params == Searcher.FINISHED:
            break
        suggested.append(params)
        searcher.on_trial_complete(f"t{i}", {"val/R@1": 0.1 * i, "training_iteration": 1})
        if i == 1:  # the search state survives a save and a restore (a resumed sweep)
            path = tmp_path / "searcher.pkl"
            searcher.save(str(path))
            searcher = sweep.make_searcher()
            searcher.restore(str(path))
    # 4 ComposeAE configs and 2 TIRG ones exist: all are tried once, then the search ends.
    keys = [sweep.trial_key(p) for p in suggested]
    assert len(set(keys)) == len(keys) == 6
    for params in suggested:
        assert set(params) == set(sweep.keys_for(sweep.family_of(params)))
    assert sum(p["model.name"] == "tirg" for p in suggested) == 2
    assert searcher.repeats > 0
