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
NODE_B = "127.0.0.2"


@pytest.fixture(scope="module")
def cluster(s3_server):
    """Started after the S3 server, so every node's workers inherit its endpoint. One CPU per
    node: two workers of one CPU need both nodes, and after node B is lost only one fits."""
    from composeae.testing.localcluster import LocalCluster

    private = tempfile.mkdtemp(prefix="driver-only-")
    with LocalCluster(nodes=2, num_cpus=1, node_cpus=1, private_dir=private) as c:
        yield c


def train(cluster, *overrides: str, wait: bool = True) -> subprocess.Popen | subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "composeae.cli", "train", "--config", str(TINY)]
    for item in overrides:
        argv += ["--set", item]
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


def test_elastic_run_finishes_on_the_node_that_is_left(cluster, s3_shards):
    """`num_workers: [1, 2]`, node B killed for good mid-run: the group restarts on one worker
    from the last checkpoint and ends with the planned steps and samples (the global batch of
    16 is split 8 + 8 on two workers, 16 on one)."""
    run = "s3://multinode/runs/elastic"
    steps = 60
    proc = train(cluster, f"data.url={s3_shards}", "train.storage=s3://multinode/runs",
                 "train.name=elastic", "ray.placement_strategy=SPREAD", "ray.num_workers=[1, 2]",
                 "ray.cpus_per_worker=1", f"train.steps={steps}", "train.eval_every=10",
                 "train.log_every=5", "ray.max_failures=3", wait=False)
    out, killer = [], None
    try:
        for line in proc.stdout:
            out.append(line)
            if killer is None and "validation at step 10 " in line:
                # Ray Train collects a report when it polls the workers (every 2 s): a node lost
                # sooner takes the report with it. 3 s later the step-10 checkpoint is safe.
                killer = threading.Timer(3.0, cluster.kill_node, args=(1,))
                killer.start()
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        if killer is not None:
            killer.join()
        cluster.start_node(1)  # the module's other tests keep their two nodes
    stdout = "".join(out)
    assert proc.returncode == 0, stdout[-4000:]
    assert killer is not None
    closing_lines(stdout, run)
    metrics = json.loads(storage.read_text(f"{run}/metrics.json"))
    assert metrics["step"] == steps and metrics["samples_seen"] == steps * 8 * 2
    assert metrics["workers"] == 1 and metrics["nodes"] == [n for n in metrics["nodes"]
                                                            if n != NODE_B]
    (resize,) = metrics["resizes"]
    assert resize["from"] == 2 and resize["to"] == 1
    assert resize["step"] % 10 == 0 and 10 <= resize["step"] < steps  # from a checkpoint
    assert f"resized at step {resize['step']}: 2 -> 1 workers" in stdout
