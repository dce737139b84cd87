"""The names of what a run and a sweep write, in one place.

A run lives at `<train.storage>/<train.name>/` (`run_url`):

    config.yaml        the resolved config the run was built from
    tensorboard/       rank 0's event files
    step-00000040/     a checkpoint per evaluation: model.pt, history.json
    final/             the best-by-validation weights with the test recall: model.pt,
                       history.json, retrievals.json
    metrics.json       the final metrics (`test/R@K`, best step, the final checkpoint's URL)
    report.html        the run's page

A sweep lives at `<storage>/<name>/` (`composeae.sweep.spec.Sweep.experiment_url`):

    runs/<name>-<trial>/   each trial's run, laid out as above
    hparams/               one TensorBoard HParams entry per trial
    summary.{csv,md,html}  the sweep's page
    best.yaml, best.json   the best trial as an experiment config, and as figures
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from composeae import storage

if TYPE_CHECKING:
    from composeae.config import Config

# -- a run
CONFIG_FILE = "config.yaml"
TENSORBOARD_DIR = "tensorboard"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"
FINAL_CHECKPOINT = "final"
"""The checkpoint of the final report: the best-by-validation weights and their test recall."""
HISTORY_FILE = "history.json"
"""Next to `model.pt` in every reported checkpoint: the logged rows, readable without the weights."""
RETRIEVALS_FILE = "retrievals.json"
"""In the final checkpoint: what its weights retrieve for a few fixed test queries."""
FINAL_FLAG = "final"
"""Set (True) in the metrics of a run's final report, and only there."""

# -- a sweep
SWEEP_RUNS_DIR = "runs"
HPARAMS_DIR = "hparams"
BEST_YAML = "best.yaml"
BEST_JSON = "best.json"
SWEEP_FILE = "sweep.yaml"  # the resolved sweep file as it started
SUMMARY_CSV, SUMMARY_MD, SUMMARY_HTML = "summary.csv", "summary.md", "summary.html"


def run_url(cfg: "Config") -> str:
    """Where the run named `train.name` lives: checkpoints, metrics.json, report, events."""
    return storage.join(cfg.train.storage, cfg.train.name)


def checkpoint_dir_name(step: int) -> str:
    """The directory of the checkpoint reported at `step`."""
    return f"step-{step:08d}"
