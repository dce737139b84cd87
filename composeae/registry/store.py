"""The model registry: trained models as numbered versions in object storage, with aliases.

Not to be confused with the model zoo (`composeae.models.zoo`), which maps architecture names to
classes: this registry holds *trained* models, the nightly job's champion among them. It is a
prefix (a local directory or `s3://bucket/prefix`), no server:

    registry.json                   format marker, written once when the registry is created
    claims/<run>.json               who registers a run (exclusive create; one writer a run), then
                                    the version number it got
    checkpoints/<run>/model.pt ...  each version's copied checkpoint (copied before it registers)
    versions/000001/version.json    one version, written whole by an exclusive create, never changed
    aliases.json                    {"revision", "aliases": {"champion": 3}, "stack", "event"}
    history/000007.json             one object per aliases revision: promote / rollback / alias

A version is visible only once its `version.json` exists, and that object is written after the
checkpoint copy completes, so an interrupted registration leaves no version and no alias moves.
Exclusive creates (`If-None-Match: *` on S3, a hard link locally) make both races safe: writers
of the same run (two nightly jobs for one date) take turns through the run's claim, so the
second finds the first's version and returns it instead of registering twice; writers of
different runs racing for number N get one winner, and the other takes N + 1.

`aliases.json` is the one mutable object. It is replaced whole by compare-and-swap (`If-Match`
on its ETag on S3, a locked check-and-rename locally), so readers never see a torn pointer and
two writers never lose each other's change. It carries, per alias, the stack of its earlier
values (what `rollback` returns to) and the event of its latest revision; that event is then
logged as `history/<revision>.json` (exclusive create), and any later writer that finds the log
one behind writes the missing entry, so the history cannot silently lose a promotion.

A change may name the version it expects the alias to hold (`expect=`): the check runs inside the
compare-and-swap, against the very revision it replaces, so of two writers that both expected
version 3 exactly one moves the alias and the other gets `AliasMoved` saying where it is now.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

from composeae import storage
from composeae.errors import UserError

log = logging.getLogger(__name__)

FORMAT = 1
MARKER = "registry.json"
ALIASES = "aliases.json"
VERSION_FILE = "version.json"
CLAIM_LEASE_S = 600.0
"""How long a run's claim holds off other writers without its version appearing (copying a
checkpoint takes far less); after it, the claim's writer is taken to have died. A writer that
fails (an exception, not a kill) removes its claim at once."""
_ALIAS_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")


class _Anything:
    def __repr__(self) -> str:
        return "ANY"


ANY: Any = _Anything()
"""`expect=ANY` (the default): change the alias whatever it holds. `expect=None`: only while the
alias does not exist. `expect=N`: only while it holds version N."""


class AliasMoved(UserError):
    """An alias change whose expectation no longer holds: someone else moved the alias first."""

    def __init__(self, alias: str, expected: int | None, actual: int | None):
        self.alias, self.expected, self.actual = alias, expected, actual
        super().__init__(f"alias {alias!r} is at {_describe(actual)}, not the expected "
                         f"{_describe(expected)}: it changed since it was read; nothing was "
                         f"changed")


def _describe(version: int | None) -> str:
    return "no version (it is not set)" if version is None else f"version {version}"


def _check_expected(current: "Aliases", alias: str, expect: Any) -> None:
    if expect is not ANY and current.aliases.get(alias) != expect:
        raise AliasMoved(alias, expect, current.aliases.get(alias))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _dumps(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8")


@dataclass(frozen=True)
class Aliases:
    """A parsed `aliases.json` and the tag that a compare-and-swap needs."""
    revision: int
    aliases: dict[str, int]
    stack: dict[str, list[int]]
    """Per alias, the versions it pointed at before, oldest first (what `rollback` pops)."""
    event: dict[str, Any] | None
    tag: str | None


class ModelRegistry:
    """A registry at `url`. `ModelRegistry.open` for one that must exist (the CLI);
    `ModelRegistry.create` for the nightly job, which creates it on its first night."""

    def __init__(self, url: str):
        self.url = url.rstrip("/") if storage.is_s3(url) else url

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, url: str) -> "ModelRegistry":
        registry = cls(url)
        try:
            registry._check_marker()
        except FileNotFoundError:
            raise UserError(f"no model registry at {url} ({MARKER} not found); the nightly job "
                            f"creates one on its first night") from None
        return registry

    @classmethod
    def create(cls, url: str) -> "ModelRegistry":
        """Open the registry at `url`, creating it when there is none."""
        registry = cls(url)
        storage.create_exclusive(registry._path(MARKER),
                                 _dumps({"format": FORMAT, "created": _now()}))
        registry._check_marker()
        return registry

    def _check_marker(self) -> None:
        marker = self._read_json(self._path(MARKER))
        if not isinstance(marker, dict) or marker.get("format") != FORMAT:
            raise UserError(f"{self._path(MARKER)} is not a composeae model registry marker "
                            f"(format {FORMAT})")

    def _path(self, *names: str) -> str:
        return storage.join(self.url, *names)

    def _read_json(self, url: str) -> Any:
        try:
            return json.loads(storage.read_text(url))
        except json.JSONDecodeError as exc:
            raise UserError(f"{url} is corrupt (not valid JSON: {exc})") from None

    # -- versions --------------------------------------------------------------------------------
    def versions(self) -> list[int]:
        """Registered version numbers, ascending (a number without its version.json is not)."""
        numbers = [int(n) for n in storage.listdir(self._path("versions")) if n.isdigit()]
        return [n for n in sorted(numbers) if storage.exists(self._version_path(n))]

    def _version_path(self, number: int) -> str:
        return self._path("versions", f"{number:06d}", VERSION_FILE)

    def version(self, number: int) -> dict[str, Any]:
        url = self._version_path(number)
        if not storage.exists(url):
            raise UserError(f"registry {self.url} has no version {number}")
        return self._read_json(url)

    def resolve(self, ref: str | int) -> dict[str, Any]:
        """A version by number (`3`, `v3`) or alias (`champion`)."""
        text = str(ref)
        if re.fullmatch(r"v?\d+", text):
            return self.version(int(text.lstrip("v")))
        aliases = self.aliases().aliases
        if text not in aliases:
            known = ", ".join(sorted(aliases)) or "none yet"
            raise UserError(f"registry {self.url} has no alias {text!r} (aliases: {known})")
        return self.version(aliases[text])

    def find_run(self, run_name: str) -> dict[str, Any] | None:
        """The version registered from run `run_name`, if any.

        Every registration goes through the run's claim, and its writer records the version
        number there once the version exists: no claim is no version (one request), a claim
        with a number names it. Only a claim without a number (a registration in flight, or a
        writer killed in between) needs the scan of every version."""
        claim = self._read_claim(run_name)[0]
        if claim is None:
            return None
        if "version" in claim:
            return self.version(int(claim["version"]))
        for number in reversed(self.versions()):
            record = self.version(number)
            if record.get("run_name") == run_name:
                return record
        return None

    def _read_claim(self, run_name: str) -> tuple[dict[str, Any] | None, str | None]:
        data, tag = storage.read_tagged(self._claim_path(run_name))
        if data is None:
            return None, None
        try:
            claim = json.loads(data)
            return (claim if isinstance(claim, dict) else {}), tag
        except ValueError:
            return {}, tag  # an unreadable claim claims nothing: it can be taken over

    def register(self, checkpoint_url: str, *, run_name: str, record: dict[str, Any],
                 after_copy: Callable[[str], None] | None = None) -> tuple[dict[str, Any], bool]:
        """Copy the checkpoint into the registry, then claim the next version number for it.

        `record` adds fields (config, evaluation, data fingerprint, ...). Returns (version,
        created): a run already registered returns its version and False, whoever registered it,
        so a re-run night or a racing second writer never makes a second version. Writers of
        one run take turns through a claim object (`claims/<run>.json`, exclusive create): the
        others wait for the holder's version; a claim older than `CLAIM_LEASE_S` with no version
        (its writer died) is taken over.
        """
        existing = self._claim(run_name)
        if existing is not None:
            return existing, False
        try:
            copy_url = self._path("checkpoints", run_name)
            files = storage.copy_tree(checkpoint_url, copy_url, after_each=after_copy)
            if not files:
                raise UserError(f"no checkpoint files under {checkpoint_url}")
            while True:
                number = (self.versions() or [0])[-1] + 1
                version = dict(record, version=number, run_name=run_name, checkpoint=copy_url,
                               source_checkpoint=checkpoint_url, registered=_now())
                # Another run's writer may take this number first: then try the next one.
                if storage.create_exclusive(self._version_path(number), _dumps(version)):
                    break
        except BaseException:
            # Failed, not killed: let the next writer of this run go ahead at once.
            storage.remove(self._claim_path(run_name))
            raise
        # The version exists: the claim now names it (a writer killed before this leaves a
        # claim without a number, and `find_run` scans the versions for it instead).
        storage.write_bytes(self._claim_path(run_name),
                            _dumps({"version": number, "time": time.time()}))
        return version, True

    def _claim_path(self, run_name: str) -> str:
        return self._path("claims", f"{run_name}.json")

    def _claim(self, run_name: str) -> dict[str, Any] | None:
        """Hold the right to register `run_name`, or return its version once another writer
        has registered it."""
        url = self._claim_path(run_name)
        mine = _dumps({"token": uuid.uuid4().hex, "time": time.time()})
        deadline = time.monotonic() + CLAIM_LEASE_S + 60
        waiting = False
        while time.monotonic() < deadline:
            if storage.create_exclusive(url, mine):
                return None
            claim, tag = self._read_claim(run_name)
            if claim is None:
                continue  # removed by a writer that failed: try again at once
            if "version" in claim:
                return self.version(int(claim["version"]))
            try:
                held_since = float(claim["time"])
            except (ValueError, KeyError, TypeError):
                held_since = 0.0  # an unreadable claim is no claim
            if time.time() - held_since > CLAIM_LEASE_S:
                existing = self.find_run(run_name)  # killed after its version, before the claim
                if existing is not None:
                    return existing
                if storage.replace_if(url, mine, tag):
                    return None  # its writer died before registering
            if not waiting:
                waiting = True
                log.info("run %s is being registered by another writer (claim %s); waiting "
                         "for its version", run_name, url)
            time.sleep(0.2)
        raise RuntimeError(f"run {run_name} is claimed at {url} but was never registered")

    # -- aliases ---------------------------------------------------------------------------------
    def aliases(self) -> Aliases:
        url = self._path(ALIASES)
        data, tag = storage.read_tagged(url)
        if data is None:
            return Aliases(revision=0, aliases={}, stack={}, event=None, tag=None)
        try:
            raw = json.loads(data)
            aliases = {str(k): int(v) for k, v in raw["aliases"].items()}
            stack = {str(k): [int(x) for x in v] for k, v in raw.get("stack", {}).items()}
            return Aliases(revision=int(raw["revision"]), aliases=aliases, stack=stack,
                           event=raw.get("event"), tag=tag)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"{url} is corrupt ({type(exc).__name__}: {exc}); the registry's "
                            f"history/ holds every revision to restore it from") from None

    def _update(self, change: Callable[[Aliases], tuple[dict[str, int], dict[str, list[int]],
                                                           dict[str, Any]]]) -> dict[str, Any]:
        """Apply `change(current) -> (aliases, stack, event)` by compare-and-swap, retrying when
        another writer got in first; then log the event. Returns the event."""
        for _ in range(50):
            current = self.aliases()
            self._log_event(current)  # repair: the previous writer may have stopped before it
            aliases, stack, event = change(current)
            revision = current.revision + 1
            event = dict(event, revision=revision, time=_now())
            body = {"revision": revision, "aliases": aliases,
                    "stack": {k: v for k, v in stack.items() if v}, "event": event}
            if storage.replace_if(self._path(ALIASES), _dumps(body), current.tag):
                self._log_event(Aliases(revision, aliases, stack, event, None))
                return event
            time.sleep(0.05)
        raise RuntimeError(f"could not update {self._path(ALIASES)}: too many concurrent writers")

    def _log_event(self, current: Aliases) -> None:
        if current.event is not None:
            storage.create_exclusive(self._path("history", f"{current.revision:06d}.json"),
                                     _dumps(current.event))

    def set_alias(self, name: str, number: int, *, action: str = "alias", reason: str = "",
                  expect: Any = ANY) -> dict[str, Any]:
        """Point alias `name` at version `number` (its previous value goes on its stack), only
        while it holds `expect` (see `ANY`); `AliasMoved` otherwise."""
        if not _ALIAS_NAME.fullmatch(name):
            raise UserError(f"alias {name!r} must be a name (letters, digits, '_.-')")
        self.version(number)  # an unknown version fails here, before anything is written

        def change(current: Aliases):
            _check_expected(current, name, expect)
            aliases, stack = dict(current.aliases), {k: list(v) for k, v in current.stack.items()}
            previous = aliases.get(name)
            if previous is not None and previous != number:
                stack.setdefault(name, []).append(previous)
            aliases[name] = number
            return aliases, stack, {"action": action, "alias": name, "version": number,
                                    "previous": previous, "reason": reason}
        return self._update(change)

    def promote(self, number: int, *, alias: str = "champion", reason: str = "",
                expect: Any = ANY) -> dict[str, Any]:
        return self.set_alias(alias, number, action="promote", reason=reason, expect=expect)

    def rollback(self, alias: str = "champion", *, reason: str = "",
                 expect: Any = ANY) -> dict[str, Any]:
        """Point `alias` back at the version it held before its latest change, only while it
        holds `expect` (see `ANY`)."""
        def change(current: Aliases):
            if alias not in current.aliases:
                raise UserError(f"registry {self.url} has no alias {alias!r} to roll back")
            _check_expected(current, alias, expect)
            stack = {k: list(v) for k, v in current.stack.items()}
            if not stack.get(alias):
                raise UserError(f"alias {alias!r} has no earlier version to roll back to "
                                f"(it is at version {current.aliases[alias]})")
            aliases = dict(current.aliases)
            previous, aliases[alias] = aliases[alias], stack[alias].pop()
            return aliases, stack, {"action": "rollback", "alias": alias,
                                    "version": aliases[alias], "previous": previous,
                                    "reason": reason}
        return self._update(change)

    def delete_alias(self, name: str, *, reason: str = "") -> dict[str, Any]:
        def change(current: Aliases):
            if name not in current.aliases:
                raise UserError(f"registry {self.url} has no alias {name!r}")
            aliases = dict(current.aliases)
            previous = aliases.pop(name)
            stack = {k: list(v) for k, v in current.stack.items() if k != name}
            return aliases, stack, {"action": "delete", "alias": name, "version": None,
                                    "previous": previous, "reason": reason}
        return self._update(change)

    def history(self) -> list[dict[str, Any]]:
        """Every logged alias event, oldest first."""
        names = [n for n in storage.listdir(self._path("history")) if n.endswith(".json")]
        return [self._read_json(self._path("history", n)) for n in sorted(names)]

    # -- reports ---------------------------------------------------------------------------------
    def report_url(self, name: str | None = None) -> str:
        """The nightly reports' prefix, or one report in it."""
        return self._path("reports", name) if name else self._path("reports")
