"""What a run says before it trains: the batch it uses, what a resubmission does with a changed
config, a store that would vanish with a job's working-directory copy, and the split `eval` and
`index` score by default. Real files and the real command line; none of these start Ray."""

from __future__ import annotations

import json
from pathlib import Path

from composeae.checkpoint import checkpoint_state, save_checkpoint
from composeae.cli import build_parser, main
from composeae.config import dump_config, load_config, replace
from composeae.run import layout
from composeae.run.cluster import absolute_paths
from composeae.run.driver import describe, resume_as_started
from composeae.run.eval_job import checkpoint_test_split

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "jobs" / "configs" / "tiny.yaml"


def _finished_run(cfg, test_r1: float = 0.25) -> Path:
    """The files a finished run leaves (config.yaml, final/history.json, metrics.json)."""
    cfg = absolute_paths(cfg)
    run = Path(cfg.train.storage) / cfg.train.name
    (run / layout.FINAL_CHECKPOINT).mkdir(parents=True)
    (run / layout.CONFIG_FILE).write_text(dump_config(cfg))
    (run / layout.FINAL_CHECKPOINT / layout.HISTORY_FILE).write_text("[]")
    metrics = {"step": cfg.train.steps, "best_step": cfg.train.steps, "test/R@1": test_r1,
               "checkpoint": str(run / layout.FINAL_CHECKPOINT)}
    (run / layout.METRICS_FILE).write_text(json.dumps(metrics))
    return run


def test_a_changed_config_resumes_as_started_and_says_which_keys_it_ignores(tmp_path):
    cfg = load_config(TINY, [f"train.storage={tmp_path}"])
    assert resume_as_started(cfg) == (cfg, None)  # no such run yet
    run = _finished_run(cfg)
    (run / layout.METRICS_FILE).unlink()  # unfinished: started, no final metrics
    changed = replace(cfg, train={"steps": 2000}, optim={"lr": 0.5},
                      ray={"num_workers": 1, "max_failures": 3})
    resumed, note = resume_as_started(changed)
    # What the run is comes from its own config.yaml; where it runs from the submission, with
    # the per-worker batch that keeps its global batch (2 x 8) on one worker.
    assert (resumed.train.steps, resumed.optim.lr) == (cfg.train.steps, cfg.optim.lr)
    assert (resumed.ray.num_workers, resumed.ray.max_failures, resumed.train.batch_size) == (
        1, 3, 16)
    assert note.startswith("run tiny exists and was started with another config: ")
    assert "train.steps (6 -> 2000)" in note and "optim.lr (0.001 -> 0.5)" in note
    assert "resumes as it was started" in note and "--set train.name=tiny-2" in note
    assert "ray." not in note and "\n" not in note
    # Only where or how it runs changed (workers, compiling): nothing to say; both follow.
    one = load_config(TINY, [f"train.storage={tmp_path}", "ray.num_workers=1",
                             "train.compile=default"])
    resumed, note = resume_as_started(one)
    assert one.train.batch_size == 16 and note is None
    assert resumed.train.compile == "default" and resumed.ray.num_workers == 1


def test_a_finished_run_with_a_changed_config_trains_nothing_and_says_so(tmp_path, css_tiny,
                                                                          capsys):
    sets = [f"data.url={css_tiny}", f"train.storage={tmp_path}"]
    _finished_run(load_config(TINY, sets), test_r1=0.25)
    assert main(["train", "--config", str(TINY), *[f"--set={s}" for s in sets],
                 "--set", "train.steps=2000"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("run tiny has finished; its config differs in train.steps (6 -> 2000), "
                      "which is ignored: nothing is trained; to run the changed config, give it "
                      "a new name: --set train.name=tiny-2")
    assert "global batch 16 = 2 x 8 per worker" in out[1]
    assert any(line.startswith("run tiny had already finished (step 6)") for line in out)
    assert any("25.0" in line for line in out)  # its own table, in percent


def test_a_store_inside_a_jobs_working_directory_copy_is_refused(tmp_path, css_tiny,
                                                                  monkeypatch, capsys):
    copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    assert main(["train", "--config", str(TINY), "--set", f"data.url={css_tiny}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: train.storage {copy / 'runs'} is inside this Ray job's "
                          f"temporary copy") and "s3://" in err and "\n" not in err
    assert not (copy / "runs" / "tiny").exists()


def test_the_start_line_states_global_and_per_worker_batch(capsys):
    cfg = load_config(ROOT / "jobs" / "configs" / "demo.yaml", ["ray.profile=gpu"])
    assert "with 1 GPU worker(s), global batch 64 = 1 x 64 per worker;" in describe(cfg)
    assert main(["config", "show", "--config", str(ROOT / "jobs" / "configs" / "demo.yaml"),
                 "--set", "ray.profile=cluster"]) == 0
    out = capsys.readouterr().out
    assert "# global batch 64 = 4 x 16 per worker (kept from " in out
    assert "  batch_size: 16" in out and "# derived" in out


def test_eval_and_index_score_the_checkpoints_test_split_unless_told(tmp_path, css_tiny):
    from composeae.models import create_model
    from composeae.models.text import build_tokenizer

    cfg = load_config(TINY, [f"data.url={css_tiny}", "eval.test_split=val"])
    model = create_model(cfg.model, cfg.loss, build_tokenizer("lstm", ["a b c"]))
    save_checkpoint(tmp_path / "model.pt", checkpoint_state(model, cfg))
    assert checkpoint_test_split(str(tmp_path)) == "val"
    parser = build_parser()
    for argv in (["eval", "--checkpoint", "c", "--data", "d"],
                 ["index", "--checkpoint", "c", "--data", "d", "--out", "o"]):
        assert parser.parse_args(argv).split is None
        assert parser.parse_args(argv + ["--split", "test"]).split == "test"
