"""A real two-node Ray cluster on this machine (`composeae.testing.localcluster.LocalCluster`):
the head at 127.0.0.1 and node B at 127.0.0.2, node B in a mount namespace of its own where the
driver's private folder is an empty tmpfs. Every run is the `composeae train` command a user
types, joined to the cluster through RAY_ADDRESS; the cluster is shared by the module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from composeae import storage

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "jobs" / "configs" / "tiny.yaml"
TINY_SWEEP = ROOT / "jobs" / "configs" / "sweeps" / "tiny.yaml"
NODE_B = "127.0.0.2"


@pytest.fixture(scope="module")
def cluster(s3_server):
    """Started after the S3 server, so every node's workers inherit its endpoint. One CPU per
    node: two workers of one CPU need both nodes, and after node B is lost only one fits."""
    from composeae.testing.localcluster import LocalCluster

    private = tempfile.mkdtemp(prefix="driver-only-")
    with LocalCluster(nodes=2, num_cpus=1, node_cpus=1, private_dir=private) as c:
        yield c


Command = subprocess.Popen | subprocess.CompletedProcess


def train(cluster, *overrides: str, wait: bool = True) -> Command:
    args = ["train", "--config", str(TINY)]
    for item in overrides:
        args += ["--set", item]
    return composeae(cluster, *args, wait=wait)


def composeae(cluster, *args: str, wait: bool = True) -> Command:
    """The `composeae` command line, joined to the cluster as a user's shell would be."""
    argv = [sys.executable, "-m", "composeae.cli", *args]
    env = {**os.environ, "RAY_ADDRESS": cluster.gcs_address, "RAY_AUTH_MODE": "disabled"}
    if wait:
        return subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=600)
    return subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def closing_lines(stdout: str, run: str) -> None:
    """The product's normal end of `composeae train`: the test table, the run, the checkpoint."""
    lines = stdout.strip().splitlines()
    assert lines[-2:] == [f"run: {run}", f"checkpoint: {run}/final"], lines[-6:]
    assert any(line.startswith("test recall of composeae") for line in lines[-8:])


@pytest.fixture(scope="module")
def s3_shards(cluster, s3_server):
    import boto3

    from composeae.data.synth import generate

    boto3.client("s3").create_bucket(Bucket="multinode")
    generate("s3://multinode/css-tiny", preset="tiny", seed=0, image_size=32)
    return "s3://multinode/css-tiny"


def lose_node_b(cluster, proc: subprocess.Popen, kill_after, start_at=None
                ) -> tuple[str, bool, bool]:
    """Read `proc`'s output to its end; SIGKILL node B 3 s after the first line for which
    `kill_after(line)` holds (Ray Train collects a report when it polls the workers, every 2 s:
    a node lost sooner takes that report's checkpoint with it), and start it again at the first
    later line for which `start_at(line)` holds. Node B is up again at the end whatever happens
    (the module's other tests keep their two nodes). Returns (output, killed, started again)."""
    out, killer, returned = [], None, False
    try:
        for line in proc.stdout:
            out.append(line)
            if killer is None and kill_after(line):
                killer = threading.Timer(3.0, cluster.kill_node, args=(1,))
                killer.start()
            elif killer is not None and not returned and start_at and start_at(line):
                killer.join()
                cluster.start_node(1)
                returned = True
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        if killer is not None:
            killer.join()
        if not returned:
            cluster.start_node(1)
    return "".join(out), killer is not None, returned


