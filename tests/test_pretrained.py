"""The pretrained-weights guard: paper configs stop before any worker starts without their
weights, in one line naming the keys and the files; `model.allow_random_init` lets them run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from composeae.config import load_config
from composeae.errors import UserError
from composeae.models.pretrained import check_pretrained, missing_pretrained

CONFIGS = Path(__file__).parents[1] / "jobs" / "configs"
PAPER = ["fashion200k", "mitstates", "fashioniq", "cirr"]


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs_need_their_weights(name: str):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.model.pretrained and not cfg.model.allow_random_init
    with pytest.raises(UserError) as err:
        check_pretrained(cfg.model)
    message = str(err.value)
    assert "\n" not in message
    for needle in ("model.image_weights", "resnet18-f37072fd.pth", "model.bert_path",
                   "bert-base-uncased", "save_pretrained", "model.allow_random_init=true"):
        assert needle in message
    given = load_config(CONFIGS / f"{name}.yaml",
                        ["model.image_weights=/w/resnet18-f37072fd.pth", "model.bert_path=/w/bert"])
    check_pretrained(given.model)
    check_pretrained(load_config(CONFIGS / f"{name}.yaml", ["model.allow_random_init=true"]).model)


@pytest.mark.parametrize("path", sorted(p.name for p in CONFIGS.glob("*.yaml")
                                        if p.stem not in PAPER))
def test_other_configs_train_from_scratch(path: str):
    assert missing_pretrained(load_config(CONFIGS / path).model) == []


@pytest.mark.parametrize("overrides, key", [
    (["model.freeze_text=true"], "model.freeze_text"),  # a frozen LSTM is random
    (["model.freeze_image=true"], "model.freeze_image"),  # so is a frozen small CNN
    (["model.text_encoder=bert", "model.freeze_text=true"], "model.bert_path"),
    (["model.image_encoder=resnet50", "model.freeze_image=true"], "resnet50-11ad3fa6.pth"),
    (["model.pretrained=true"], "model.image_encoder=small_cnn"),
])
def test_random_frozen_or_pretrained_encoders_are_named(overrides, key):
    problems = missing_pretrained(load_config(None, overrides).model)
    assert len(problems) == 1 and key in problems[0]


def test_a_model_without_text_needs_no_text_weights():
    cfg = load_config(None, ["model.name=image_only", "model.text_encoder=bert",
                             "model.freeze_text=true"])
    assert missing_pretrained(cfg.model) == []


def composeae_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "composeae.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_train_stops_before_anything_starts_and_the_override_passes(tmp_path):
    config = str(CONFIGS / "fashion200k.yaml")
    guarded = composeae_cli("train", "--config", config, cwd=tmp_path)
    assert guarded.returncode == 2
    lines = guarded.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: random encoder weights")
    assert "model.image_weights" in lines[0] and "model.bert_path" in lines[0]
    assert list(tmp_path.iterdir()) == []  # no run directory, no shards

    anyway = composeae_cli("train", "--config", config, "--set", "model.allow_random_init=true",
                           cwd=tmp_path)
    assert anyway.returncode == 2
    lines = anyway.stderr.strip().splitlines()
    # Past the guard, the run stops at the next check: the dataset is not there.
    assert len(lines) == 1 and "no dataset at" in lines[0] and "fashion200k" in lines[0]
    assert "random encoder weights" not in lines[0]
    assert list(tmp_path.iterdir()) == []
