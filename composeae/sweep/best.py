"""The best trial of a sweep, and the chosen trial as an experiment file to train again.

What belongs here: choosing the best trial from Tune's results (`reported_trials`, `best_row`,
`best_trial`: plain reads of each result's metrics, no Ray call) and `best_config_yaml`, the
resolved config of a trial with a header naming the sweep, the trial, its metric and searched
values, and the `--set` overrides needed where a `ray.profile` would overwrite a value of the
file on loading.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

from composeae.config import Config, config_to_dict, dump_config, load_config
from composeae.sweep.spec import Sweep
from composeae.sweep.values import plain, yaml_value


def reported_trials(sweep: Sweep, grid: Iterable[Any]) -> list[Any]:
    """The results (`ray.tune.Result`) of the trials that reported `sweep.metric`, in trial-id
    order, so that of trials tied on the metric the same one is named best whatever order a
    restored sweep lists them in."""
    results = sorted((r for r in grid
                      if r.metrics_dataframe is not None and sweep.metric in r.metrics_dataframe),
                     key=lambda r: r.metrics["trial_id"])
    if not results:
        raise RuntimeError(f"sweep {sweep.name}: no trial reported {sweep.metric}")
    return results


def trial_params(sweep: Sweep, config: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's searched values from its Tune config: only the keys of its model family."""
    return {k: plain(config[k]) for k in sweep.space if config.get(k) is not None}


def best_row(sweep: Sweep, result: Any) -> Any:
    """The reported row (a pandas Series) of a trial's best evaluation by `sweep.metric`."""
    sign = 1 if sweep.mode == "max" else -1
    frame = result.metrics_dataframe.dropna(subset=[sweep.metric])
    return frame.loc[(sign * frame[sweep.metric]).idxmax()]


def best_trial(sweep: Sweep, results: list[Any]) -> tuple[Any, Any]:
    """The best of `reported_trials`' results and the row of its best evaluation (the first in
    trial-id order among ties)."""
    sign = 1 if sweep.mode == "max" else -1
    best = max(results, key=lambda r: sign * best_row(sweep, r)[sweep.metric])
    return best, best_row(sweep, best)


def best_config_yaml(sweep: Sweep, params: Mapping[str, Any], *, trial_id: str | None = None,
                     metrics: Mapping[str, Any] | None = None, name: str | None = None) -> str:
    """The experiment YAML of a trial (usually the best), ready for `composeae train --config`:
    the full resolved config (`dump_config`) of `sweep.trial_config(params, name=...)`, with a
    comment header naming the sweep, the trial, its metric and its searched values. The run is
    named `name`, by default `<sweep>-best`, so training the file starts a fresh run instead of
    resuming the trial's own. Loading the file with `load_config` gives that config exactly;
    where a `ray.profile` would overwrite a value of the file on loading, the header gives the
    `--set` that keeps it."""
    run_name = name or f"{sweep.name}-best"
    cfg = sweep.trial_config(params, name=run_name)
    body = dump_config(cfg)
    extra = _reload_overrides(body, cfg)
    header = [f"# Trial {trial_id or '?'} of sweep {sweep.name} "
              f"({sweep.path.name if sweep.path else sweep.base_path.name}), "
              f"base {sweep.base_path.name}."]
    if metrics is not None and sweep.metric in metrics:
        header.append(f"# {sweep.metric} = {metrics[sweep.metric]} "
                      f"(selected by {sweep.mode} {sweep.metric})")
    header += [f"#   {k} = {yaml_value(v)}" for k, v in params.items()]
    command = "composeae train --config THIS_FILE" + "".join(f" --set {o}" for o in extra)
    header.append(f"# Train it again as run {run_name!r}: {command}")
    return "\n".join(header) + "\n" + body


def _reload_overrides(text: str, cfg: Config) -> list[str]:
    """`--set` overrides needed for `load_config` of `text` to give `cfg` (a `ray.profile` is
    applied over the file's values when it is loaded)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "config.yaml")
        path.write_text(text)
        again = config_to_dict(load_config(path))
        want = config_to_dict(cfg)
        return [f"{section}.{key}={yaml_value(value)}"
                for section, values in want.items() for key, value in values.items()
                if again[section][key] != value]
