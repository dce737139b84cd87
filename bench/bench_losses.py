"""Soft triplet loss, forward + backward: composeae's vectorised version vs the official algorithm.

Both sides run one training step's worth of the loss at batch 32 and 256 (D = 512): sample the
triplets, compute the loss, compute the gradient. The reference (bench/reference.py) is the
official nested-loop sampler, per-triplet numpy forward loop and the legacy backward loop; ours is
`soft_triplet_loss(...).backward()`. A second pair of rows times the loss alone on fixed triplets
(no sampling on either side). Rounds alternate between the two sides so both see the same load;
figures are medians. Torch runs single-threaded by default (the reference is single-threaded
Python; --threads 2 for the other setting).

To show where the time goes, ours is also split into sampler / forward / backward, and the whole
measurement is repeated in a child process with glibc's heap trimming off (freed memory kept, so
no page faults on reallocation).

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
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

from composeae.losses import sample_soft_triplets, soft_triplet_loss  # noqa: E402

DIM = 512
SCALE = 4.0  # the official initial normalisation scale
# glibc: serve large blocks from the heap and never give freed memory back to the OS.
NO_TRIM_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**30)}


def timed(fn, repeats: int) -> list[float]:
    """Seconds per call of fn, `repeats` calls."""
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def measure(batch: int, rounds: int, ours_per_round: int, ref_per_round: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(batch)
    query = torch.randn(batch, DIM, generator=gen).requires_grad_()
    target = torch.randn(batch, DIM, generator=gen).requires_grad_()
    scale = torch.tensor(SCALE, requires_grad=True)
    # The official Function received NormalizationLayer's output: s * x / |x|.
    with torch.no_grad():
        ref_query = SCALE * F.normalize(query, dim=1)
        ref_target = SCALE * F.normalize(target, dim=1)
    ref_features = torch.cat([ref_query, ref_target])
    rng = random.Random(batch)
    fixed_triplets = reference.sample_triplets(batch, rng)
    # The same triplets as our (2B, 3) table of negatives: anchor i's three k, in anchor order.
    fixed_table = torch.tensor([k for _, _, k in fixed_triplets]).view(2 * batch, 3)

    def ours_step():
        soft_triplet_loss(query, target, scale=scale, generator=gen).backward()

    def ours_loss_only():
        soft_triplet_loss(query, target, scale=scale, negatives=fixed_table).backward()

    def ref_step():
        reference.soft_triplet_step(ref_query, ref_target, rng)

    def ref_loss_only():
        loss, distances = reference.triplet_forward(ref_features, fixed_triplets)
        reference.triplet_backward(ref_features, distances, fixed_triplets)

    # Same loss value on the same triplets (the gradient relation, 2x the legacy backward, is
    # checked in the tests).
    ours_value = soft_triplet_loss(query, target, scale=SCALE, negatives=fixed_table).item()
    ref_value = float(reference.triplet_forward(ref_features, fixed_triplets)[0])

    def split() -> tuple[float, float, float]:
        """Seconds in our sampler, forward and backward, one step."""
        t0 = time.perf_counter()
        table = sample_soft_triplets(batch, generator=gen)
        t1 = time.perf_counter()
        loss = soft_triplet_loss(query, target, scale=scale, negatives=table)
        t2 = time.perf_counter()
        loss.backward()
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    for fn in (ours_step, ours_loss_only, ref_step, ref_loss_only):  # warm-up
        fn()
    times: dict[str, list[float]] = {"ours": [], "ours_loss": [], "ref": [], "ref_loss": []}
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ours_calls = 0
    for _ in range(rounds):
        times["ours"] += timed(ours_step, ours_per_round)
        times["ours_loss"] += timed(ours_loss_only, ours_per_round)
        ours_calls += 2 * ours_per_round
        times["ref"] += timed(ref_step, ref_per_round)
        times["ref_loss"] += timed(ref_loss_only, ref_per_round)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before) / ours_calls
    med = {name: statistics.median(values) for name, values in times.items()}
    parts = [split() for _ in range(rounds * ours_per_round)]
    sampler_us, forward_us, backward_us = (statistics.median(p) * 1e6 for p in zip(*parts))
    return {
        "sampler_us": sampler_us, "forward_us": forward_us, "backward_us": backward_us,
        "ours_ms": med["ours"] * 1e3, "ref_ms": med["ref"] * 1e3,
        "ours_loss_ms": med["ours_loss"] * 1e3, "ref_loss_ms": med["ref_loss"] * 1e3,
        "speedup": med["ref"] / med["ours"], "speedup_loss": med["ref_loss"] / med["ours_loss"],
        "value_diff": abs(ours_value - ref_value), "faults_per_call": faults,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results = {32: measure(32, args.rounds, 40, 6), 256: measure(256, args.rounds, 20, 1)}
    if args.child:
        print(json.dumps(results))
        return
    child = subprocess.run(
        [sys.executable, __file__, "--child", "--threads", str(args.threads),
         "--rounds", str(args.rounds)],
        env={**os.environ, **NO_TRIM_ENV}, capture_output=True, text=True, check=True)
    no_trim = {int(b): r for b, r in json.loads(child.stdout.strip().splitlines()[-1]).items()}
    print(f"soft triplet forward+backward, D={DIM}, torch threads={args.threads}, "
          f"{args.rounds} alternating rounds, medians")
    header = (f"{'batch':>5} {'what':<22} {'reference ms':>13} {'ours ms':>9} {'speedup':>8} "
              f"{'bar':>5}")
    print(header)
    print("-" * len(header))
    bars = {32: 20, 256: 100}
    for batch, r in results.items():
        print(f"{batch:>5} {'sample+fwd+bwd':<22} {r['ref_ms']:>13.2f} {r['ours_ms']:>9.3f} "
              f"{r['speedup']:>7.1f}x {bars[batch]:>4}x")
        print(f"{batch:>5} {'fwd+bwd, fixed triplets':<22} {r['ref_loss_ms']:>13.2f} "
              f"{r['ours_loss_ms']:>9.3f} {r['speedup_loss']:>7.1f}x {'':>5}")
    print("same, glibc heap trimming off (a child process):")
    for batch, r in no_trim.items():
        print(f"{batch:>5} {'sample+fwd+bwd':<22} {r['ref_ms']:>13.2f} {r['ours_ms']:>9.3f} "
              f"{r['speedup']:>7.1f}x {bars[batch]:>4}x")
    for batch, r in results.items():
        print(f"batch {batch}: |loss ours - reference| = {r['value_diff']:.2e} on the same "
              f"triplets; ours: sampler {r['sampler_us']:.0f} us, forward "
              f"{r['forward_us']:.0f} us, backward {r['backward_us']:.0f} us; page faults per call "
              f"{r['faults_per_call']:.0f} (trimming off: {no_trim[batch]['faults_per_call']:.0f})")
    print(json.dumps({
        "bench": "losses",
        "threads": args.threads,
        "speedup_b32": round(results[32]["speedup"], 1),
        "speedup_b256": round(results[256]["speedup"], 1),
        "speedup_b32_fixed_triplets": round(results[32]["speedup_loss"], 1),
        "speedup_b256_fixed_triplets": round(results[256]["speedup_loss"], 1),
        "ours_ms_b32": round(results[32]["ours_ms"], 3),
        "ours_ms_b256": round(results[256]["ours_ms"], 3),
        "reference_ms_b32": round(results[32]["ref_ms"], 2),
        "reference_ms_b256": round(results[256]["ref_ms"], 2),
        "speedup_b32_no_trim": round(no_trim[32]["speedup"], 1),
        "speedup_b256_no_trim": round(no_trim[256]["speedup"], 1),
    }))


if __name__ == "__main__":
    main()
