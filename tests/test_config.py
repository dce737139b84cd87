"""The config tree: YAML sections map onto frozen dataclasses; bad input names the bad key."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from composeae.config import Config, dump_config, load_config
from composeae.errors import UserError


def write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "model:\n  name: tirg\ntrain:\n  steps: 7\n"),
                      ["optim.lr=0.5", "eval.ks=[1, 10]", "eval.selection_metric=R@10",
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
    ("", ["eval.selection_metric=R@7"], "eval.selection_metric"),
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
    assert load_config(tiny, ["ray.profile=cluster", "ray.num_workers=3"]).ray.num_workers == 3
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
