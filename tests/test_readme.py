"""The README's commands run as written on a fresh clone: each names a real subcommand, real
flags, config files that exist and keys the config tree knows; the Python example names the
API's real methods; the Dockerfile names a real extra and real paths; `make demo` installs no
extra."""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import composeae
from composeae.api import Model
from composeae.cli import build_parser
from composeae.config import load_config
from composeae.sweep.load import load_sweep

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
JOBS = {"jobs/train.py": "train", "jobs/tune.py": "tune", "jobs/nightly.py": "nightly"}


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, re.M | re.S)


def _commands() -> list[str]:
    """Every command line of the README's bash blocks, continuation lines joined."""
    lines = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()  # a trailing comment
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


COMMANDS = _commands()


def _composeae_argv(line: str) -> list[str] | None:
    """The composeae argv a command runs: `.venv/bin/composeae ...`, or a job's entrypoint."""
    words = shlex.split(line)
    words = words[1:] if re.fullmatch(r"[A-Z_]+=\S*", words[0]) else words  # VAR=value
    if words[0] == ".venv/bin/composeae":
        return words[1:]
    if "--" in words and words[words.index("--") + 1:][:1] == ["python"]:
        job, *args = words[words.index("--") + 2:]
        return [JOBS[job], *args]
    return None


def test_the_readme_shows_commands_and_every_one_is_runnable_from_the_clone():
    assert len(COMMANDS) > 30
    for line in COMMANDS:
        words = shlex.split(line)
        words = words[1:] if re.fullmatch(r"[A-Z_]+=\S*", words[0]) else words  # VAR=value
        # Nothing assumes an activated venv: the project's tools are called by their path.
        assert words[0] not in ("composeae", "pip", "python", "tensorboard", "pytest"), line
        if words[0] == ".venv/bin/pip":
            assert words[1:4] == ["install", "-c", "constraints.txt"], line
        if words[0] == "make":
            targets = re.findall(r"^([a-z-]+):", (ROOT / "Makefile").read_text(), re.M)
            assert set(words[1:]) <= set(targets), line
        for word in words:
            if re.fullmatch(r"(jobs|cluster|bench)/[\w./-]+", word):
                assert (ROOT / word).exists(), f"{line}: {word} does not exist"


@pytest.mark.parametrize("line", [c for c in COMMANDS if _composeae_argv(c)])
def test_each_composeae_command_names_a_real_subcommand_flags_and_config(line, monkeypatch):
    argv = _composeae_argv(line)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"the README's command does not parse: {line}")
    monkeypatch.chdir(ROOT)
    config, sets = getattr(args, "config", None), getattr(args, "set", None) or []
    if config and argv[0] == "tune":
        load_sweep(ROOT / config, sets)
    elif config:
        load_config(ROOT / config, sets)  # real keys and values, profiles included


def test_the_python_example_uses_the_real_api():
    (example,) = _blocks("python")
    tree = ast.parse(example)
    called = {node.func.attr for node in ast.walk(tree)
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
    assert "load" in called and callable(composeae.load)
    assert {"embed_images", "embed_queries"} <= called <= {"load", "embed_images", "embed_queries",
                                                          "embed_texts", "argmax"}
    assert all(hasattr(Model, name) for name in called - {"load", "argmax"})
    for name in re.findall(r"`model\.(embed_\w+|config)\b", README):
        assert hasattr(Model, name) or name in Model.__dataclass_fields__, name


def test_links_and_the_picture_point_at_files_that_exist():
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target
    picture = ROOT / "composeae" / "serve" / "page.png"
    assert picture.stat().st_size < 400_000


def test_the_dockerfile_installs_the_serve_extra_from_paths_that_exist():
    import tomllib

    text = (ROOT / "Dockerfile").read_text()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    base = re.search(r"^FROM rayproject/ray:([\d.]+)-py(\d)(\d+)-gpu$", text, re.M)
    import ray
    assert base and base.group(1) == ray.__version__ and base.groups()[1:] == ("3", "11")
    installed = re.search(r'pip install .*-c /home/ray/composeae/(\S+) \\\n\s+"/home/ray/'
                          r'composeae\[(\w+)\]"', text)
    assert installed and (ROOT / installed.group(1)).is_file() and installed.group(2) in extras
    assert "ray[serve]" in " ".join(extras[installed.group(2)])
    # The KubeRay manifests name the image this file builds; `ray up` installs the same extra.
    tag = re.search(r"docker build -t (\S+) \.", text).group(1)
    manifests = [p for p in (ROOT / "cluster" / "kuberay").glob("*.yaml")
                 if "image: registry.example.com" in p.read_text()]
    assert manifests and all(f"image: {tag}" in p.read_text() for p in manifests)
    assert f'composeae[{installed.group(2)}]' in (ROOT / "cluster" / "aws-gpu.yaml").read_text()
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "runs", ".git"} <= set(ignored)


def test_make_demo_installs_no_extra_and_the_demo_imports_none():
    makefile = (ROOT / "Makefile").read_text()
    demo_stamp = re.search(r"^demo: (\S+)", makefile, re.M).group(1)
    recipe = re.search(rf"^\$\(CORE\):.*?\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert demo_stamp == "$(CORE)" and "-e .\n" in recipe and "[" not in recipe
    # What `make demo` runs imports none of the dev extra's packages.
    dev_only = ("moto", "optuna", "playwright", "pytest", "faiss")
    probe = ("import sys, composeae.cli, composeae.run.driver, composeae.run.worker; "
             f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({dev_only!r})))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.strip()
    assert out == "[]"
