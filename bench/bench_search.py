"""Exact top-k search over a 1,000,000 x 512 float16 gallery index: composeae's blockwise search
against the bare matmul floor, its peak memory, and recall@10 of float16 against float32.

* ours: `composeae.serve.search.top_k`, the code behind `composeae search` and the service,
  on the index's float16 values held as float32 (what `load_index` does by default: blockwise
  matmul, per-block topk, merged) and held as float16 (upcast block by block as well).
* floor: one float32 `queries @ gallery.T` over the whole gallery plus one `topk`: no
  blocking, no upcast, no merge.
* FAISS (when `faiss-cpu` is installed): `IndexFlatIP`, FAISS's exact inner-product search, on
  the same float32 values; the column that says whether the library would serve better.
* both at a batch of --queries queries and at single queries (what one HTTP request does).
* peak memory: a fresh child process loads the index folder this run wrote (the real format,
  through `load_index`: embeddings, ids, image pointers) and searches it; its VmHWM from /proc
  (not inherited across fork + exec, unlike ru_maxrss) and its resident size before loading.
* recall@10: queries are noisy copies of a gallery row (cosine about 0.22 to it, about the best
  of a million random distractors, so recall is neither 0 nor 1); R@10 of the target with the
  float16 rows against the same with the exact float32 rows, and how much of the float32 top 10
  the float16 top 10 keeps.

The gallery is random unit vectors, generated in blocks. Default torch threads. Prints a
table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from composeae.serve import index as index_mod
from composeae.serve.search import top_k

from bench_recall import proc_status_gb  # noqa: E402  (this folder is on sys.path)

BLOCK = 65536


def make_gallery(n: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 (n, dim), float16 (n, dim)) unit rows, generated block by block."""
    gen = torch.Generator().manual_seed(seed)
    g32 = torch.empty(n, dim)
    for begin in range(0, n, BLOCK):
        rows = min(BLOCK, n - begin)
        g32[begin:begin + rows] = F.normalize(torch.randn(rows, dim, generator=gen), dim=1)
    return g32, g32.half()


def make_queries(g32: torch.Tensor, num: int, cosine: float = 0.22, seed: int = 1):
    """Unit queries at about `cosine` to a random target row each; (queries, targets)."""
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, g32.shape[0], (num,), generator=gen)
    noise = F.normalize(torch.randn(num, g32.shape[1], generator=gen), dim=1)
    spread = (1 / cosine**2 - 1) ** 0.5  # |noise| for that cosine to the target
    return F.normalize(g32[targets] + spread * noise, dim=1), targets


def write_index(directory: Path, g16: torch.Tensor) -> None:
    """The gallery as an index folder in the format `composeae index` writes (image pointers
    point nowhere: nothing reads images here)."""
    blocks = []
    (directory / index_mod.BLOCKS).mkdir(parents=True)
    n, dim = g16.shape
    for number, begin in enumerate(range(0, n, BLOCK)):
        rows = g16[begin:begin + BLOCK].numpy()
        name = f"bench-{number:06d}"
        stem = directory / index_mod.BLOCKS / name
        np.save(stem.with_suffix(".npy"), rows, allow_pickle=False)
        ids = [f"img{begin + i:07d}" for i in range(len(rows))]
        stem.with_suffix(".json").write_text(json.dumps({
            "shard": "none.tar", "count": len(rows), "dim": dim, "ids": ids,
            "groups": [""] * len(rows), "labels": ids, "pointers": [[0, 0, "png"]] * len(rows)}))
        blocks.append({"name": name, "shard": "none.tar", "count": len(rows)})
    (directory / index_mod.MANIFEST).write_text(json.dumps({
        "format": index_mod.FORMAT, "build": "bench", "dtype": "float16", "dim": dim, "count": n,
        "model": {"checkpoint": "none"}, "data": {"url": str(directory), "split": "test",
                                                  "fingerprint": "none"},
        "blocks": blocks}))


def memory_child(directory: str, num_queries: int, k: int) -> None:
    """Fresh process: load the index, search a batch; print memory and times as JSON."""
    before = proc_status_gb("VmRSS")
    start = time.perf_counter()
    index = index_mod.load_index(directory)
    loaded = time.perf_counter() - start
    queries = F.normalize(torch.randn(num_queries, index.embeddings.shape[1]), dim=1)
    start = time.perf_counter()
    top_k(queries, index.embeddings, k)
    print(json.dumps({"before_gb": before, "hwm_gb": proc_status_gb("VmHWM"),
                      "load_s": loaded, "search_s": time.perf_counter() - start,
                      "rows": len(index)}))


