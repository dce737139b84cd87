"""The model registry on local disk and on the moto S3 server: versions, races, aliases,
rollback, interrupted writes and bad input (no Ray: registry operations are plain storage)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from composeae import storage
from composeae.errors import UserError
from composeae.registry.store import ModelRegistry


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """A registry URL and a checkpoint directory URL, on local disk or in a moto bucket."""
    if request.param == "local":
        root = str(tmp_path)
    else:
        root = request.getfixturevalue("s3_bucket")
    checkpoint = storage.join(root, "runs", "some-run", "final")
    storage.write_bytes(storage.join(checkpoint, "model.pt"), b"weights" * 100)
    storage.write_text(storage.join(checkpoint, "history.json"), "[]")
    storage.write_text(storage.join(checkpoint, "nested", "extra.txt"), "x")
    return storage.join(root, "registry"), checkpoint


def _record(score: float = 0.5) -> dict:
    return {"date": "2026-11-29", "model": "composeae",
            "evaluation": {"split": "test", "table": {"test/R@1": score}},
            "decision": {"metric": "test/R@1", "promote": True}}


def _small_checkpoint(tmp_path: Path) -> Path:
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.pt").write_bytes(b"w")
    return checkpoint


def _race(n: int, work) -> list:
    """Run `work(i)` in n threads released together; their results (or exceptions)."""
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_register_copies_the_checkpoint_and_registers_a_run_once(where):
    url, checkpoint = where
    registry = ModelRegistry.create(url)
    version, created = registry.register(checkpoint, run_name="nightly-2026-11-29",
                                         record=_record())
    assert created and version["version"] == 1
    assert storage.list_files(version["checkpoint"]) == ["history.json", "model.pt",
                                                         "nested/extra.txt"]
    assert storage.read_bytes(storage.join(version["checkpoint"], "model.pt")) == b"weights" * 100
    again, created = registry.register(checkpoint, run_name="nightly-2026-11-29",
                                       record=_record(0.9))
    assert not created and again == version  # the first registration stands, unchanged
    # A writer killed after creating its version but before writing the number into its claim:
    # the version is still found (by the scan), and registering again adds nothing.
    storage.write_text(storage.join(url, "claims", "nightly-2026-11-29.json"),
                       json.dumps({"token": "dead", "time": 0}))
    assert registry.find_run("nightly-2026-11-29") == version
    for _ in range(3):
        assert registry.register(checkpoint, run_name="nightly-2026-11-29",
                                 record=_record()) == (version, False)
    assert registry.find_run("never-registered") is None
    assert ModelRegistry.open(url).versions() == [1]
    assert registry.resolve("v1") == registry.resolve(1) == version


def test_two_writers_racing_for_one_run_leave_one_version(where):
    url, checkpoint = where
    registry = ModelRegistry.create(url)
    results = _race(4, lambda i: ModelRegistry(url).register(
        checkpoint, run_name="nightly-2026-11-29", record=_record(i / 10)))
    assert not any(isinstance(r, Exception) for r in results), results
    assert sum(created for _, created in results) == 1
    assert registry.versions() == [1]
    assert {version["version"] for version, _ in results} == {1}


def test_writers_racing_for_version_numbers_get_distinct_ones(where):
    url, checkpoint = where
    registry = ModelRegistry.create(url)
    results = _race(4, lambda i: ModelRegistry(url).register(
        checkpoint, run_name=f"run-{i}", record=_record()))
    assert not any(isinstance(r, Exception) for r in results), results
    assert registry.versions() == [1, 2, 3, 4]
    assert sorted(registry.version(n)["run_name"] for n in range(1, 5)) == \
        [f"run-{i}" for i in range(4)]


def test_concurrent_alias_changes_are_all_kept_and_logged(where):
    url, checkpoint = where
    registry = ModelRegistry.create(url)
    registry.register(checkpoint, run_name="a", record=_record())
    results = _race(6, lambda i: ModelRegistry(url).set_alias(f"tag{i}", 1, reason=f"w{i}"))
    assert not any(isinstance(r, Exception) for r in results), results
    current = registry.aliases()
    assert current.aliases == {f"tag{i}": 1 for i in range(6)}  # no write lost another's
    assert current.revision == 6
    history = registry.history()
    assert [e["revision"] for e in history] == [1, 2, 3, 4, 5, 6]
    assert sorted(e["alias"] for e in history) == [f"tag{i}" for i in range(6)]


def test_promote_and_rollback_walk_the_champions_back(where):
    url, checkpoint = where
    registry = ModelRegistry.create(url)
    for run in ("n1", "n2", "n3"):
        registry.register(checkpoint, run_name=run, record=_record())
    for number in (1, 2, 3):
        registry.promote(number)
    assert registry.resolve("champion")["version"] == 3
    assert registry.rollback()["version"] == 2
    assert registry.resolve("champion")["version"] == 2
    registry.promote(3)
    assert registry.rollback()["version"] == 2
    assert registry.rollback()["version"] == 1
    with pytest.raises(UserError, match="no earlier version to roll back to"):
        registry.rollback()
    actions = [(e["action"], e["version"]) for e in registry.history()]
    assert actions == [("promote", 1), ("promote", 2), ("promote", 3), ("rollback", 2),
                       ("promote", 3), ("rollback", 2), ("rollback", 1)]


def test_an_interrupted_registration_leaves_no_version_and_no_alias_moved(where):
    url, checkpoint = where
    registry = ModelRegistry.create(url)
    registry.register(checkpoint, run_name="old", record=_record())
    registry.promote(1)

    def fail_after_first_file(name: str) -> None:
        raise OSError(f"connection lost after {name}")

    with pytest.raises(OSError, match="connection lost"):
        registry.register(checkpoint, run_name="new", record=_record(),
                          after_copy=fail_after_first_file)
    # Part of the checkpoint was copied, but no version names it and the champion stays.
    assert storage.list_files(storage.join(url, "checkpoints", "new")) == ["history.json"]
    assert registry.versions() == [1]
    assert registry.find_run("new") is None
    assert registry.aliases().aliases == {"champion": 1}
    version, created = registry.register(checkpoint, run_name="new", record=_record())
    assert created and version["version"] == 2
    assert len(storage.list_files(version["checkpoint"])) == 3


def test_a_missed_history_entry_is_written_by_the_next_change(tmp_path):
    url = str(tmp_path / "registry")
    checkpoint = _small_checkpoint(tmp_path)
    registry = ModelRegistry.create(url)
    registry.register(str(checkpoint), run_name="a", record=_record())
    registry.promote(1)
    # A writer that stopped between the alias and its log entry leaves the log one behind.
    (tmp_path / "registry" / "history" / "000001.json").unlink()
    registry.set_alias("staging", 1)
    assert [e["revision"] for e in registry.history()] == [1, 2]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "composeae.cli", "registry", *args],
                          capture_output=True, text=True, timeout=120)


def test_bad_registry_input_is_one_line(tmp_path):
    missing = _cli("ls", str(tmp_path / "nowhere"))
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"error: no model registry at {tmp_path / 'nowhere'} (registry.json not found); the "
        f"nightly job creates one on its first night"]

    url = str(tmp_path / "registry")
    checkpoint = _small_checkpoint(tmp_path)
    registry = ModelRegistry.create(url)
    registry.register(str(checkpoint), run_name="a", record=_record())
    no_version = _cli("show", url, "7")
    assert no_version.returncode == 2
    assert no_version.stderr.strip().splitlines() == [f"error: registry {url} has no version 7"]

    (Path(url) / "aliases.json").write_text('{"revision": 3, "aliases": {"champion": "x"')
    corrupt = _cli("ls", url)
    assert corrupt.returncode == 2
    lines = corrupt.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {url}/aliases.json is corrupt")
    assert "Traceback" not in corrupt.stderr


def test_registry_commands_list_promote_alias_and_roll_back(tmp_path):
    url = str(tmp_path / "registry")
    checkpoint = _small_checkpoint(tmp_path)
    registry = ModelRegistry.create(url)
    for run, score in (("nightly-2026-11-27", 0.40), ("nightly-2026-11-28", 0.45)):
        registry.register(str(checkpoint), run_name=run, record=_record(score))
    assert _cli("promote", url, "1").stdout.strip() == "champion -> version 1 (was None)"
    assert _cli("promote", url, "v2").stdout.strip() == "champion -> version 2 (was 1)"
    assert _cli("alias", url, "staging", "champion").stdout.strip() == \
        "staging -> version 2 (was None)"
    listing = _cli("ls", url).stdout.splitlines()
    assert listing[0].startswith(f"registry {url}: 2 version(s); champion -> 2, staging -> 2")
    row = next(line for line in listing if line.lstrip().startswith("2 "))
    assert "45.00" in row and "champion,staging" in row
    assert _cli("rollback", url).stdout.strip() == "champion -> version 1 (rolled back from 2)"
    shown = json.loads(_cli("show", url, "champion").stdout)
    assert shown["version"] == 1 and shown["aliases"] == ["champion"]
    assert _cli("alias", url, "staging", "--delete").stdout.strip() == \
        "staging deleted (was version 2)"
    history = _cli("history", url).stdout.splitlines()
    assert [line.split()[2] for line in history] == ["promote", "promote", "alias", "rollback",
                                                     "delete"]


def test_promotions_racing_with_one_expectation_leave_exactly_one_winner(where):
    from composeae.registry.store import AliasMoved

    url, checkpoint = where
    registry = ModelRegistry.create(url)
    for run in ("n1", "n2", "n3", "n4"):
        registry.register(checkpoint, run_name=run, record=_record())
    registry.promote(1)
    # Three writers that all read champion -> 1: a promotion to 2, one to 3, and a rollback
    # (which expects 1 too); the alias's compare-and-swap lets exactly one through.
    work = [lambda: ModelRegistry(url).promote(2, expect=1),
            lambda: ModelRegistry(url).promote(3, expect=1),
            lambda: ModelRegistry(url).set_alias("champion", 4, action="promote", expect=1)]
    results = _race(3, lambda i: work[i]())
    winners = [r for r in results if isinstance(r, dict)]
    losers = [r for r in results if isinstance(r, AliasMoved)]
    assert len(winners) == 1 and len(losers) == 2, results
    won = winners[0]["version"]
    assert registry.aliases().aliases["champion"] == won
    for lost in losers:
        assert (lost.expected, lost.actual) == (1, won)
        assert str(lost) == (f"alias 'champion' is at version {won}, not the expected version "
                             f"1: it changed since it was read; nothing was changed")
    # A rollback expecting the old champion loses to the promotion that moved it.
    with pytest.raises(AliasMoved, match="not the expected version 1"):
        registry.rollback(expect=1)
    assert registry.rollback(expect=won)["version"] == 1
    with pytest.raises(AliasMoved, match="is at no version"):
        registry.promote(2, alias="staging", expect=1)
    assert registry.promote(2, alias="staging", expect=None)["previous"] is None
    assert [e["version"] for e in registry.history()] == [1, won, 1, 2]


def test_promote_and_rollback_commands_check_their_expectation(tmp_path, capsys):
    from composeae.cli import main

    url = str(tmp_path / "registry")
    registry = ModelRegistry.create(url)
    for run in ("a", "b"):
        registry.register(str(_small_checkpoint(tmp_path / run)), run_name=run,
                          record=_record())
    assert main(["registry", "promote", url, "1", "--expect", "none"]) == 0
    assert main(["registry", "promote", url, "2", "--expect", "none"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: alias 'champion' is at version 1, not the expected no version (it is not set): "
        "it changed since it was read; nothing was changed"]
    assert main(["registry", "promote", url, "2", "--expect", "1"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "champion -> version 2 (was 1)"
    assert main(["registry", "rollback", url, "--expect", "1"]) == 2
    assert main(["registry", "rollback", url, "--expect", "x"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == \
        "error: --expect must be a version number, got 'x'"
    assert registry.aliases().aliases == {"champion": 2}


def test_registry_add_registers_a_checkpoint_once_and_refuses_promote_without_data(
        tmp_path, css_tiny, capsys):
    from composeae.cli import main
    from composeae.testing.checkpoints import random_checkpoint

    url = str(tmp_path / "registry")
    checkpoint = random_checkpoint(css_tiny, tmp_path / "ckpt")
    assert main(["registry", "add", url, "--checkpoint", checkpoint, "--promote"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --promote needs --data: the service follows the alias, so the version's index "
        "is built before the alias moves"]
    assert main(["registry", "add", url, "--checkpoint", str(tmp_path / "none")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    for verb in ("added as", "already registered as"):
        assert main(["registry", "add", url, "--checkpoint", f"{checkpoint}/model.pt"]) == 0
        assert capsys.readouterr().out.splitlines() == [
            f"{checkpoint} {verb} version 1 (composeae; no evaluation table (no run "
            f"metrics.json beside the checkpoint))"]
    record = ModelRegistry.open(url).version(1)
    assert record["config"]["data"]["url"] == css_tiny and record["run_url"] is None
    assert len(record["data"]["fingerprint"]) == 64 and ModelRegistry(url).aliases().aliases == {}


def test_the_nightly_promotes_only_over_the_champion_it_compared_against(tmp_path, caplog):
    """A hand promotion made while the night trained stands: the night registers its version
    but does not move the alias (nor build its index), and says so in one line."""
    from composeae.config import load_config
    from composeae.nightly.flow import _finish

    url = str(tmp_path / "registry")
    cfg = load_config(str(Path(__file__).resolve().parents[1] / "jobs/configs/tiny.yaml"),
                      [f"nightly.registry={url}"])
    registry = ModelRegistry.create(url)
    table = {"test/R@1": 0.3}
    for run in ("a", "b"):
        registry.register(str(_small_checkpoint(tmp_path / run)), run_name=run,
                          record=_record())
    registry.promote(1)
    night = {"date": "2026-12-03", "model": "composeae",
             "evaluation": {"split": "test", "table": table}, "data": {"fingerprint": "f"},
             "run_url": "-", "code_version": "-",
             "decision": {"alias": "champion", "promote": True, "reason": "beat it",
                          "metric": "test/R@1", "margin": 0.0, "champion": 1,
                          "champion_table": {"test/R@1": 0.2}}}
    version, _ = registry.register(str(_small_checkpoint(tmp_path / "night")),
                                   run_name="nightly-2026-12-03", record=night)
    registry.promote(2, reason="by hand, during the night")
    with caplog.at_level("WARNING", logger="composeae.nightly.flow"):
        done = _finish(registry, cfg, "2026-12-03", version, created=True)
    assert done.status == "kept"
    assert done.reason == ("beat it, but champion moved to 2 since the comparison with 1: "
                           "not promoted")
    assert registry.aliases().aliases == {"champion": 2}
    assert not storage.exists(storage.join(url, "indexes", "000003", "manifest.json"))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["nightly 2026-12-03: version 3 not promoted: champion changed under the "
                        "night (alias 'champion' is at version 2, not the expected version 1: "
                        "it changed since it was read; nothing was changed)"]
