"""The config tree: YAML sections map onto frozen dataclasses; bad input names the bad key."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from composeae.config import (Config, config_from_dict, config_to_dict, dump_config,
                              load_config, nightly_metric, replace, worker_range)
from composeae.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


def write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "model:\n  name: tirg\ntrain:\n  steps: 7\n"),
                      ["optim.lr=0.5", "eval.ks=[1, 10]", "eval.selection_metric=val/R@10",
                       "model.bert_path=null"])
    assert cfg.model.name == "tirg" and cfg.train.steps == 7
    assert cfg.optim.lr == 0.5 and cfg.eval.ks == (1, 10)
    assert cfg.loss.w_sym == 0.01  # untouched default: the paper's weight
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.steps = 3


def test_exponent_floats_are_numbers_on_the_command_line_and_in_files(tmp_path):
    cfg = load_config(write(tmp_path, "optim:\n  weight_decay: 5e-5\n"), ["optim.lr=1e-3"])
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (1e-3, 5e-5)


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["model.embed_dim=64", "data.text_mode=complete"])
    again = load_config(write(tmp_path, dump_config(cfg)))
    assert again == cfg
    assert yaml.safe_load(dump_config(cfg))["model"]["embed_dim"] == 64


@pytest.mark.parametrize("text, overrides, needle", [
    ("model:\n  nmae: tirg\n", [], "model.nmae"),
    ("modle:\n  name: tirg\n", [], "modle"),
    ("", ["model.embed_dim=-4"], "model.embed_dim"),
    ("", ["loss.w_sym=-0.1"], "loss.w_sym"),
    ("", ["train.steps=ten"], "train.steps"),
    ("", ["train.steps=2.5"], "train.steps"),
    ("", ["model.freeze_text=maybe"], "model.freeze_text"),
    ("", ["data.text_mode=caption"], "data.text_mode"),
    ("", ["eval.selection_metric=val/R@7"], "eval.selection_metric"),
    ("", ["train.name=a/b"], "train.name"),
    ("", ["optim.lr"], "optim.lr"),
    ("model: [1, 2]\n", [], "model"),
])
def test_errors_name_the_key(tmp_path, text, overrides, needle):
    with pytest.raises(UserError) as err:
        load_config(write(tmp_path, text), overrides)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_model_is_named_where_models_are_created():
    from composeae.models.zoo import model_class

    cfg = load_config(None, ["model.name=resnet_magic"])  # the config tree knows no model zoo
    with pytest.raises(UserError) as err:
        model_class(cfg.model.name)
    assert "model.name" in str(err.value) and "tirg" in str(err.value)
    assert "\n" not in str(err.value)


def test_config_imports_no_model():
    import subprocess
    import sys

    code = "import sys, composeae.config; print(any(m.startswith('composeae.models') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(write(tmp_path, "model: {name: [\n"))


def test_every_shipped_config_loads():
    from pathlib import Path

    configs = sorted(Path(__file__).parents[1].glob("jobs/configs/*.yaml"))
    assert configs
    for path in configs:
        assert isinstance(load_config(path), Config)


def test_cluster_profile_moves_stores_to_s3():
    from pathlib import Path

    tiny = Path(__file__).parents[1] / "jobs" / "configs" / "tiny.yaml"
    local = load_config(tiny)
    cluster = load_config(tiny, ["ray.profile=cluster"])
    assert (local.data.url, local.train.storage) == ("shards/css-synth-tiny", "runs")
    assert cluster.data.url.startswith("s3://") and cluster.data.url.endswith("/css-synth-tiny")
    assert cluster.train.storage.startswith("s3://")
    assert cluster.ray.use_gpu and cluster.ray.profile == "cluster"
    # --set still wins over the profile.
    assert load_config(tiny, ["ray.profile=cluster", "ray.num_workers=8"]).ray.num_workers == 8
    with pytest.raises(UserError, match="ray.profile"):
        load_config(tiny, ["ray.profile=moon"])


def test_models_command_lists_the_zoo(capsys):
    from composeae.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("composeae", "tirg", "concat", "realspace_concat_ae", "image_only", "text_only"):
        assert name in out


@pytest.mark.parametrize("workers,batch,needle", [
    ("[2, 1]", 8, "1 <= min <= max"),
    ("[0, 2]", 8, "1 <= min <= max"),
    ("0", 8, "must be >= 1"),
    ("1.5", 8, "must be an integer"),
    ("[1, 2, 3]", 8, "a number or [min, max]"),
    ("[2, 3]", 5, "cannot be split evenly over 2 workers"),
])
def test_bad_worker_ranges_are_one_line(workers, batch, needle):
    with pytest.raises(UserError) as err:
        load_config(None, [f"ray.num_workers={workers}", f"train.batch_size={batch}"])
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_an_elastic_range_keeps_the_global_batch_and_round_trips(tmp_path):
    from composeae.config import global_batch, worker_range

    cfg = load_config(None, ["ray.num_workers=[1, 2]", "train.batch_size=8"])
    assert worker_range(cfg.ray) == (1, 2) and global_batch(cfg) == 16
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path, []) == cfg
    fixed = load_config(None, ["ray.num_workers=3", "train.batch_size=8"])
    assert worker_range(fixed.ray) == (3, 3) and global_batch(fixed) == 24


def test_config_show_names_the_source_of_every_value():
    from composeae.config import format_resolved, resolve_config

    resolved = resolve_config(CONFIGS / "demo.yaml", ["ray.profile=cluster", "optim.lr=0.002"])
    sources = resolved.sources
    assert sources["optim.lr"] == "--set" and sources["optim.name"] == "file"
    assert sources["optim.momentum"] == "default"
    assert sources["ray.num_workers"] == sources["data.url"] == "profile cluster"
    assert sources["train.batch_size"] == "derived"
    text = format_resolved(resolved, "demo")
    assert "  lr: 0.002" in text and text.count("# --set") == 2  # optim.lr and ray.profile
    # The text is the config: read back as YAML, it loads to the same tree.
    assert config_from_dict(yaml.safe_load(text)) == resolved.cfg
    assert resolve_config(CONFIGS / "demo.yaml").sources["data.url"] == "file"


def test_a_profile_keeps_the_global_batch_of_the_experiment_file():
    from composeae.config import global_batch, resolve_config

    demo = resolve_config(CONFIGS / "demo.yaml")  # 2 workers x 32
    assert demo.batch_note == "global batch 64 = 2 x 32 per worker" and not demo.batch_moved
    for overrides, workers in ((["ray.profile=cluster"], 4), (["ray.profile=gpu"], 1),
                               (["ray.num_workers=8"], 8)):
        moved = resolve_config(CONFIGS / "demo.yaml", overrides)
        assert worker_range(moved.cfg.ray)[1] == workers and global_batch(moved.cfg) == 64
        assert moved.cfg.train.batch_size == 64 // workers
        assert moved.batch_moved and moved.batch_note.startswith(
            f"global batch 64 = {workers} x {64 // workers} per worker (kept from ")
    # Only an explicit per-worker batch changes the global batch, and the line says so.
    explicit = resolve_config(CONFIGS / "demo.yaml", ["ray.profile=cluster",
                                                      "train.batch_size=32"])
    assert global_batch(explicit.cfg) == 128 and "set by --set" in explicit.batch_note
    with pytest.raises(UserError, match="global batch 64 .* cannot be split evenly over the 3"):
        load_config(CONFIGS / "demo.yaml", ["ray.num_workers=3"])


@pytest.mark.parametrize("text,overrides,needle", [
    ("nightly:\n  margin: 0.005\n", [], "nightly.margin is now nightly.margin_points "
                                        "(percent points: 0.005 -> 0.5)"),
    ("", ["nightly.margin=0.01"], "nightly.margin_points"),
    ("eval:\n  selection_metric: R@10\n  ks: [1, 10]\n", [], "'R@10' is now spelled 'val/R@10'"),
    ("nightly:\n  split: val\n", ["nightly.metric=R@1"], "'R@1' is now spelled 'val/R@1'"),
    ("", ["nightly.metric=val/R@1"], "nightly.metric='val/R@1' is not one of test/R@K"),
])
def test_old_names_and_spellings_are_refused_naming_the_new_one(tmp_path, text, overrides,
                                                                 needle):
    with pytest.raises(UserError) as info:
        load_config(write(tmp_path, text), overrides)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_configs_the_project_stored_are_read_with_their_old_spellings():
    stored = config_to_dict(load_config(None))
    stored["nightly"] = {k: v for k, v in stored["nightly"].items() if k != "margin_points"}
    stored["nightly"] |= {"margin": 0.02, "metric": "R@5"}
    stored["eval"]["selection_metric"] = "R@10"
    cfg = config_from_dict(stored)
    assert cfg.nightly.margin_points == pytest.approx(2.0)
    assert (cfg.nightly.metric, cfg.eval.selection_metric) == ("test/R@5", "val/R@10")
    assert nightly_metric(replace(cfg, nightly={"metric": None})) == "test/R@10"


def test_one_metric_spelling_across_experiment_sweep_and_nightly_files():
    texts = {p: p.read_text() for p in CONFIGS.rglob("*.yaml")}
    spelled = [re.search(r"^\s*(selection_metric|metric):\s*(\S+)", t, re.M) for t in texts.values()]
    values = {m.group(2) for m in spelled if m}
    assert values and all(re.fullmatch(r"(val|test)/R@\d+", v) for v in values), values
    assert not [p for p, t in texts.items() if re.search(r"^\s*margin:", t, re.M)]