def best_of(fns: dict, reps: int) -> dict:
    """Best time of each function, the functions taking turns within every round: on shared
    cores the load drifts, and a drift must not favour whichever ran first."""
    for fn in fns.values():
        fn()  # warm-up: first-touch pages, thread pool
    best = {name: float("inf") for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="gallery rows")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=64, help="queries per batch")
    parser.add_argument("--recall-queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--memory-child", nargs=3, metavar=("DIR", "QUERIES", "K"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child[0], int(args.memory_child[1]), int(args.memory_child[2]))
        return

    g32, g16 = make_gallery(args.n, args.dim)
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        write_index(Path(tmp) / "index", g16)
        child = subprocess.run([sys.executable, __file__, "--memory-child",
                                str(Path(tmp) / "index"), str(args.queries), str(args.k)],
                               capture_output=True, text=True, check=True)
    memory = json.loads(child.stdout.strip().splitlines()[-1])

    queries, targets = make_queries(g32, args.recall_queries)
    batch, one = queries[:args.queries], queries[:1]

    # Recall first, in batches of --queries, while the exact float32 rows are still here.
    top16, top32 = [], []
    for begin in range(0, len(queries), args.queries):
        q = queries[begin:begin + args.queries]
        top16.append(top_k(q, g16, args.k)[1])
        top32.append(top_k(q, g32, args.k)[1])
    top16, top32 = torch.cat(top16), torch.cat(top32)
    recall16 = (top16 == targets[:, None]).any(dim=1).float().mean().item()
    recall32 = (top32 == targets[:, None]).any(dim=1).float().mean().item()
    overlap = np.mean([len(set(a) & set(b)) / args.k
                       for a, b in zip(top16.tolist(), top32.tolist())])
    del g32
    held = g16.float()  # the index's values as `load_index` holds them by default

    def floor(q):
        return torch.topk(q @ held.T, args.k, dim=1)

    contenders = {"ours": lambda q: top_k(q, held, args.k),
                  "ours16": lambda q: top_k(q, g16, args.k),
                  "floor": floor}
    try:
        import faiss
    except ImportError:
        faiss = None
    if faiss is not None:
        flat = faiss.IndexFlatIP(args.dim)
        flat.add(held.numpy())  # its own float32 copy
        contenders["faiss"] = lambda q: flat.search(q.numpy(), args.k)
        faiss_rows = torch.from_numpy(flat.search(batch.numpy(), args.k)[1])
        faiss_agrees = bool(torch.equal(faiss_rows, top_k(batch, held, args.k)[1]))
    timing = {mode: best_of({name: (lambda f=f, q=q: f(q)) for name, f in contenders.items()},
                            args.reps)
              for mode, q in (("batch", batch), ("single", one))}
    qps = {mode: {name: (len(batch) if mode == "batch" else 1) / t for name, t in v.items()}
           for mode, v in timing.items()}

    n_text = f"{args.n:,} x {args.dim}"
    print(f"exact top-{args.k} over {n_text} (float16 index: {g16.numel() * 2 / 2**30:.2f} GiB), "
          f"{torch.get_num_threads()} torch threads, best of {args.reps} interleaved rounds; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    names = {"ours": "ours, float32 rows", "ours16": "ours, float16 rows", "floor": "floor",
             "faiss": "FAISS IndexFlatIP"}
    print(f"{'queries/s':<22}" + "".join(f"{names[n]:>20}" for n in contenders)
          + f"{'ours/floor':>12}")
    for mode, label in (("batch", f"batch of {len(batch)}"), ("single", "one query")):
        v = qps[mode]
        print(f"{label:<22}" + "".join(f"{v[n]:>20.1f}" for n in contenders)
              + f"{v['ours'] / v['floor']:>12.2f}")
    if faiss is not None:
        print(f"FAISS's top {args.k} {'equals' if faiss_agrees else 'differs from'} ours "
              f"on the batch")
    print(f"peak memory, load + search of the index folder: {memory['hwm_gb']:.2f} GiB "
          f"(before loading {memory['before_gb']:.2f} GiB; load {memory['load_s']:.1f} s, "
          f"search of {args.queries} queries {memory['search_s']:.2f} s)")
    print(f"R@{args.k} over {len(queries)} queries: float16 {recall16:.4f}, float32 "
          f"{recall32:.4f} (difference {recall16 - recall32:+.4f}); the float16 top {args.k} "
          f"keeps {100 * overlap:.2f}% of the float32 top {args.k}")
    print(json.dumps({
        "bench": "search", "n": args.n, "dim": args.dim, "k": args.k,
        "qps_batch": round(qps["batch"]["ours"], 2),
        "qps_batch_floor": round(qps["batch"]["floor"], 2),
        "ratio_to_matmul_floor": round(qps["batch"]["ours"] / qps["batch"]["floor"], 3),
        "qps_batch_fp16_rows": round(qps["batch"]["ours16"], 2),
        "qps_single": round(qps["single"]["ours"], 2),
        "qps_single_fp16_rows": round(qps["single"]["ours16"], 2),
        "qps_single_floor": round(qps["single"]["floor"], 2),
        "ratio_to_matmul_floor_single": round(qps["single"]["ours"] / qps["single"]["floor"], 3),
        "qps_batch_faiss": round(qps["batch"]["faiss"], 2) if faiss is not None else None,
        "qps_single_faiss": round(qps["single"]["faiss"], 2) if faiss is not None else None,
        "peak_mem_gb": round(memory["hwm_gb"], 3),
        "recall_at_10_fp16": round(recall16, 4), "recall_at_10_fp32": round(recall32, 4),
        "recall_diff": round(recall16 - recall32, 4), "top10_overlap": round(float(overlap), 4),
    }))


if __name__ == "__main__":
    main()
