"""Throughput of the training data pipeline, from a local directory and from S3, against its floor.

Three measurements on the same CSS-synth training shards, same batch size and process count:

- floor: the same triplets, already in memory, decoded, transformed and collated into batches
  in a tight loop by `--workers` processes (no tar parsing, no shuffling, no transfer of
  batches between processes);
- local: `TrainStream` epochs from a local directory (everything: tar, shuffle, decode, transform,
  batch, DataLoader workers started every epoch);
- s3: the same from a moto S3 server started by this script, over HTTP on 127.0.0.1.

Bars: local >= 0.8 x floor, s3 >= 0.8 x local. The moto server runs in this process on the same
cores as the decoders, so the s3 row also pays for the server; the CPU column shows how much.
Prints a table of medians over `--repeats` runs, then one JSON line with the ratios.

    python bench/bench_pipeline.py [--preset small] [--workers 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
import time

import webdataset as wds


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=("tiny", "small", "full"))
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2,
                        help="DataLoader workers, and processes of the floor")
    parser.add_argument("--repeats", type=int, default=5)
    return parser.parse_args()


def start_s3() -> tuple[object, str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    return server, f"http://{host}:{port}"


def copy_to_s3(local: str, bucket: str) -> str:
    from composeae import storage

    storage.s3_client().create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/css-synth"
    for name in storage.listdir(local):
        storage.upload_file(os.path.join(local, name), storage.join(url, name))
    return url


# --- floor: decode + transform only, in `workers` processes ---------------------------------

_FLOOR_SAMPLES: list[dict] = []  # inherited by forked floor processes


def _decode_range(args: tuple[int, int, int, int]) -> tuple[int, float]:
    """Decode samples [start, stop) and collate them in batches; (count, CPU seconds)."""
    import torch

    from composeae.data.decode import collate, normalise_batch, SampleDecoder

    start, stop, image_size, batch_size = args
    if multiprocessing.parent_process() is not None:
        torch.set_num_threads(1)  # as torch does in every DataLoader worker
    decode = SampleDecoder("triplets", image_size)
    cpu = time.process_time()
    batch = []
    for sample in _FLOOR_SAMPLES[start:stop]:
        batch.append(decode(sample))
        if len(batch) == batch_size:
            normalise_batch(collate(batch))
            batch = []
    return stop - start, time.process_time() - cpu


def run_floor(pool, args: argparse.Namespace) -> tuple[float, float, float]:
    """(samples/s, CPU us per sample, of which in this process) decoding every triplet once."""
    n, parts = len(_FLOOR_SAMPLES), max(args.workers, 1)
    chunks = [(i * n // parts, (i + 1) * n // parts, args.image_size, args.batch_size)
              for i in range(parts)]
    start = time.perf_counter()
    results = pool.map(_decode_range, chunks) if pool else [_decode_range(chunks[0])]
    wall = time.perf_counter() - start
    done = sum(r[0] for r in results)
    cpu = 1e6 * sum(r[1] for r in results) / done
    return done / wall, cpu, 0.0 if pool else cpu


def load_floor_samples(url: str) -> None:
    from composeae import storage
    from composeae.data.shardset import read_manifest

    shards = read_manifest(url)["splits"]["train"]["triplets"]["shards"]
    urls = [storage.join(url, s["name"]) for s in shards]
    _FLOOR_SAMPLES[:] = list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))


# --- pipeline -------------------------------------------------------------------------------

def _children() -> list[int]:
    pids = []
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            pids += [int(p) for p in f.read().split()]
    return pids


def _cpu_seconds() -> tuple[float, float]:
    """CPU seconds of (this process, its live child processes: DataLoader workers, floor pool).

    Read from /proc (Linux): persistent DataLoader workers never exit, so the rusage of
    finished children would miss them.
    """
    ticks, children = os.sysconf("SC_CLK_TCK"), 0.0
    for pid in _children():
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        children += (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
    return time.process_time(), children


def train_stream(url: str, args: argparse.Namespace):
    from composeae.config import DataConfig
    from composeae.data.stream import TrainStream

    data = DataConfig(url=url, image_size=args.image_size, loader_workers=args.workers,
                      shuffle_buffer=500)
    return TrainStream(data, args.batch_size, rank=0, world_size=1, seed=0)


def run_pipeline(stream, epoch: int) -> tuple[float, float, float]:
    """(samples/s, CPU us per sample in all processes, of which in this one) over one epoch."""
    (main0, workers0), start = _cpu_seconds(), time.perf_counter()
    samples = sum(len(batch["modifier"]) for batch in stream.epoch(epoch))
    wall, (main1, workers1) = time.perf_counter() - start, _cpu_seconds()
    assert samples == stream.steps_per_epoch * stream.batch_size
    main = 1e6 * (main1 - main0) / samples
    return samples / wall, main + 1e6 * (workers1 - workers0) / samples, main


def main() -> None:
    args = parse_args()
    from composeae.data.synth import generate

    server, _ = start_s3()
    rows: dict[str, list[tuple[float, float, float]]] = {"floor": [], "local": [], "s3": []}
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "css-synth")
        manifest = generate(local, preset=args.preset, seed=0, image_size=args.image_size)
        remote = copy_to_s3(local, "bench-pipeline")
        load_floor_samples(local)
        pool = multiprocessing.get_context("fork").Pool(args.workers) if args.workers else None
        try:
            # One stream per source, as a trainer holds one: its workers persist across epochs.
            streams = {"local": train_stream(local, args), "s3": train_stream(remote, args)}
            for repeat in range(args.repeats):
                # Interleaved, so slow drifts of a shared machine hit all three rows alike.
                rows["floor"].append(run_floor(pool, args))
                for name, stream in streams.items():
                    rows[name].append(run_pipeline(stream, repeat))
            del streams
        finally:
            if pool:
                pool.close()
                pool.join()
    server.stop()

    median = {k: statistics.median(r[0] for r in v) for k, v in rows.items()}
    cpu = {k: statistics.median(r[1] for r in v) for k, v in rows.items()}
    main_cpu = {k: statistics.median(r[2] for r in v) for k, v in rows.items()}
    count = manifest["splits"]["train"]["triplets"]["count"]
    print(f"CSS-synth {args.preset}: {count} triplets ({2 * count} images) at "
          f"{args.image_size} px, "
          f"batch {args.batch_size}, {args.workers} worker processes, {args.repeats} repeats; "
          f"medians; a sample is a triplet")
    print(f"{'source':<8}{'samples/s':>11}{'min':>8}{'max':>8}{'vs floor':>10}"
          f"{'CPU us/sample':>15}{'in main':>9}{'floor/CPU':>11}")
    for name, values in rows.items():
        rates = [v[0] for v in values]
        print(f"{name:<8}{median[name]:>11.0f}{min(rates):>8.0f}{max(rates):>8.0f}"
              f"{median[name] / median['floor']:>10.2f}{cpu[name]:>15.0f}{main_cpu[name]:>9.0f}"
              f"{cpu['floor'] / cpu[name]:>11.2f}")
    local_vs_floor = median["local"] / median["floor"]
    s3_vs_local = median["s3"] / median["local"]
    print(f"bars (wall clock): local/floor {local_vs_floor:.2f} {_bar(local_vs_floor)}, "
          f"s3/local {s3_vs_local:.2f} {_bar(s3_vs_local)}")
    print(f"same in CPU cost per sample (steadier on a busy machine): local/floor "
          f"{cpu['floor'] / cpu['local']:.2f}, s3/local {cpu['local'] / cpu['s3']:.2f}")
    print(json.dumps({
        "bench": "pipeline",
        "local_vs_floor": round(local_vs_floor, 3),
        "s3_vs_local": round(s3_vs_local, 3),
        "floor_samples_per_s": round(median["floor"], 1),
        "local_samples_per_s": round(median["local"], 1),
        "s3_samples_per_s": round(median["s3"], 1),
        "local_vs_floor_cpu": round(cpu["floor"] / cpu["local"], 3),
        "s3_vs_local_cpu": round(cpu["local"] / cpu["s3"], 3),
        "workers": args.workers,
        "preset": args.preset,
    }))


def _bar(ratio: float) -> str:
    return "(>= 0.8: met)" if ratio >= 0.8 else "(>= 0.8: MISSED)"


if __name__ == "__main__":
    main()
