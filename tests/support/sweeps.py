"""A sweep's trials as its random searcher draws them, without running any: what the sweep tests
compare (a seed reproduces a sweep, each draw builds a valid trial config). Needs no running
Ray."""

from __future__ import annotations

import tempfile
from typing import Any

from composeae.sweep.spec import Sweep
from composeae.sweep.values import plain


def preview(sweep: Sweep) -> list[dict[str, Any]]:
    """The trials' parameters as the random searcher will draw them, in order."""
    from ray.tune.experiment import Experiment
    from ray.tune.search import BasicVariantGenerator

    def _noop(config):  # stands in for the trainable; never run
        return None

    generator = BasicVariantGenerator(random_state=sweep.seed)
    with tempfile.TemporaryDirectory() as tmp:
        generator.add_configurations([Experiment(sweep.name, _noop, config=sweep.param_space(),
                                                 num_samples=sweep.num_samples,
                                                 storage_path=tmp)])
        trials = []
        while (trial := generator.next_trial()) is not None:
            trials.append({k: plain(v) for k, v in trial.config.items()})
    return trials