def test_one_worker_per_node_with_s3(cluster, s3_shards):
    run = "s3://multinode/runs/spread"
    proc = train(cluster, f"data.url={s3_shards}", "train.storage=s3://multinode/runs",
                 "train.name=spread", "ray.placement_strategy=SPREAD", "ray.num_workers=2",
                 "ray.cpus_per_worker=1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    closing_lines(proc.stdout, run)
    metrics = json.loads(storage.read_text(f"{run}/metrics.json"))
    assert len(metrics["nodes"]) == 2 and NODE_B in metrics["nodes"]
    assert metrics["workers"] == 2 and metrics["resizes"] == []
    assert metrics["samples_seen"] == 6 * 8 * 2
    assert "2 worker(s) on 2 node(s)" in proc.stdout

    # The same command again: the driver finds the run finished in S3 and starts no worker.
    again = train(cluster, f"data.url={s3_shards}", "train.storage=s3://multinode/runs",
                  "train.name=spread", "ray.placement_strategy=SPREAD", "ray.num_workers=2",
                  "ray.cpus_per_worker=1")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "run spread had already finished (step 6): nothing to train" in again.stdout
    assert "worker(s) on" not in again.stdout
    closing_lines(again.stdout, run)
    assert json.loads(storage.read_text(f"{run}/metrics.json")) == metrics

    # `composeae eval` of that checkpoint runs on the run's two workers, one per node, and
    # scores the test split as the run's own final evaluation did.
    proc = composeae(cluster, "eval", "--checkpoint", f"{run}/final", "--data", s3_shards,
                     "--out", "s3://multinode/eval.json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == f"checkpoint: {run}/final"
    table = json.loads(storage.read_text("s3://multinode/eval.json"))
    assert table == {k: v for k, v in metrics.items() if k.startswith("test/")}


def test_data_only_on_the_drivers_disk_is_one_line(cluster):
    from composeae.data.synth import generate

    assert cluster.isolated, "node B needs its own mount namespace (run the tests as root)"
    local = os.path.join(cluster.private_dir, "css-tiny")
    generate(local, preset="tiny", seed=0, image_size=32)
    runs = os.path.join(cluster.private_dir, "runs")
    proc = train(cluster, f"data.url={local}", f"train.storage={runs}", "ray.num_workers=2",
                 "ray.cpus_per_worker=1")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    # Ray's own INFO lines about joining the cluster may come first; the product says one line.
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.stderr.strip().splitlines()[-1] == error
    assert error.startswith(f"error: data.url: {local} does not exist on node") and NODE_B in error
    assert not os.path.exists(runs), "nothing may be written before the check"


@pytest.mark.parametrize("key", ["train.storage", "model.image_weights"])
def test_a_folder_or_file_only_on_the_drivers_disk_is_one_line(cluster, s3_shards, key):
    """Checkpoints written where the driver cannot read them back, or weights node B cannot
    load: refused before any worker starts, naming the key and the node; nothing left behind."""
    assert cluster.isolated, "node B needs its own mount namespace (run the tests as root)"
    local = os.path.join(cluster.private_dir, key.replace(".", "-"))
    overrides = [f"data.url={s3_shards}", "ray.num_workers=2", "ray.cpus_per_worker=1"]
    if key == "train.storage":
        overrides.append(f"train.storage={local}")
    else:
        weights = os.path.join(local, "resnet18.pt")
        os.makedirs(local)
        Path(weights).write_bytes(b"weights")  # on the driver's disk only
        overrides += ["train.storage=s3://multinode/runs", "model.image_encoder=resnet18",
                      f"model.image_weights={weights}"]
    proc = train(cluster, *overrides)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.stderr.strip().splitlines()[-1] == error
    assert error.startswith(f"error: {key}: {local}") and "does not exist on node" in error
    assert NODE_B in error
    if key == "train.storage":
        assert not os.path.exists(local), "the storage folder made for the check stays"


def test_elastic_group_shrinks_with_a_lost_node_and_grows_when_it_returns(cluster, s3_shards):
    """`num_workers: [1, 2]`, node B killed mid-run: the group restarts on one worker from the
    last checkpoint; node B started again: the next resize check (every 5 s here) grows it back
    to two. The run ends with the planned steps and samples (the global batch of 16 is split
    8 + 8 on two workers, 16 on one)."""
    run = "s3://multinode/runs/elastic"
    # Long enough that the lone worker is still training when node B is back: on 2 cores it
    # trains about 5 steps/s, and in a timed run the group grew back from step 100.
    steps = 250
    proc = train(cluster, f"data.url={s3_shards}", "train.storage=s3://multinode/runs",
                 "train.name=elastic", "ray.placement_strategy=SPREAD", "ray.num_workers=[1, 2]",
                 "ray.cpus_per_worker=1", f"train.steps={steps}", "train.eval_every=10",
                 "train.log_every=50", "ray.max_failures=3", "ray.resize_check_s=5", wait=False)
    stdout, killed, returned = lose_node_b(cluster, proc,
                                           lambda line: "validation at step 10 " in line,
                                           lambda line: "-> 1 workers" in line)
    assert proc.returncode == 0, stdout[-4000:]
    assert killed and returned, stdout[-4000:]
    closing_lines(stdout, run)
    metrics = json.loads(storage.read_text(f"{run}/metrics.json"))
    assert metrics["step"] == steps and metrics["samples_seen"] == steps * 8 * 2
    shrink, grow = metrics["resizes"]
    assert (shrink["from"], shrink["to"], grow["from"], grow["to"]) == (2, 1, 1, 2)
    for resize in (shrink, grow):  # each from a checkpoint
        assert resize["step"] % 10 == 0 and 10 <= resize["step"] < steps
        assert f"resized at step {resize['step']}: {resize['from']} -> {resize['to']} " \
               f"workers" in stdout
    assert metrics["workers"] == 2 and NODE_B in metrics["nodes"]


def test_a_sweep_spreads_over_both_nodes_and_survives_losing_one(cluster, s3_shards):
    """The tiny sweep, one draw per family and no early stopping, on the two nodes: a trial's
    driver and worker take 0.6 of a node's one CPU, so the two trials run one per node. Node B
    is killed while its trial trains (48 steps, so that it still trains 3 s after its first
    checkpoint): that trial resumes from its last checkpoint and the sweep ends with both
    trials' results, each run with its planned steps and samples."""
    sweep = "s3://multinode/sweeps/tiny-sweep"
    args = ["tune", "--config", str(TINY_SWEEP)]
    for item in ("storage=s3://multinode/sweeps", f"data.url={s3_shards}", "num_samples=1",
                 "scheduler=none", "max_failures=2", "ray.max_failures=2", "train.steps=48"):
        args += ["--set", item]
    proc = composeae(cluster, *args, wait=False)
    stdout, killed, _ = lose_node_b(
        cluster, proc, lambda line: f"ip={NODE_B}" in line and "validation at step 6 " in line)
    assert proc.returncode == 0, stdout[-4000:]
    assert killed, "no trial trained on node B"  # so the trials spread
    assert "2 trials: 2 finished, 0 stopped early by the scheduler, 0 failed" in stdout
    # Each trial's validation lines reach the console as they come, none merged by Ray's log
    # deduplication into one "[repeated 2x across cluster]" line.
    assert "across cluster]" not in stdout
    assert len({line.split(")")[0] for line in stdout.splitlines()
                if "validation at step 6 " in line}) >= 2
    assert stdout.strip().splitlines()[-1].startswith(f"train it again: composeae train "
                                                      f"--config {sweep}/best.yaml")
    runs = [json.loads(storage.read_text(f"{sweep}/runs/{name}"))
            for name in storage.list_files(f"{sweep}/runs")
            if name.count("/") == 1 and name.endswith("/metrics.json")]
    assert len(runs) == 2
    for metrics in runs:
        assert metrics["step"] == 48 and metrics["samples_seen"] == 48 * 8
    # The trial on node B was interrupted (and the other one too when one of its Ray actors,
    # such as its Train controller, lived there): its run restarted, a new worker group within
    # the trial or the trial restarted by Tune, and went on from a checkpoint.
    assert any(m["restarts"] or m["resumes"] > 0 for m in runs), runs


def test_a_night_trains_its_challenger_across_both_nodes(cluster, s3_shards, tmp_path):
    """`composeae nightly` on the two nodes, its runs and registry in S3 (the shards on a
    folder both nodes see): the challenger trains one worker per node and is promoted."""
    from composeae.registry.store import ModelRegistry

    registry, runs, night = "s3://multinode/registry", "s3://multinode/nightly", "2026-12-01"
    args = ["nightly", "--config", str(ROOT / "jobs" / "configs" / "nightly-tiny.yaml"),
            "--date", night]
    for item in (f"data.url={tmp_path / 'shards'}", f"train.storage={runs}",
                 f"nightly.registry={registry}", "ray.placement_strategy=SPREAD",
                 "ray.cpus_per_worker=1"):
        args += ["--set", item]
    proc = composeae(cluster, *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "promoted: no champion yet" in proc.stdout
    metrics = json.loads(storage.read_text(f"{runs}/nightly-{night}/metrics.json"))
    assert len(set(metrics["nodes"])) == 2 and NODE_B in metrics["nodes"]
    assert metrics["workers"] == 2 and "2 worker(s) on 2 node(s)" in proc.stdout
    assert ModelRegistry.open(registry).aliases().aliases == {"champion": 1}


def test_an_ivf_index_is_filled_by_tasks_on_both_nodes(cluster, s3_shards, tmp_path):
    """`composeae index --kind ivf --workers 2` joined to the two-node cluster, blocks and index
    in S3: the fill's two tasks (one CPU each; each node has one) run wherever Ray places them
    and read their blocks there, and the merged index answers as one process's fill of the
    same blocks. (Which node ran which task is not asserted: Ray may run both on one node in
    turn.)"""
    import faiss
    import numpy as np

    from composeae.serve.ann import AnnSpec, build_ann, load_ann
    from composeae.serve.index import read_block_rows, read_manifest
    from composeae.testing.checkpoints import random_checkpoint

    checkpoint = random_checkpoint(s3_shards, tmp_path / "ckpt")
    out = "s3://multinode/index-ivf"
    proc = composeae(cluster, "index", "--checkpoint", checkpoint, "--data", s3_shards,
                     "--out", out, "--kind", "ivf", "--lists", "8", "--workers", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = read_manifest(out)
    entry = manifest["ann"]
    assert entry["filled_by"] == 2 and manifest["count"] == 240
    blocks = [lambda name=b["name"]: read_block_rows(out, name) for b in manifest["blocks"]]
    alone = build_ann(str(tmp_path / "alone"), manifest["build"], AnnSpec("ivf", lists=8),
                      blocks, 240, manifest["dim"], lambda line: None,
                      counts=[b["count"] for b in manifest["blocks"]], workers=1)
    queries = np.concatenate([b() for b in blocks])[:50].astype(np.float32)
    params = faiss.SearchParametersIVF(nprobe=4)
    merged = load_ann(out, entry).search(queries, 10, params=params)
    one = load_ann(str(tmp_path / "alone"), alone).search(queries, 10, params=params)
    assert np.array_equal(merged[1], one[1]) and np.array_equal(merged[0], one[0])
