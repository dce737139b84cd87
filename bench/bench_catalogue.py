"""Search at catalogue scale, side by side in one run: a sharded exact gallery of 10M x 512
rows (alone and behind the service), approximate indexes on a trained model's 208,000-image
CSS-synth gallery and on 1M synthetic rows, and the service with and without batched queries.

* sharded: --sharded-rows synthetic unit rows x 512 written block by block as float16 into an
  index folder (10M: 10 GB on disk; kept in --work and reused), served by --shards
  `GalleryShard` actors mapping their blocks (`mmap`: the page cache holds them). Queries/s of
  the fan-out and merge at batch 64, of each shard alone, the merge's own cost, each shard
  process's peak resident memory (VmHWM); and, on the first --equal-rows rows (a gallery one
  process holds), the sharded top 10 against one process's `search.top_k`.
* service: the same rows behind the HTTP service (`composeae.serve.app` with --shards
  memory-mapped shard actors): a registry whose version is a random model embedding to --dim,
  its index the synthetic rows dressed as an index of --data's gallery (real image pointers,
  cycled, so the service's confinement checks pass and `ref` queries read real images);
  --service-clients clients for --seconds; the replica's and each shard's peak memory.
* ann: the gallery of --data's test split embedded by --checkpoint (`composeae index`, into a
  registry in --work; a no-op when there), --queries of its test queries embedded by the same
  model. Exact `top_k` against `ivf` (IVF --lists, SQ8) and `hnsw` (HNSW32, SQ8) at 4 values of
  `probe` each (re-ranking 4 x k candidates on the stored rows): agreement with the exact top
  10, the composed retrieval's R@1 / R@10 (label-level hits, reference left out, as the
  evaluation counts them), queries/s at batch 64 (median of --reps interleaved rounds over
  --timing-batches batches), build time and bytes per row. The chosen setting: the fastest
  within 0.5 points of exact R@1 and R@10.
* synthetic: the same curves on --synthetic-rows x 512 uniform and clustered rows (no bar).
* batching: the application of `composeae serve` on the ann part's registry (one replica, one
  CPU, exact search) deployed twice side by side, with `batch` 1 and the default (up to 16
  requests, continuous batching); C clients for --seconds on each in turn, --batching-rounds
  rounds: requests/s (median of the rounds), p50 / p99, the batches formed.

--quick: small stand-ins for all four (a minute). Prints tables, then one JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from composeae.serve.ann import AnnSpec, ann_file, ann_top_k, build_ann, load_ann
from composeae.serve.index import read_block_rows, read_manifest
from composeae.serve.search import top_k
from composeae.serve.sharded import ShardedGallery, merge_top_k
from composeae.testing.galleries import synthetic_blocks, unit_rows, write_index

BATCH = 64
K = 10


def median_qps(fns: dict, batches: list[torch.Tensor], reps: int) -> dict[str, float]:
    """Queries/s of each function over `batches`, median of `reps` rounds taking turns (a drift
    in the shared cores' load must not favour whichever runs first)."""
    for fn in fns.values():
        fn(batches[0])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            for q in batches:
                fn(q)
            times[name].append(time.perf_counter() - start)
    total = sum(len(q) for q in batches)
    return {name: total / statistics.median(t) for name, t in times.items()}


def agreement(found: torch.Tensor, exact: torch.Tensor) -> float:
    return float(np.mean([len(set(a) & set(b)) / exact.shape[1]
                          for a, b in zip(found.tolist(), exact.tolist())]))


def in_batches(fn, queries: torch.Tensor, exclude: list | None = None) -> torch.Tensor:
    """The found rows (Q, k) of `fn(batch, exclude of the batch)` over `queries` in batches."""
    return torch.cat([fn(queries[b:b + BATCH], exclude[b:b + BATCH] if exclude else None)[1]
                      for b in range(0, len(queries), BATCH)])


# -- sharded exact search -----------------------------------------------------------------------

def synthetic_gallery(work: Path, rows: int, dim: int) -> tuple[Path, dict, float]:
    """(folder, manifest, seconds spent writing) of --work's synthetic rows x dim index, written
    block by block unless there."""
    folder = work / f"sharded-{rows}x{dim}"
    manifest = read_manifest(str(folder)) if (folder / "manifest.json").exists() else None
    written_s = 0.0
    if manifest is None or manifest["count"] != rows:
        start = time.perf_counter()
        write_index(folder, synthetic_blocks(rows, dim, seed=7), dim)
        written_s = time.perf_counter() - start
        manifest = read_manifest(str(folder))
    return folder, manifest, written_s


def peak_gb(pid: int) -> float:
    """A process's peak resident memory (VmHWM) in GB."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2**20


def sharded_part(work: Path, rows: int, dim: int, shards: int, equal_rows: int,
                 reps: int) -> dict:
    folder, manifest, written_s = synthetic_gallery(work, rows, dim)
    # The first blocks as an index of their own (links, no copy): a gallery one process holds.
    blocks, sub_blocks, held = manifest["blocks"], [], 0
    for b in blocks:
        if held >= equal_rows:
            break
        sub_blocks.append(b)
        held += b["count"]
    sub = work / f"sharded-first-{held}"
    if not (sub / "manifest.json").exists():
        (sub / "blocks").mkdir(parents=True, exist_ok=True)
        for b in sub_blocks:
            for ext in (".npy", ".json"):
                target = sub / "blocks" / (b["name"] + ext)
                if not target.exists():
                    os.symlink(folder / "blocks" / (b["name"] + ext), target)
        (sub / "manifest.json").write_text(json.dumps(dict(manifest, count=held,
                                                           blocks=sub_blocks)))
    queries = torch.from_numpy(unit_rows(np.random.default_rng(3), BATCH, dim))

    # Top 10 on the gallery one process holds: sharded against one process.
    one = torch.from_numpy(np.concatenate([read_block_rows(str(sub), b["name"])
                                           for b in sub_blocks]))  # float16
    expected = top_k(queries, one, K)
    del one
    small = ShardedGallery(str(sub), shards, "mmap", num_cpus=0.5)
    equal = bool(torch.equal(small.top_k(queries, K)[1], expected[1]))
    del small

    start = time.perf_counter()
    gallery = ShardedGallery(str(folder), shards, "mmap", num_cpus=0.5)
    load_s = time.perf_counter() - start
    import ray

    fan_out = median_qps({"all": lambda q: gallery.top_k(q, K)}, [queries], reps)["all"]
    per_shard = []
    for actor in gallery.actors:
        q = queries.numpy()
        ray.get(actor.top_k.remote(q, K, None))
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            ray.get(actor.top_k.remote(q, K, None))
            times.append(time.perf_counter() - start)
        per_shard.append(BATCH / statistics.median(times))
    parts = ray.get([a.top_k.remote(queries.numpy(), K, None) for a in gallery.actors])
    scores = [torch.from_numpy(np.array(s)) for s, _ in parts]
    found = [torch.from_numpy(np.array(r)) for _, r in parts]
    start = time.perf_counter()
    for _ in range(1000):
        merge_top_k(scores, found, K)
    merge_ms = (time.perf_counter() - start)  # per merge: / 1000 * 1000
    memory = gallery.memory()
    return {"rows": rows, "dim": dim, "shards": shards, "write_s": round(written_s, 1),
            "load_s": round(load_s, 1), "qps_fan_out": round(fan_out, 2),
            "qps_per_shard": [round(x, 2) for x in per_shard], "merge_ms": round(merge_ms, 4),
            "shard_rows": [m["rows"] for m in memory],
            "shard_hwm_gb": [round(m["VmHWM"], 3) for m in memory],
            "equal_rows": held, "top10_equal": equal}


def service_part(work: Path, rows: int, dim: int, shards: int, data: str, clients: int,
                 seconds: float) -> dict:
    """The same synthetic gallery behind the HTTP service: a registry whose version 1 is a
    random model embedding to `dim`, its index the synthetic rows dressed as an index of
    `data`'s gallery (`serveable_index`: real image pointers, so `ref` queries work), served
    with `shards` memory-mapped shard actors; `clients` clients for `seconds`."""
    import random

    import requests
    from ray import serve

    from composeae.registry.store import ModelRegistry
    from composeae.serve.app import build_app
    from composeae.serve.auth import Access
    from composeae.serve.index import checkpoint_file, registry_index_url
    from composeae.storage import absolute_url
    from composeae.testing.checkpoints import random_checkpoint
    from composeae.testing.clients import SearchClients
    from composeae.testing.galleries import serveable_index
    from composeae.testing.localcluster import free_port

    folder, _, _ = synthetic_gallery(work, rows, dim)
    registry_url = str(work / f"registry-{rows}x{dim}")
    if not Path(registry_url).exists():
        checkpoint = random_checkpoint(data, work / f"random-{dim}",
                                       overrides=(f"model.embed_dim={dim}",))
        registry = ModelRegistry.create(registry_url)
        registry.register(checkpoint, run_name="synthetic", record={"model": "bench"})
        registry.promote(1)
    record = ModelRegistry(registry_url).version(1)
    start = time.perf_counter()
    serveable_index(folder, registry_index_url(registry_url, 1), absolute_url(data),
                    checkpoint_file(record["checkpoint"]), version=1)
    dress_s = time.perf_counter() - start
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        start = time.perf_counter()
        serve.run(build_app(registry_url, "champion", poll_s=600, num_cpus=1,
                            access=Access(None),
                            settings={"shards": shards, "shard_memory": "mmap",
                                      "shard_cpus": 0.5}),
                  name="catalogue", route_prefix="/")
        deploy_s = time.perf_counter() - start
        refs = [f"img{r:08d}" for r in random.Random(0).sample(range(rows), 200)]
        one = requests.post(f"{base}/search", json={"ref": refs[0], "text": "make it red",
                                                    "k": 10}, timeout=600)
        one.raise_for_status()
        found = one.json()["results"]
        scores = [r["score"] for r in found]
        with SearchClients(base, refs, clients) as load:
            time.sleep(seconds)
        ok = sorted(t for t, code, _ in load.answers if code == 200)
        status = requests.get(f"{base}/status", timeout=60).json()
        front = [peak_gb(p) for p in processes("ServeReplica:catalogue:")]
        shard_gb = [peak_gb(p) for p in processes("GalleryShard")]
    finally:
        serve.shutdown()
    return {"rows": rows, "dim": dim, "shards": shards, "dress_s": round(dress_s, 1),
            "deploy_s": round(deploy_s, 1), "search": status["search"],
            "count": status["count"], "clients": clients, "requests": len(load.answers),
            "failed": len(load.answers) - len(ok), "rps": round(len(ok) / load.wall, 2),
            "p50_ms": round(1000 * ok[len(ok) // 2], 1) if ok else None,
            "answer_ok": len(found) == 10 and len({r["id"] for r in found}) == 10
            and refs[0] not in {r["id"] for r in found} and scores == sorted(scores, reverse=True),
            "front_hwm_gb": round(max(front), 3) if front else None,
            "shard_hwm_gb": [round(x, 3) for x in sorted(shard_gb)]}


# -- approximate indexes ------------------------------------------------------------------------

def curve(rows: torch.Tensor, queries: torch.Tensor, exact: torch.Tensor, folder: str,
          specs: list[tuple[AnnSpec, list[int]]], reps: int, timing: int,
          exclude: list[int | None] | None = None, hits=None) -> list[dict]:
    """Each spec built afresh from the index in `folder` (whose stored rows `rows` are),
    searched at each probe with 4 x k re-ranked (and without re-ranking at the widest probe):
    agreement with `exact` rows, queries/s beside exact search's in the same interleaved rounds
    ("x_exact"), `hits(found)` when given."""
    manifest = read_manifest(folder)
    exact_fn = lambda q: top_k(q, rows, K)  # noqa: E731
    loaders = [lambda name=b["name"]: read_block_rows(folder, name) for b in manifest["blocks"]]
    timed = [queries[b:b + BATCH] for b in range(0, min(len(queries), timing * BATCH), BATCH)]
    out = []
    for spec, probes in specs:
        stale = Path(folder) / ann_file(manifest["build"], spec.resolved(len(rows)))
        if stale.exists():
            stale.unlink()  # an earlier run's: time the build
        start = time.perf_counter()
        entry = build_ann(folder, manifest["build"], spec, loaders, len(rows), rows.shape[1],
                          lambda line: None)
        build_s = time.perf_counter() - start
        ann = load_ann(folder, entry)
        # Searched with --threads threads (built with all): on shared cores FAISS's OpenMP
        # threads wait on each other (measured 4-6x slower with 2 than with 1 under load).
        faiss.omp_set_num_threads(torch.get_num_threads())
        fns = {(probe, rerank): (lambda q, ex=None, p=probe, r=rerank:
                                 ann_top_k(ann, spec.kind, rows, q, K, p, r, ex))
               for probe in probes for rerank in ((4,) if probe != probes[-1] else (4, 0))}
        qps = median_qps(dict({str(key): fn for key, fn in fns.items()}, exact=exact_fn),
                         timed, reps)
        for (probe, rerank), fn in fns.items():
            found = in_batches(fn, queries, exclude)
            row = {"factory": entry["factory"], "probe": probe, "rerank": rerank,
                   "agreement": round(agreement(found, exact), 4),
                   "qps": round(qps[str((probe, rerank))], 1),
                   "x_exact": round(qps[str((probe, rerank))] / qps["exact"], 1),
                   "exact_qps": round(qps["exact"], 1), "build_s": round(build_s, 1),
                   "bytes_per_row": round(entry["bytes"] / len(rows), 1)}
            row.update(hits(found) if hits is not None else {})
            out.append(row)
        del ann
        faiss.omp_set_num_threads(os.cpu_count() or 1)
    return out


def recall_of(labels: np.ndarray, targets: np.ndarray):
    """R@1 and R@10 in points of found rows (Q, >= 10): a hit is the target's label."""
    def recalls(found: torch.Tensor) -> dict[str, float]:
        f = found.numpy()
        hit = (labels[np.maximum(f, 0)] == targets[:, None]) & (f >= 0)
        return {"R@1": round(100 * hit[:, :1].any(1).mean(), 2),
                "R@10": round(100 * hit[:, :10].any(1).mean(), 2)}
    return recalls


def catalogue_registry(work: Path, data: str, checkpoint: str):
    """A registry in --work whose version 1 (the champion) is `checkpoint`, its gallery index
    built (a no-op when there): (registry URL, index URL, `Built`, seconds)."""
    from composeae.registry.store import ModelRegistry
    from composeae.serve.index import build_index, registry_index_url, resolve_model

    registry_url = str(work / "registry")
    if not (work / "registry").exists():
        registry = ModelRegistry.create(registry_url)
        registry.register(checkpoint, run_name="bench", record={"model": "bench"})
        registry.promote(1)
    index_url = registry_index_url(registry_url, 1)
    start = time.perf_counter()
    built = build_index(resolve_model(None, registry_url, "1"), data, index_url)
    return registry_url, index_url, built, time.perf_counter() - start


def catalogue_part(work: Path, data: str, checkpoint: str, num_queries: int, lists: int,
                   reps: int, timing: int) -> dict:
    from composeae.checkpoint import load_checkpoint
    from composeae.config import replace
    from composeae.data import schema
    from composeae.data.stream import eval_batches
    from composeae.evaluate import QUERY_KEYS, embed
    from composeae.run.build import model_from_checkpoint
    from composeae.serve.index import load_index

    _, index_url, built, index_s = catalogue_registry(work, data, checkpoint)
    index = load_index(index_url, ann=False)
    rows = index.embeddings  # (N, D) float32 of the stored float16

    model, cfg = model_from_checkpoint(load_checkpoint(index.manifest["model"]["checkpoint"]))
    model.eval()
    data_cfg = replace(cfg, data={"url": data}).data
    batches = eval_batches(data_cfg, "test", schema.QUERIES, 256, rank=0, world_size=1,
                           tokenize=model.tokenize_fn(), normalise=False)
    start = time.perf_counter()
    q = embed(model, itertools.islice(batches, -(-num_queries // 256)), "reference",
              data_cfg.text_mode, QUERY_KEYS, torch.device("cpu"), cfg.train.precision)
    embed_s = time.perf_counter() - start
    emb = torch.nn.functional.normalize(torch.from_numpy(q["emb"][:num_queries]), dim=1)
    exclude = [index.row_of.get(r) for r in q["reference_id"][:num_queries]]
    labels = np.asarray(list(index.labels))
    hits = recall_of(labels, np.asarray(q["target_label"][:num_queries]))

    def exact_fn(qb, ex=None):
        return top_k(qb, rows, K, exclude=ex)

    exact = in_batches(exact_fn, emb, exclude)
    curve_rows = curve(rows, emb, exact, index_url,
                       [(AnnSpec("ivf", lists=lists), [4, 8, 16, 32]),
                        (AnnSpec("hnsw", m=32), [16, 32, 64, 128])],
                       reps, timing, exclude, hits)
    results = {"exact": dict(hits(exact), qps=statistics.median(
        r["exact_qps"] for r in curve_rows))}
    ok = [r for r in curve_rows
          if abs(r["R@1"] - results["exact"]["R@1"]) <= 0.5
          and abs(r["R@10"] - results["exact"]["R@10"]) <= 0.5]
    chosen = max(ok, key=lambda r: r["qps"]) if ok else max(curve_rows, key=lambda r: r["R@1"])
    return {"gallery": len(rows), "dim": int(rows.shape[1]), "queries": len(emb),
            "index_build_s": round(index_s, 1), "index_built_now": built.built,
            "query_embed_s": round(embed_s, 1), "exact": results["exact"], "curve": curve_rows,
            "chosen": chosen, "within_bar": bool(ok)}


def synthetic_part(work: Path, rows: int, dim: int, num_queries: int, lists: int, reps: int,
                   timing: int, kinds: list[str], spreads: list[str]) -> dict:
    out = {}
    for name, clusters in (("uniform", 0), ("clustered", 1000)):
        if name not in spreads:
            continue
        folder = work / f"synthetic-{name}-{rows}x{dim}"
        if not (folder / "manifest.json").exists():
            write_index(folder, synthetic_blocks(rows, dim, clusters=clusters, seed=11), dim)
        blocks = read_manifest(str(folder))["blocks"]
        g = torch.from_numpy(np.concatenate([read_block_rows(str(folder), b["name"])
                                             for b in blocks])).float()
        rng = np.random.default_rng(12)
        centres = unit_rows(np.random.default_rng(11), clusters, dim) if clusters else None
        # Queries from the rows' own distribution (the clustered ones around the same centres).
        queries = torch.from_numpy(unit_rows(rng, num_queries, dim, centres, 1.0))
        exact = in_batches(lambda q, ex: top_k(q, g, K), queries)
        specs = [(AnnSpec("ivf", lists=lists), [8, 16, 32, 64]),
                 (AnnSpec("hnsw", m=32), [32, 64, 128, 256])]
        out[name] = {"rows": rows, "dim": dim, "queries": num_queries,
                     "curve": curve(g, queries, exact, str(folder),
                                    [s for s in specs if s[0].kind in kinds], reps, timing)}
        del g
    return out


# -- batching in the service --------------------------------------------------------------------

def batching_part(registry_url: str, clients: list[int], seconds: float, reps: int,
                  pinned: bool = True) -> list[dict]:
    """Requests/s and latency of the service one by one (`batch` 1) and batched (the default),
    both deployed side by side (one replica x 1 CPU each) and loaded in turns: `reps` rounds,
    each round every client count on each application for `seconds`, which goes first
    alternating; after a warm-up of each. `pinned`: each replica's threads on the first core,
    Serve's proxy and the clients on the others (without it, a replica answering one by one
    runs its concurrent requests' searches on every core, beyond the 1 CPU it was given)."""
    import random

    import requests
    from ray import serve

    from composeae.serve.app import SEARCH_SETTINGS, build_app
    from composeae.serve.auth import Access
    from composeae.serve.index import load_index, registry_index_url
    from composeae.testing.clients import SearchClients
    from composeae.testing.localcluster import free_port

    ids = load_index(registry_index_url(registry_url, 1), rows=False, ann=False).ids
    refs = random.Random(0).sample(ids, min(200, len(ids)))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    batches = (1, SEARCH_SETTINGS["batch"])
    base = {b: f"http://127.0.0.1:{port}/batch{b}" for b in batches}
    runs: dict[tuple[int, int], list] = {(b, c): [] for b in batches for c in clients}
    cores = sorted(os.sched_getaffinity(0))
    try:
        for b in batches:
            serve.run(build_app(registry_url, "champion", poll_s=60, num_cpus=1,
                                access=Access(None), settings={"batch": b}),
                      name=f"batch{b}", route_prefix=f"/batch{b}")
            if pinned and len(cores) > 1:
                # The replica's 1 CPU made real (as a container's CPU limit would), on a core
                # of its own; the proxy and the clients on the others.
                pin(processes(f"ServeReplica:batch{b}:"), {cores[0]})
                pin(processes("ProxyActor") + [os.getpid()], set(cores[1:]))
            with SearchClients(base[b], refs, max(clients)):
                time.sleep(min(seconds, 3.0))  # warm-up: first requests, thread pools
        for round_ in range(reps):
            for c in clients:
                for b in batches[::1 if round_ % 2 == 0 else -1]:
                    before = cpu_seconds(f"ServeReplica:batch{b}:")
                    with SearchClients(base[b], refs, c) as load:
                        time.sleep(seconds)
                    load.cpu = {k: v - before[k] for k, v in
                                cpu_seconds(f"ServeReplica:batch{b}:").items()}
                    runs[(b, c)].append(load)
        status = requests.get(f"{base[batches[-1]]}/status", timeout=30).json()
    finally:
        serve.shutdown()
    rows = []
    for (b, c), loads in runs.items():
        answers = [a for load in loads for a in load.answers]
        ok = sorted(t for t, code, _ in answers if code == 200)
        rps = [sum(code == 200 for _, code, _ in load.answers) / load.wall for load in loads]
        cpu = {k: round(1000 * sum(load.cpu[k] for load in loads) / max(1, len(ok)), 1)
               for k in loads[0].cpu}
        rows.append({"batch": b, "clients": c, "requests": len(answers),
                     "cpu_ms_per_request": cpu,
                     "failed": len(answers) - len(ok), "rps": round(statistics.median(rps), 1),
                     "rps_rounds": [round(x, 1) for x in rps],
                     "p50_ms": round(1000 * ok[len(ok) // 2], 1) if ok else None,
                     "p99_ms": round(1000 * ok[min(len(ok) - 1, int(len(ok) * .99))], 1)
                     if ok else None})
    rows.append({"batched_status": {k: status[k] for k in ("largest_batch", "mean_batch")},
                 "pinned": pinned and len(cores) > 1})
    return rows


def processes(title: str) -> list[int]:
    """Pids of this process's descendants (the Ray it started) whose command line (Ray's process
    title) contains `title`."""
    parent, titles = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                titles[int(pid)] = f.read().decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                parent[int(pid)] = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue

    def ours(pid: int) -> bool:
        while pid > 1:
            pid = parent.get(pid, 0)
            if pid == os.getpid():
                return True
        return False

    return [pid for pid, text in titles.items() if title in text and ours(pid)]


def pin(pids: list[int], cpus: set[int]) -> None:
    """Every thread of `pids` onto `cpus` (threads started later inherit it)."""
    for pid in pids:
        try:
            threads = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue  # the process ended meanwhile
        for tid in threads:
            try:
                os.sched_setaffinity(int(tid), cpus)
            except OSError:
                continue  # the thread ended meanwhile


def cpu_seconds(replica: str) -> dict[str, float]:
    """CPU seconds used so far (user + system, from /proc) by the replica whose process title
    contains `replica`, by Serve's HTTP proxy, by this process (the clients), and by the whole
    machine (every process, other users' included)."""
    tick = os.sysconf("SC_CLK_TCK")

    def used(pid: int) -> float:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / tick  # utime, stime

    out = {"replica": sum(map(used, processes(replica))),
           "proxy": sum(map(used, processes("ProxyActor"))), "clients": used(os.getpid())}
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    out["machine"] = (sum(ticks) - ticks[3] - ticks[4]) / tick  # all but idle and iowait
    return out


# -- report -------------------------------------------------------------------------------------

def save_partial(work: Path, report: dict) -> None:
    """The parts measured so far into --work's partial.json, beside earlier runs' other parts
    (a part can be run alone with --parts and its figures kept)."""
    path = work / "partial.json"
    kept = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps(dict(kept, **report)))


def print_curve(rows: list[dict], recalls: bool) -> None:
    head = f"{'index':<12}{'probe':>6}{'rerank':>7}{'agree@10':>10}"
    head += f"{'R@1':>8}{'R@10':>8}" if recalls else ""
    print(head + f"{'q/s':>10}{'exact q/s':>10}{'x exact':>9}{'build s':>9}{'MB/1M rows':>12}")
    for r in rows:
        line = f"{r['factory']:<12}{r['probe']:>6}{r['rerank']:>7}{100 * r['agreement']:>9.1f}%"
        line += f"{r['R@1']:>8.2f}{r['R@10']:>8.2f}" if recalls else ""
        print(line + f"{r['qps']:>10.0f}{r['exact_qps']:>10.0f}{r['x_exact']:>9.1f}"
                     f"{r['build_s']:>9.0f}{r['bytes_per_row']:>12.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small stand-ins (a minute)")
    parser.add_argument("--parts", default="sharded,service,ann,synthetic,batching")
    parser.add_argument("--service-clients", type=int, default=4)
    parser.add_argument("--work", default=None, help="folder kept between runs (default: temp)")
    parser.add_argument("--data", default=None, help="CSS-synth dataset (default: catalogue, "
                                                     "built in --work)")
    parser.add_argument("--checkpoint", default=None,
                        help="trained model (default: a random tiny model; say so)")
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--lists", type=int, default=1024)
    parser.add_argument("--sharded-rows", type=int, default=10_000_000)
    parser.add_argument("--equal-rows", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--synthetic-rows", type=int, default=1_000_000)
    parser.add_argument("--synthetic-queries", type=int, default=1000)
    parser.add_argument("--synthetic-kinds", default="ivf,hnsw",
                        help="approximate kinds on the synthetic rows")
    parser.add_argument("--synthetic-rows-kind", default="uniform,clustered",
                        help="which synthetic rows")
    parser.add_argument("--clients", default="8,32")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batching-rounds", type=int, default=3)
    parser.add_argument("--no-pin", action="store_true",
                        help="batching: leave the replicas on every core")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--timing-batches", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and FAISS search threads (default 1, as in a one-CPU "
                             "replica; index builds use every core)")
    args = parser.parse_args()
    if args.quick:
        args.sharded_rows, args.equal_rows, args.dim, args.shards = 200_000, 100_000, 128, 2
        args.synthetic_rows, args.synthetic_queries, args.lists = 20_000, 200, 64
        args.queries, args.seconds, args.reps, args.timing_batches = 300, 3.0, 2, 3
        args.batching_rounds = 1
    parts = set(args.parts.split(","))
    torch.set_num_threads(args.threads)

    import ray

    ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False)
    tmp = tempfile.TemporaryDirectory(prefix="bench-catalogue-")
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"bench": "catalogue", "quick": args.quick}
    try:
        if "sharded" in parts:
            report["sharded"] = sharded_part(work, args.sharded_rows, args.dim, args.shards,
                                             args.equal_rows, args.reps)
            save_partial(work, report)
        registry_url = None
        data, checkpoint = args.data, args.checkpoint
        if parts & {"ann", "batching", "service"} and data is None:
            from composeae.data.synth import generate

            data = str(work / ("css-synth-tiny" if args.quick else "css-synth-catalogue"))
            if not Path(data, "manifest.json").exists():
                generate(data, preset="tiny" if args.quick else "catalogue",
                         workers=os.cpu_count() or 1)
        if "service" in parts:
            report["service"] = service_part(work, args.sharded_rows, args.dim, args.shards,
                                             data, args.service_clients, args.seconds)
            save_partial(work, report)
        if "ann" in parts or "batching" in parts:
            if checkpoint is None:
                from composeae.testing.checkpoints import random_checkpoint

                checkpoint = random_checkpoint(data, work / "random-checkpoint")
                report["model"] = "random tiny model (no --checkpoint)"
            registry_url = catalogue_registry(work, data, checkpoint)[0]
            if "ann" in parts:
                report["ann"] = catalogue_part(work, data, checkpoint, args.queries, args.lists,
                                               args.reps, args.timing_batches)
                save_partial(work, report)
        if "batching" in parts:
            report["batching"] = batching_part(registry_url,
                                               [int(c) for c in args.clients.split(",")],
                                               args.seconds, args.batching_rounds,
                                               not args.no_pin)
            save_partial(work, report)
        if "synthetic" in parts:
            report["synthetic"] = synthetic_part(work, args.synthetic_rows, args.dim,
                                                 args.synthetic_queries, args.lists, args.reps,
                                                 args.timing_batches,
                                                 args.synthetic_kinds.split(","),
                                                 args.synthetic_rows_kind.split(","))
    finally:
        ray.shutdown()
        tmp.cleanup()
    print_report(report)


def print_report(report: dict) -> None:
    summary = {"bench": "catalogue", "quick": report["quick"]}
    print(f"search at catalogue scale; {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}, torch threads {torch.get_num_threads()}")
    if "sharded" in report:
        s = report["sharded"]
        print(f"\nsharded exact search, {s['rows']:,} x {s['dim']} float16 rows (mapped), "
              f"{s['shards']} shard actors; written in {s['write_s']:.0f} s, loaded in "
              f"{s['load_s']:.0f} s")
        print(f"{'shard':>6}{'rows':>12}{'peak GB':>9}{'q/s alone':>11}")
        for i, (n, gb, qps) in enumerate(zip(s["shard_rows"], s["shard_hwm_gb"],
                                             s["qps_per_shard"])):
            print(f"{i:>6}{n:>12,}{gb:>9.2f}{qps:>11.1f}")
        print(f"fan-out + merge at batch {BATCH}: {s['qps_fan_out']:.1f} q/s; the merge alone "
              f"{s['merge_ms']:.3f} ms; top {K} on the first {s['equal_rows']:,} rows "
              f"{'equals' if s['top10_equal'] else 'DIFFERS from'} one process's")
        summary.update(n=s["rows"], shard_max_gb=max(s["shard_hwm_gb"]),
                       shards=s["shards"], sharded_qps=s["qps_fan_out"],
                       sharded_top10_equal=s["top10_equal"], merge_ms=s["merge_ms"])
    if "service" in report:
        v = report["service"]
        print(f"\nthe service over the same {v['count']:,} x {v['dim']} rows: {v['search']}, "
              f"deployed in {v['deploy_s']:.0f} s (index dressed in {v['dress_s']:.0f} s); "
              f"{v['clients']} clients: {v['rps']:.2f} requests/s, p50 {v['p50_ms'] or 0:.0f} ms, "
              f"{v['failed']} failed; a top 10 {'as expected' if v['answer_ok'] else 'WRONG'}")
        print(f"peak resident GB: the replica (ids, labels, pointers of every row, the model) "
              f"{v['front_hwm_gb']}, the shards {', '.join(str(x) for x in v['shard_hwm_gb'])}")
        summary.update(service_rps=v["rps"], service_failed=v["failed"],
                       service_answer_ok=v["answer_ok"], service_front_gb=v["front_hwm_gb"],
                       service_shard_max_gb=max(v["shard_hwm_gb"]))
        summary.setdefault("n", v["count"])
    if "ann" in report:
        a = report["ann"]
        print(f"\napproximate search, {report.get('model', 'trained model')}: gallery "
              f"{a['gallery']:,} x {a['dim']}, {a['queries']:,} test queries, batch {BATCH}")
        e = a["exact"]
        print(f"exact: R@1 {e['R@1']:.2f}  R@10 {e['R@10']:.2f}  {e['qps']:.0f} q/s")
        print_curve(a["curve"], True)
        c = a["chosen"]
        print(f"chosen: {c['factory']} probe {c['probe']} rerank {c['rerank']}: "
              f"{c['x_exact']:.1f}x exact, R@1 {c['R@1'] - e['R@1']:+.2f} points, "
              f"R@10 {c['R@10'] - e['R@10']:+.2f} points"
              f"{'' if a['within_bar'] else ' (none within 0.5 points: best R@1 shown)'}")
        summary.update(gallery=a["gallery"], ann_speedup=c["x_exact"],
                       ann_r1_delta=round(c["R@1"] - e["R@1"], 2),
                       ann_r10_delta=round(c["R@10"] - e["R@10"], 2),
                       ann_chosen=f"{c['factory']} probe {c['probe']} rerank {c['rerank']}",
                       exact_r1=e["R@1"], exact_qps=e["qps"])
        summary.setdefault("n", a["gallery"])
    for name, part in report.get("synthetic", {}).items():
        print(f"\nsynthetic {name} rows, {part['rows']:,} x {part['dim']}, {part['queries']:,} "
              f"queries from the same distribution")
        print_curve(part["curve"], False)
    if "batching" in report:
        rows = [r for r in report["batching"] if "batch" in r]
        formed_row = next(r for r in report["batching"] if "batched_status" in r)
        formed = formed_row["batched_status"]
        where = ("each replica pinned to core 0, Serve's proxy and the clients to the rest"
                 if formed_row.get("pinned") else "replicas, proxy and clients on every core")
        print(f"\nthe service, one replica x 1 CPU each, exact search, one by one and batched "
              f"side by side; {where}; requests/s the median of the rounds")
        print(f"{'batch':>6}{'clients':>8}{'requests':>10}{'failed':>8}{'req/s':>8}"
              f"{'p50 ms':>8}{'p99 ms':>8}  rounds")
        for r in rows:
            print(f"{r['batch']:>6}{r['clients']:>8}{r['requests']:>10}{r['failed']:>8}"
                  f"{r['rps']:>8.1f}{r['p50_ms'] or 0:>8.0f}{r['p99_ms'] or 0:>8.0f}  "
                  f"{', '.join(f'{x:.1f}' for x in r['rps_rounds'])}")
        print(f"batches formed: largest {formed['largest_batch']}, mean {formed['mean_batch']}")
        print("CPU ms per answered request (replica / Serve proxy / clients / whole machine, "
              "other users included):")
        for r in rows:
            cpu = r["cpu_ms_per_request"]
            print(f"  batch {r['batch']:>2}, {r['clients']:>2} clients: {cpu['replica']:.1f} / "
                  f"{cpu['proxy']:.1f} / {cpu['clients']:.1f} / {cpu['machine']:.1f}")
        by = {(r["batch"], r["clients"]): r["rps"] for r in rows}
        batched = max(b for b, _ in by)
        summary["batching_speedup"] = {c: round(by[(batched, c)] / by[(1, c)], 2)
                                       for b, c in by if b == 1}
        summary["batching_failed"] = sum(r["failed"] for r in rows)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    sys.exit(main())
