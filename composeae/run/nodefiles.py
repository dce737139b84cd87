"""Files a model opens on every node: `model.image_weights` and `model.bert_path`.

Both are opened where the model is built: on each Ray Train worker, on the driver (the BERT
tokenizer) and wherever a checkpoint is loaded. So each must exist on every node, either as a
local path there or as an `s3://` URL that this module fetches once per node:

- `resolve_local(url, key)` returns a local path for `url`. A local path comes back unchanged
  after checking it exists (a file for `model.image_weights`, a directory for `model.bert_path`).
  An `s3://` URL is an object (a state-dict file) or a prefix (a `save_pretrained` directory);
  it is downloaded into the node's cache, `COMPOSEAE_CACHE_DIR` or `~/.cache/composeae/files`.
- `check_node_files(cfg)` is the driver's pre-flight check: one tiny Ray task per alive node
  resolves each configured file there, so a path missing on one node fails the job before
  training starts, in one line naming the key and the nodes, instead of inside a worker later.
  `missing_on_nodes(paths)` does the same for other local inputs read in place on each node
  (a dataset directory, a checkpoint), without downloading anything.

Cache layout: `<cache>/<hash of url>-<name>/<hash of version>/...`, the version being the
object's ETag and size (for a prefix, those of every object under it), so a changed object is
fetched again and the previous version is removed. A version directory appears by one atomic
rename once every file in it is complete and its size matches the object's ContentLength, so
nobody sees half a download. Processes of one node that ask at once serialize on an `flock`ed
lock file per URL: one downloads, the others find its result. The cache must be on a local
filesystem (flock is not reliable over NFS).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import socket
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from composeae import storage
from composeae.errors import UserError

if TYPE_CHECKING:
    from composeae.config import Config

CACHE_ENV = "COMPOSEAE_CACHE_DIR"
DEFAULT_CACHE = "~/.cache/composeae/files"

# Config keys naming files that must exist on every node, and what each must be.
NODE_FILE_KEYS = {"model.image_weights": "file", "model.bert_path": "directory"}

# Copy buffer for downloads: model files are tens to hundreds of MB.
_CHUNK = 1 << 20


class MissingNodeFile(UserError):
    """A configured file or directory (local or `s3://`) does not exist as seen from this node."""


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def node_name() -> str:
    """This machine as people find it in the Ray dashboard: hostname, plus its IP inside Ray."""
    host = socket.gethostname()
    # Only asks Ray when the process already uses it: models and the CLI must not import Ray.
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return f"{host} ({ray.util.get_node_ip_address()})"
    return host


def resolve_local(url: str, key: str) -> str:
    """A local path holding `url` on this node: the path itself, or the cached `s3://` download.

    `key` is the config key the value came from; it names the problem in errors and says what
    the value must be (a file or a directory, see `NODE_FILE_KEYS`; for another key, whichever
    exists). Missing: `MissingNodeFile`, a `UserError` naming the key and this node.
    """
    kind = NODE_FILE_KEYS.get(key)
    if storage.is_s3(url):
        try:
            return _resolve_s3(url, key, kind)
        except MissingNodeFile:
            raise
        except UserError as exc:  # no bucket, no credentials, access denied: name key and node
            raise UserError(f"{key}: {exc} (on node {node_name()})") from None
    path = Path(url)
    if not path.exists():
        raise MissingNodeFile(f"{key}: {url} does not exist on node {node_name()}")
    if kind == "file" and not path.is_file() or kind == "directory" and not path.is_dir():
        raise UserError(f"{key}: {url} is not a {kind} on node {node_name()}")
    return url


# ---------------------------------------------------------------------------------------------
# s3:// downloads


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _list_objects(url: str) -> list[tuple[str, str, int]]:
    """(path relative to `url`, ETag, size) of every object under the prefix `url`, recursively.

    `storage.listdir` lists one level and only names; a `save_pretrained` directory needs every
    object's ETag and size to key the cache and check the download, so this lists them here.
    """
    bucket, key = storage.split_s3(url)
    prefix = f"{key}/" if key else ""
    found = []
    with storage._s3_errors(url):
        for page in storage.s3_client().get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix):]
                if not rel or rel.endswith("/"):
                    continue  # "directory" marker objects some tools create
                parts = rel.split("/")
                if any(p in ("", ".", "..") for p in parts):
                    # Such a key would land outside (or ambiguously inside) the cache directory.
                    raise UserError(f"{url}: object key {obj['Key']!r} cannot be a file name")
                found.append((rel, obj["ETag"], int(obj["Size"])))
    return sorted(found)


def _head(url: str) -> tuple[str, int] | None:
    """(ETag, ContentLength) of the object at `url`, or None when there is none."""
    bucket, key = storage.split_s3(url)
    try:
        with storage._s3_errors(url):
            head = storage.s3_client().head_object(Bucket=bucket, Key=key)
    except FileNotFoundError:
        storage._check_bucket(url)  # a missing bucket is its own, clearer error
        return None
    return head["ETag"], int(head["ContentLength"])


def _resolve_s3(url: str, key: str, kind: str | None) -> str:
    url = url.rstrip("/")
    # What is there now decides the version: one HEAD (or LIST) per call, never a GET when the
    # cached copy is current.
    objects: list[tuple[str, str, int]] = []
    head = _head(url) if kind != "directory" and storage.split_s3(url)[1] else None
    if head is not None:
        objects = [(url.rsplit("/", 1)[-1], *head)]
    elif kind != "file":
        objects = _list_objects(url)
        if not objects:
            storage._check_bucket(url)
    if not objects:
        raise MissingNodeFile(f"{key}: {url} does not exist on node {node_name()}")

    is_file = head is not None
    # The URL's last component keeps the cache readable; the hash keeps it unique.
    entry = cache_dir() / f"{_digest(url)}-{url.rsplit('/', 1)[-1][:64]}"
    version = entry / _digest("\n".join(f"{rel} {etag} {size}" for rel, etag, size in objects))
    if not version.is_dir():  # renamed into place only when complete: existing means usable
        with _lock(entry.with_name(entry.name + ".lock")):
            if not version.is_dir():  # another process may have finished while we waited
                _download(url, objects, entry, version, key, is_file)
    return str(version / objects[0][0]) if is_file else str(version)


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive lock shared by every process of this node (held until the block ends)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # The lock file is never deleted: removing it while another process waits on it would let a
    # third process lock a new file of the same name, and two downloads would run at once.
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download(url: str, objects: list[tuple[str, str, int]], entry: Path, version: Path,
              key: str, is_file: bool) -> None:
    """Fetch `objects` into a temporary directory, check sizes, rename it to `version`.

    Called with the URL's lock held, so temporary directories left by a killed process and
    versions older than this one can be removed without racing anyone.
    """
    entry.mkdir(parents=True, exist_ok=True)
    for stale in entry.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = entry / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        for rel, _, size in objects:
            source = url if is_file else storage.join(url, rel)
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            # storage.open_read resumes a body that breaks mid-transfer with a ranged GET.
            with storage.open_read(source) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)
                got = out.tell()
            if got != size:
                # The object was replaced between listing and reading, or the transfer was cut.
                raise OSError(f"{key}: downloaded {got} bytes of {source} on node {node_name()}, "
                              f"but its ContentLength is {size}; nothing was cached, try again")
        os.rename(tmp, version)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in entry.iterdir():
        if old != version and old.is_dir() and not old.name.startswith(".tmp-"):
            shutil.rmtree(old, ignore_errors=True)  # a superseded version of the same URL


# ---------------------------------------------------------------------------------------------
# The driver's pre-flight checks


def configured_node_files(cfg: "Config") -> list[tuple[str, str]]:
    """(key, value) of every node file `cfg` sets."""
    values = {key: getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1])
              for key in NODE_FILE_KEYS}
    return [(key, value) for key, value in values.items() if value]


def _on_every_node(fn: Callable[[Any], Any], arg: Any,
                   timeout_s: float) -> tuple[dict[str, Any], list[str]]:
    """Run `fn(arg)` once on every alive node of the connected Ray cluster.

    Returns ({node: result}, [one line per node where it could not run]); a node is named
    "hostname (IP)", as the Ray dashboard lists it.
    """
    import ray  # deferred: Ray takes seconds to import; models and the CLI must not need it
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not ray.is_initialized():
        # ray.remote would otherwise start (or join) a Ray instance of its own choosing.
        raise RuntimeError("node checks run after ray.init")
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    # num_cpus=0: the check must run even on a node whose CPUs are all held by a running job,
    # and on nodes that offer no CPU to tasks at all (a head node started with --num-cpus=0).
    task = ray.remote(num_cpus=0, max_retries=0)(fn)
    refs = {task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
                n["NodeID"], soft=False)).remote(arg):
            f"{n['NodeManagerHostname']} ({n['NodeManagerAddress']})" for n in nodes}
    results: dict[str, Any] = {}
    errors: list[str] = []
    ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    for ref in ready:
        try:
            results[refs[ref]] = ray.get(ref)
        except Exception as exc:  # the node died, or its worker could not start
            errors.append(f"could not check node {refs[ref]}: {type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:300]}")
    for ref in pending:
        ray.cancel(ref, force=True)
        errors.append(f"node {refs[ref]} did not finish its check in {timeout_s:.0f} s")
    return results, errors


def _check_this_node(files: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """Run on one node: (key, "ok" | "missing" | "error", message) for each file."""
    results = []
    for key, value in files:
        try:
            resolve_local(value, key)  # for s3://, this also warms the node's cache
            results.append((key, "ok", ""))
        except MissingNodeFile as exc:
            results.append((key, "missing", str(exc)))
        except (UserError, OSError) as exc:
            results.append((key, "error", " ".join(str(exc).split())))
    return results


def check_node_files(cfg: "Config", timeout_s: float = 1800.0) -> None:
    """Check on every alive node of the connected Ray cluster that each configured file exists.

    Call it on the driver after `ray.init` and before training starts. For an `s3://` URL the
    node downloads it into its cache (so workers then find it there), which also checks the
    node's credentials and endpoint. Raises one `UserError` naming every failing key and node.
    Does no Ray work when neither `model.image_weights` nor `model.bert_path` is set.
    """
    files = configured_node_files(cfg)
    if not files:
        return
    by_node, errors = _on_every_node(_check_this_node, files, timeout_s)
    missing: dict[str, list[str]] = {key: [] for key, _ in files}
    for node, results in by_node.items():
        for key, status, message in results:
            if status == "missing":
                missing[key].append(node)
            elif status == "error":
                errors.append(message)
    values = dict(files)
    problems = [f"{key}: {values[key]} does not exist on node{'s' if len(where) > 1 else ''} "
                f"{', '.join(sorted(where))}" for key, where in missing.items() if where]
    if problems or errors:
        raise UserError("; ".join(problems + errors))


def _only_this_machine(nodes: list[dict]) -> bool:
    import ray  # deferred: see _on_every_node

    here = ray.util.get_node_ip_address()
    return all(n["NodeManagerAddress"] == here for n in nodes if n.get("Alive"))


def _missing_here(paths: dict[str, str]) -> list[str]:
    return [what for what, path in paths.items()
            if not storage.is_s3(path) and not os.path.exists(path)]


def missing_on_nodes(paths: dict[str, str], timeout_s: float = 300.0) -> dict[str, list[str]]:
    """{what: local path} -> {what: [nodes where that path does not exist]}, only for the
    paths missing somewhere (empty when every path exists on every alive node).

    For inputs read in place on each node (a dataset directory, a checkpoint), nothing is
    downloaded; `s3://` URLs are the same from every node and are not checked here. Raises
    `UserError` when a node cannot run the check. No Ray work when `paths` is empty.
    """
    if not paths:
        return {}
    import ray  # deferred: see _on_every_node

    if ray.is_initialized() and _only_this_machine(ray.nodes()):
        # The embedded Ray (or a one-node cluster here): this process sees what the node sees,
        # so no task needs to start.
        return {what: [node_name()] for what in _missing_here(dict(paths))}
    by_node, errors = _on_every_node(_missing_here, dict(paths), timeout_s)
    if errors:
        raise UserError("; ".join(errors))
    missing: dict[str, list[str]] = {}
    for node in sorted(by_node):
        for what in by_node[node]:
            missing.setdefault(what, []).append(node)
    return missing
