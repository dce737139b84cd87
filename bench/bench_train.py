"""Training throughput through Ray Train, against a plain PyTorch loop, and job start-up latency.

Rows (samples/s, medians of --repeats runs, all in one invocation on the same machine):
  plain      single-process PyTorch loop over in-memory batches (the reference)
  ray-memory Ray Train, 1 worker, the same loop over the same in-memory batches
  ray-stream Ray Train, 1 worker, batches streamed from the shards (decode + transform)
Ratios: ray-memory / plain (bar >= 0.9) and ray-stream / ray-memory (bar >= 0.9).
Then the time from `ray job submit` to the first logged training step on a local head.

    python bench/bench_train.py [--steps 40] [--repeats 3] [--skip-job]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def bench_config(shards: str, steps: int):
    from composeae.config import load_config

    return load_config(ROOT / "jobs" / "configs" / "demo.yaml", [
        f"data.url={shards}", "data.loader_workers=1", f"train.steps={steps}",
        "train.batch_size=32", "ray.num_workers=1"])


def _model_and_optimizer(cfg):
    from composeae.data.shardset import load_corpus
    from composeae.models.text import build_tokenizer
    from composeae.optim import build_optimizer, build_scheduler
    from composeae.models.zoo import create_model

    torch.manual_seed(0)
    model = create_model(cfg.model, cfg.loss, build_tokenizer("lstm", load_corpus(cfg.data)))
    optimizer = build_optimizer(model, cfg.optim)
    return model, optimizer, build_scheduler(optimizer, cfg.optim, cfg.train.steps)


def memory_batches(cfg, count: int) -> list[dict]:
    from composeae.data.stream import TrainStream

    stream = TrainStream(cfg.data, cfg.train.batch_size, rank=0, world_size=1, seed=0)
    batches = []
    while len(batches) < count:
        batches.extend(b for _, b in zip(range(count - len(batches)), stream.epoch(len(batches))))
    return batches


def timed_steps(model, optimizer, scheduler, batches, cfg, warmup: int = 3) -> float:
    """samples/s of the production step (`composeae.run.worker.train_step`) over `batches`, after
    `warmup` untimed steps."""
    from composeae.run.worker import train_step

    model.train()
    device = next(model.parameters()).device
    start, samples = None, 0
    for i, batch in enumerate(batches):
        if i == warmup:
            start, samples = time.perf_counter(), 0
        train_step(model, optimizer, scheduler, batch, cfg, device)
        samples += batch["reference"].shape[0]
    return samples / (time.perf_counter() - start)


def plain_loop(cfg, batches) -> float:
    return timed_steps(*_model_and_optimizer(cfg), batches, cfg)


def _ray_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from composeae.config import config_from_dict
    from composeae.data.stream import TrainStream

    cfg = config_from_dict(config["cfg"])
    model, optimizer, scheduler = _model_and_optimizer(cfg)
    model = ray.train.torch.prepare_model(model)
    if config["mode"] == "memory":
        batches = config["batches"]
    else:
        stream = TrainStream(cfg.data, cfg.train.batch_size, rank=0, world_size=1, seed=0)
        batches = _cycle(stream, len(config["batches"]))
    rate = timed_steps(model, optimizer, scheduler, batches, cfg)
    Path(config["out"]).write_text(json.dumps({"rate": rate}))
    ray.train.report({"rate": rate})


def _cycle(stream, count: int):
    epoch, produced = 0, 0
    while produced < count:
        for batch in stream.epoch(epoch):
            if produced == count:
                return
            produced += 1
            yield batch
        epoch += 1


def ray_loop(cfg, batches, mode: str, tmp: str) -> float:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from composeae.config import config_to_dict

    out = Path(tmp) / f"{mode}-{uuid.uuid4().hex}.json"
    TorchTrainer(_ray_worker,
                 train_loop_config={"cfg": config_to_dict(cfg), "batches": batches, "mode": mode,
                                    "out": str(out)},
                 scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name=f"bench-{mode}-{uuid.uuid4().hex[:6]}",
                                      storage_path=tmp)).fit()
    return json.loads(out.read_text())["rate"]


def job_latency(shards: str, runs: str) -> float:
    """Seconds from `ray job submit` to the first logged training step."""
    from composeae.testing.localcluster import LocalHead

    job_id = f"bench-{uuid.uuid4().hex[:8]}"
    with LocalHead(num_cpus=2) as head:
        start = time.perf_counter()
        head.submit(["python", "jobs/train.py", "--config", "jobs/configs/tiny.yaml",
                     "--set", f"data.url={shards}", "--set", f"train.storage={runs}",
                     "--set", "train.log_every=1", "--set", "train.steps=20"],
                    working_dir=str(ROOT), submission_id=job_id)
        while time.perf_counter() - start < 600:
            if "step 1/" in head.logs(job_id):
                return time.perf_counter() - start
            time.sleep(0.5)
    raise RuntimeError("the job logged no training step within 600 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-job", action="store_true", help="skip the job-latency row")
    args = parser.parse_args()

    import ray

    from composeae.data.synth import generate

    torch.set_num_threads(1)  # one CPU per worker on every path, so the rows compare like for like
    with tempfile.TemporaryDirectory() as tmp:
        shards = f"{tmp}/css-tiny"
        generate(shards, preset="tiny", seed=0, image_size=64)
        cfg = bench_config(shards, args.steps)
        batches = memory_batches(cfg, args.steps)
        ray.init(address="local", num_cpus=2, log_to_driver=False)
        rows: dict[str, list[float]] = {"plain": [], "ray-memory": [], "ray-stream": []}
        for _ in range(args.repeats):
            rows["plain"].append(plain_loop(cfg, batches))
            rows["ray-memory"].append(ray_loop(cfg, batches, "memory", tmp))
            rows["ray-stream"].append(ray_loop(cfg, batches, "stream", tmp))
        ray.shutdown()
        latency = None if args.skip_job else job_latency(shards, f"{tmp}/runs")

    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"ComposeAE (demo config: 64 px, small CNN + LSTM), batch {cfg.train.batch_size}, "
          f"{args.steps} steps, median of {args.repeats}")
    print(f"{'path':<12}{'samples/s':>12}  runs")
    for name, values in rows.items():
        print(f"{name:<12}{med[name]:>12.1f}  {', '.join(f'{v:.1f}' for v in values)}")
    ray_vs_plain = med["ray-memory"] / med["plain"]
    stream_vs_memory = med["ray-stream"] / med["ray-memory"]
    print(f"ray-memory / plain       {ray_vs_plain:.3f}  (bar >= 0.9)")
    print(f"ray-stream / ray-memory  {stream_vs_memory:.3f}  (bar >= 0.9)")
    if latency is not None:
        print(f"ray job submit -> first step: {latency:.1f} s")
    print(json.dumps({"bench": "train", "plain_samples_per_s": round(med["plain"], 2),
                      "ray_memory_samples_per_s": round(med["ray-memory"], 2),
                      "ray_stream_samples_per_s": round(med["ray-stream"], 2),
                      "ray_vs_plain": round(ray_vs_plain, 3),
                      "stream_vs_memory": round(stream_vs_memory, 3),
                      "submit_to_first_step_s": None if latency is None else round(latency, 1)}))


if __name__ == "__main__":
    main()
