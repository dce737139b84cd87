"""The search service under load on loopback: p50 / p99 latency and requests/s at 1, 8 and 32
concurrent clients, and the failed requests while a promotion is swapped in.

Set-up, all in this run: a model registry in a temporary directory with two versions (randomly
initialised models of `jobs/configs/tiny.yaml`'s size, seeds 0 and 1: the service's cost does
not depend on what the weights learned), each version's index built with `composeae.serve.index`
over the gallery of --data's --split, and the application of `composeae serve` (one replica, one
CPU) on the local Ray at a free port.

* load: C client threads send `POST /search` back to back for --seconds (a gallery id as the
  reference, drawn from 100 fixed ones, k = 10), each with its own HTTP session; the clients
  run on the same cores as the service.
* swap: --swap-clients clients run while version 2 is promoted; the answers are counted by
  status and by the version that produced them, until version 2 has answered for 3 s.

Without --data it first builds CSS-synth `full` at 32 px (86,400 gallery images) in the
temporary directory, as `composeae shards synth --out DIR --preset full --image-size 32
--workers 2` does (under a minute). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 \
        else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None,
                        help="dataset whose gallery is served (default: CSS-synth full, built)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--swap-clients", type=int, default=8)
    args = parser.parse_args()

    import ray
    from ray import serve

    from composeae.registry.store import ModelRegistry
    from composeae.testing.checkpoints import random_checkpoint
    from composeae.testing.clients import SearchClients
    from composeae.testing.localcluster import free_port
    from composeae.serve.app import build_app
    from composeae.serve.auth import Access
    from composeae.serve.index import build_index, load_index, registry_index_url, resolve_model

    ray.init(address="local", num_cpus=os.cpu_count())
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        if args.data is None:
            from composeae.data.synth import generate

            data = str(Path(tmp) / "css-synth-full")
            generate(data, preset="full", image_size=32, workers=os.cpu_count() or 1)
        else:
            data = str(Path(args.data).resolve())
        url = str(Path(tmp) / "registry")
        registry = ModelRegistry.create(url)
        build_s = []
        for seed in (0, 1):
            checkpoint = random_checkpoint(data, Path(tmp) / f"ckpt{seed}", seed)
            version = registry.register(checkpoint, run_name=f"bench-{seed}",
                                        record={"model": "composeae"})[0]["version"]
            start = time.perf_counter()
            build_index(resolve_model(None, url, str(version)), data,
                        registry_index_url(url, version), split=args.split)
            build_s.append(time.perf_counter() - start)
        registry.promote(1)
        ids = load_index(registry_index_url(url, 1)).ids
        refs = random.Random(0).sample(ids, min(100, len(ids)))
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        start = time.perf_counter()
        # Open (no token): loopback only, as `composeae serve` allows without --token-file.
        serve.run(build_app(url, "champion", poll_s=1.0, num_cpus=1, access=Access(None)),
                  name="composeae", route_prefix="/")
        ready_s = time.perf_counter() - start
        base = f"http://127.0.0.1:{port}"

        rows = []
        for clients in [int(c) for c in args.clients.split(",")]:
            with SearchClients(base, refs, clients) as load:
                time.sleep(args.seconds)
            ok = [t for t, status, _ in load.answers if status == 200]
            rows.append({"clients": clients, "requests": len(load.answers),
                         "failed": len(load.answers) - len(ok),
                         "p50_ms": 1000 * percentile(ok, 50), "p99_ms": 1000 * percentile(ok, 99),
                         "rps": len(ok) / load.wall})

        with SearchClients(base, refs, args.swap_clients) as swap:
            time.sleep(3.0)
            promoted = time.perf_counter()
            registry.promote(2, reason="bench: a new champion")
            while not any(v == 2 for _, _, v in swap.answers[-args.swap_clients:]):
                time.sleep(0.2)
            switched = time.perf_counter() - promoted
            time.sleep(3.0)
        versions = Counter(v for _, _, v in swap.answers)
        failed = sum(status != 200 for _, status, _ in swap.answers)
        serve.shutdown()
    ray.shutdown()

    print(f"search service, gallery of {len(ids):,} images ({data} [{args.split}]), 1 replica "
          f"x 1 CPU, clients on the same {os.cpu_count()} cores; load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"index build: {build_s[0]:.0f} s and {build_s[1]:.0f} s; application ready in "
          f"{ready_s:.0f} s")
    print(f"{'clients':>8}{'requests':>10}{'failed':>8}{'p50 ms':>10}{'p99 ms':>10}{'req/s':>8}")
    for r in rows:
        print(f"{r['clients']:>8}{r['requests']:>10}{r['failed']:>8}{r['p50_ms']:>10.0f}"
              f"{r['p99_ms']:>10.0f}{r['rps']:>8.1f}")
    print(f"hot swap under {args.swap_clients} clients: {len(swap.answers)} requests, {failed} "
          f"failed; answered by version 1: {versions[1]}, version 2: {versions[2]}; version 2 "
          f"answering {switched:.1f} s after the promotion")
    print(json.dumps({
        "bench": "serve", "gallery": len(ids),
        "levels": [{k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()}
                   for r in rows],
        "swap_requests": len(swap.answers), "swap_failed": failed,
        "swap_v1": versions[1], "swap_v2": versions[2], "swap_seconds": round(switched, 1),
        "index_build_s": [round(b, 1) for b in build_s],
    }))


if __name__ == "__main__":
    main()
