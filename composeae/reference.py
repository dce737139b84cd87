"""The config reference (`docs/config.md`), generated from the config classes' own docs.

What belongs here: turning `composeae.config`'s dataclasses (each field's type, default and the
docstring under it), the profiles of `ray_config.yaml` and the sweep file's documentation
(`composeae.sweep.load`) into one Markdown page. A test regenerates the page and compares it
with the checked-in file, so a key added or documented in the code reaches the page:

    .venv/bin/python -m composeae.reference --out docs/config.md
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import typing
from pathlib import Path

import yaml

from composeae import config, storage
from composeae.sweep import load as sweep_load

OUT = "docs/config.md"


def field_docs(cls: type) -> dict[str, str]:
    """{field: the docstring under it} of a dataclass, read from its source (Python keeps no
    attribute docstrings at run time)."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def type_name(annotation: typing.Any) -> str:
    """A field's type as a person reads it: `a` or `b` for a Literal, `[min, max]` for a tuple."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " or ".join(f"`{a}`" for a in args)
    if origin is tuple:
        return "list of " + type_name(args[0]) if args[-1] is Ellipsis else (
            "[" + ", ".join(type_name(a) for a in args) + "]")
    if args:  # a union
        return " or ".join("null" if a is type(None) else type_name(a) for a in args)
    return {"str": "text", "int": "integer", "float": "number", "bool": "true or false"}.get(
        annotation.__name__, annotation.__name__)


def _value(value: typing.Any) -> str:
    text = yaml.safe_dump(list(value) if isinstance(value, tuple) else value,
                          default_flow_style=True).strip()
    return f"`{text.removesuffix('...').strip()}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def section_table(name: str, cls: type) -> list[str]:
    hints, docs, default = typing.get_type_hints(cls), field_docs(cls), cls()
    summary = " ".join(inspect.cleandoc(cls.__doc__ or "").split()).removeprefix(f"`{name}`: ")
    lines = [f"## `{name}`", "", summary[:1].upper() + summary[1:], "",
             "| key | type | default | what it does |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        lines.append(f"| `{name}.{f.name}` | {_cell(type_name(hints[f.name]))} | "
                     f"{_cell(_value(getattr(default, f.name)))} | {_cell(docs.get(f.name, ''))} |")
    return lines + [""]


def profiles_section(path: Path) -> list[str]:
    profiles = yaml.safe_load(path.read_text()) or {}
    lines = ["## Profiles (`ray_config.yaml`)", "",
             "`--set ray.profile=NAME` applies a profile after the experiment file and before "
             "`--set`. A profile says where a run goes: `shards_root` replaces the leading "
             "`shards/` of `data.url`, `runs_root` the leading `runs` of `train.storage` and "
             "`nightly.registry`, and `ray` sets keys of the `ray` section. When it changes the "
             "number of workers, `train.batch_size` is derived so that the global batch stays "
             "the experiment file's.", "",
             "| profile | shards_root | runs_root | ray |", "| --- | --- | --- | --- |"]
    for name, profile in profiles.items():
        profile = profile or {}
        ray = ", ".join(f"`{k}: {_value(v).strip('`')}`" for k, v in (profile.get("ray") or {}).items())
        lines.append(f"| `{name}` | {_value(profile.get('shards_root'))} | "
                     f"{_value(profile.get('runs_root'))} | {_cell(ray)} |")
    return lines + [""]


def renamed_section() -> list[str]:
    lines = ["## Old names, refused", "",
             "A key whose meaning or unit changed has a new name; a config file or `--set` "
             "that uses the old one stops in one line naming the new one. Configs the project "
             "wrote itself (in checkpoints and run directories) are translated.", "",
             "| old | new |", "| --- | --- |"]
    for old, (new, factor) in config.RENAMED_KEYS.items():
        lines.append(f"| `{old}` (a fraction) | `{new}` (percent points: x {factor:g}) |")
    for key, rule in config.RESPELLED_METRICS.items():
        prefix = "val" if rule == "val" else "<nightly.split>"
        lines.append(f"| `{key}: R@K` | `{key}: {prefix}/R@K` |")
    return lines + [""]


def sweep_section() -> list[str]:
    """The sweep file's documentation, as `composeae.sweep.load` writes it (up to the paragraph
    about the Tune driver, which is for programmers)."""
    doc = inspect.cleandoc(sweep_load.__doc__ or "")
    doc = doc.split("\n\nThe Tune driver uses", 1)[0]
    title, _, body = doc.partition("\n\n")
    return ["## Sweep files", "", title, "", body, ""]


def render(ray_config: Path | None = None) -> str:
    """The whole page."""
    ray_config = ray_config or Path(__file__).resolve().parents[1] / config.RAY_CONFIG
    lines = ["# Config reference", "",
             "<!-- Generated from the docs of composeae/config.py, ray_config.yaml and "
             "composeae/sweep/load.py by `python -m composeae.reference --out docs/config.md`; "
             "tests/test_reference.py fails when this file is out of date. -->", "",
             "An experiment config is one YAML file (`jobs/configs/*.yaml`) whose sections are "
             "the tables below; a key left out takes its default. A value comes from, in order: "
             "the default, the experiment file, the `ray.profile`, then each "
             "`--set section.key=value` (parsed as YAML). Unknown keys, wrong types and "
             "impossible values stop the run in one line naming the key. "
             "`composeae config show --config FILE [--set ...]` prints the resolved config with "
             "the source of every value. Recall is written in percent points wherever a person "
             "types or reads it, and metrics are spelled `val/R@K` (validation) and `test/R@K` "
             "(the final test), as in `metrics.json`.", ""]
    for f in dataclasses.fields(config.Config):
        lines += section_table(f.name, typing.get_type_hints(config.Config)[f.name])
    lines += profiles_section(ray_config) + renamed_section() + sweep_section()
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m composeae.reference",
                                     description="write the config reference")
    parser.add_argument("--out", default=OUT, help=f"where to write it (default {OUT})")
    storage.write_text(parser.parse_args(argv).out, render())


if __name__ == "__main__":
    main()
