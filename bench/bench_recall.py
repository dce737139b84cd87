"""recall@K on 10,000 queries x 10,000 gallery x 512 dims: composeae's chunked recall vs the bare
similarity matmul (the floor) and vs the official per-query argsort loop; peak memory at
100,000 x 100,000.

* floor, chunked: the same (chunk, G) matmuls ours does, into one reused buffer, nothing else;
  floor, one-shot: a single (Q, G) matmul. The ratio is taken against the faster of the two.
* reference (bench/reference.py): TIRG's `test_retrieval.test` algorithm, one similarity row,
  np.argsort and Python list membership per query. It is timed on the first --ref-queries
  queries and scaled linearly to all of them (its cost is the same for every query); on that
  subset its recall is compared with ours.
* peak memory: a child process, started before this one allocates anything large, runs
  recall_at_k on 100k x 100k and reports its peak RSS (ru_maxrss, and VmHWM from /proc, which
  unlike ru_maxrss is not inherited across fork + exec), next to its resident size just before
  the call (torch + the inputs).

Id-level hits (every gallery item its own label), one excluded gallery item per query, default
torch threads. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference  # noqa: E402

from composeae.metrics import first_hit_rank, recall_from_ranks  # noqa: E402


def recall_at_k(query, gallery, query_labels, gallery_labels, *, ks, exclude=None,
                chunk_size=1024):
    """R@K as `composeae.evaluate` scores one gallery: the ranks, then the fraction below K."""
    return recall_from_ranks(first_hit_rank(query, gallery, query_labels, gallery_labels,
                                            exclude=exclude, chunk_size=chunk_size), ks)

KS = (1, 5, 10, 50, 100)


def make_data(num_query: int, num_gallery: int, dim: int, seed: int = 0):
    """Queries are noisy copies of their target gallery item (cosine ~0.18 to it, about the best
    of 10k random distractors), so recall is neither 0 nor 1."""
    gen = torch.Generator().manual_seed(seed)
    gallery = torch.randn(num_gallery, dim, generator=gen)
    target = torch.randint(0, num_gallery, (num_query,), generator=gen)
    query = gallery[target] + 5.5 * torch.randn(num_query, dim, generator=gen)
    exclude = (target + 1) % num_gallery  # e.g. the query's own reference image
    return query, gallery, target, torch.arange(num_gallery), exclude


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def proc_status_gb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process from /proc/self/status."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20  # kB
    raise KeyError(field)


def memory_child(num: int, dim: int, chunk_size: int) -> None:
    """Runs in a fresh process: recall on num x num, prints its peak RSS as JSON."""
    gen = torch.Generator().manual_seed(0)
    gallery = torch.randn(num, dim, generator=gen)
    query = torch.randn(num, dim, generator=gen)
    query_labels = torch.randint(0, num, (num,), generator=gen)
    exclude = torch.randint(-1, num, (num,), generator=gen)
    before = proc_status_gb("VmRSS")
    took = seconds(lambda: recall_at_k(query, gallery, query_labels, torch.arange(num), ks=KS,
                                       exclude=exclude, chunk_size=chunk_size))
    print(json.dumps({"peak_gb": peak_rss_gb(), "hwm_gb": proc_status_gb("VmHWM"),
                      "before_gb": before, "seconds": took}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--gallery", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--ref-queries", type=int, default=1000)
    parser.add_argument("--ref-reps", type=int, default=3)
    parser.add_argument("--mem-n", type=int, default=100_000)
    parser.add_argument("--mem-dim", type=int, default=128,
                        help="dimension of the 100k run (the (chunk, G) block, not D, dominates)")
    parser.add_argument("--memory-child", nargs=3, type=int, metavar=("N", "DIM", "CHUNK"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child)
        return

    # First, while this process is still small (ru_maxrss carries over into the child).
    child = subprocess.run(
        [sys.executable, __file__, "--memory-child",
         str(args.mem_n), str(args.mem_dim), str(args.chunk_size)],
        capture_output=True, text=True, check=True)
    memory = json.loads(child.stdout.strip().splitlines()[-1])

    query, gallery, query_labels, gallery_labels, exclude = make_data(
        args.queries, args.gallery, args.dim)
    chunk = args.chunk_size
    qn, gn = F.normalize(query, dim=1), F.normalize(gallery, dim=1)
    buffer = torch.empty(chunk, args.gallery)

    def floor_chunked():
        for begin in range(0, args.queries, chunk):
            part = qn[begin : begin + chunk]
            torch.mm(part, gn.T, out=buffer[: part.shape[0]])

    def floor_one_shot():
        return qn @ gn.T

    def ours():
        return recall_at_k(query, gallery, query_labels, gallery_labels, ks=KS, exclude=exclude,
                           chunk_size=chunk)

    # Reference inputs: numpy features, string labels as TIRG's captions were.
    ref_n = min(args.ref_queries, args.queries)
    gallery_np = gallery.numpy()
    query_np = query[:ref_n].numpy()
    gallery_str = [f"img{i}" for i in gallery_labels.tolist()]
    query_str = [f"img{i}" for i in query_labels[:ref_n].tolist()]
    exclude_list = exclude[:ref_n].tolist()

    def ref():
        return reference.recall_at_k(query_np, gallery_np, query_str, gallery_str, exclude_list, KS)

    ours(), floor_chunked(), floor_one_shot()  # warm-up
    times: dict[str, list[float]] = {"ours": [], "floor_chunked": [], "floor_one_shot": []}
    for _ in range(args.reps):  # interleaved so the three see the same load
        times["floor_chunked"].append(seconds(floor_chunked))
        times["ours"].append(seconds(ours))
        times["floor_one_shot"].append(seconds(floor_one_shot))
    ref_times = [seconds(ref) for _ in range(args.ref_reps)]
    med = {name: statistics.median(values) for name, values in times.items()}
    ref_full = statistics.median(ref_times) * args.queries / ref_n
    floor = min(med["floor_chunked"], med["floor_one_shot"])

    # Agreement on the reference's subset (same exclusions, same labels).
    ours_subset = recall_at_k(query[:ref_n], gallery, query_labels[:ref_n], gallery_labels, ks=KS,
                              exclude=exclude[:ref_n], chunk_size=chunk)
    ref_subset = ref()
    agree = all(abs(ours_subset[k] - ref_subset[k]) < 1e-12 for k in ours_subset)

    # Chunk size, for the record: 3 interleaved runs each, medians.
    sizes = (256, 1024, 4096)
    sweep_runs: dict[int, list[float]] = {size: [] for size in sizes}
    for _ in range(3):
        for size in sizes:
            sweep_runs[size].append(seconds(lambda: recall_at_k(
                query, gallery, query_labels, gallery_labels, ks=KS, exclude=exclude,
                chunk_size=size)))
    sweep = {size: statistics.median(runs) for size, runs in sweep_runs.items()}
    block_gb = chunk * args.mem_n * 4 / 2**30
    full_matrix_gb = args.mem_n * args.mem_n * 4 / 2**30
    # At 512 dims the inputs (queries, gallery) and the normalised gallery copy grow; the
    # (chunk, G) block, which dominates the working memory, does not.
    extra_512_gb = 3 * args.mem_n * max(512 - args.mem_dim, 0) * 4 / 2**30

    print(f"recall@K {KS}, {args.queries} queries x {args.gallery} gallery x {args.dim} dims, "
          f"chunk {chunk}, torch threads {torch.get_num_threads()}, medians of {args.reps}")
    header = f"{'what':<44} {'seconds':>9} {'vs ours':>9}"
    print(header)
    print("-" * len(header))
    print(f"{'ours: recall_at_k':<44} {med['ours']:>9.3f} {1.0:>8.2f}x")
    print(f"{'floor: chunked matmul into one buffer':<44} {med['floor_chunked']:>9.3f} "
          f"{med['floor_chunked'] / med['ours']:>8.2f}x")
    print(f"{'floor: one-shot (Q, G) matmul':<44} {med['floor_one_shot']:>9.3f} "
          f"{med['floor_one_shot'] / med['ours']:>8.2f}x")
    label = f"reference: {ref_n} queries scaled x{args.queries / ref_n:g}"
    print(f"{label:<44} {ref_full:>9.3f} {ref_full / med['ours']:>8.2f}x")
    print(f"ours / floor = {med['ours'] / floor:.3f} (bar <= 1.3); "
          f"reference / ours = {ref_full / med['ours']:.1f}x (bar >= 3)")
    print(f"recall on the reference's {ref_n} queries: ours {ours_subset} "
          f"{'==' if agree else '!='} reference")
    print("chunk size sweep (medians of 3): "
          + ", ".join(f"{size}: {secs:.3f} s" for size, secs in sweep.items()))
    print(f"peak RSS at {args.mem_n} x {args.mem_n} (dim {args.mem_dim}): "
          f"{memory['peak_gb']:.2f} GB ru_maxrss, {memory['hwm_gb']:.2f} GB VmHWM "
          f"(bar < 2); resident before the call {memory['before_gb']:.2f} GB (torch + inputs); "
          f"the (chunk, G) float block is {block_gb:.2f} GB; the full similarity matrix would be "
          f"{full_matrix_gb:.0f} GB; the run took {memory['seconds']:.0f} s")
    if extra_512_gb:
        print(f"at 512 dims the inputs and the normalised gallery copy would add "
              f"{extra_512_gb:.2f} GB: about "
              f"{max(memory['peak_gb'], memory['hwm_gb']) + extra_512_gb:.2f} GB in all")
    print(json.dumps({
        "bench": "recall",
        "speedup_vs_reference": round(ref_full / med["ours"], 1),
        "ratio_to_matmul_floor": round(med["ours"] / floor, 3),
        "peak_mem_gb_100k": round(max(memory["peak_gb"], memory["hwm_gb"]), 2),
        "peak_mem_dim_100k": args.mem_dim,
        "peak_mem_gb_100k_at_512_estimated": round(
            max(memory["peak_gb"], memory["hwm_gb"]) + extra_512_gb, 2),
        "ours_s": round(med["ours"], 3),
        "floor_s": round(floor, 3),
        "reference_s_scaled": round(ref_full, 2),
        "reference_agrees": agree,
    }))


if __name__ == "__main__":
    main()
