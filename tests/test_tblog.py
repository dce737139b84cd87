"""TensorBoard event files (composeae.report.tblog): local and on the moto S3 server, read back by
TensorBoard's own loader and, end to end, by a `tensorboard --logdir s3://...` server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import boto3
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hp_metadata
from tensorboard.plugins.hparams import api_pb2
from tensorboardX.summary import scalar as tbx_scalar

from composeae.report import tblog
from composeae import storage
from composeae.errors import UserError
from composeae.testing.localcluster import free_port


def scalars(url: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar under the run directory `url`, read by TensorBoard's loader (S3 or local)."""
    acc = EventAccumulator(url)
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def event_objects(url: str) -> dict[str, int]:
    """Event-file object name -> size under the S3 prefix `url`."""
    bucket, prefix = storage.split_s3(url)
    listing = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix + "/")
    return {o["Key"].rsplit("/", 1)[1]: o["Size"] for o in listing.get("Contents", [])
            if "tfevents" in o["Key"]}


def test_tags_are_cleaned_as_tensorboardx_cleans_them():
    for name in ["val/R@1", "test/Recall_subset@2", "/train/loss", "a b:c", "val/R@10_R@50"]:
        assert tblog.tag(name) == tbx_scalar(name, 1.0).value[0].tag
    assert tblog.tag("val/R@1") == "val/R_1"
    assert tblog.tag("train/samples_per_s") == "train/samples_per_s"


def test_s3_events_are_readable_at_each_flush_before_close(s3_bucket):
    url = f"{s3_bucket}/runs/r1/tensorboard"
    writer = tblog.open_writer(url)
    tblog.add_scalars(writer, 10, {"train/loss": 0.5, "val/R@1": 12.5})
    (name, size), = event_objects(url).items()
    assert scalars(url) == {"train/loss": [(10, 0.5)], "val/R_1": [(10, 12.5)]}

    tblog.add_scalars(writer, 20, {"train/loss": 0.25, "val/R@1": 20.0})
    assert event_objects(url)[name] > size  # the same object, grown
    assert scalars(url)["val/R_1"] == [(10, 12.5), (20, 20.0)]

    # Nothing reaches S3 between flushes; close flushes.
    tblog.add_scalars(writer, 30, {"val/R@1": 30.0}, flush=False)
    assert scalars(url)["val/R_1"][-1] == (20, 20.0)
    writer.close()
    writer.close()
    assert scalars(url)["val/R_1"][-1] == (30, 30.0)
    assert list(event_objects(url)) == [name]
    with pytest.raises(ValueError, match="closed"):
        writer.add_scalar("x", 1.0, 1)


def test_s3_event_files_rotate_in_order(s3_bucket):
    url = f"{s3_bucket}/runs/long/tensorboard"
    with tblog.EventWriter(url, max_file_bytes=300) as writer:
        for step in range(1, 21):
            tblog.add_scalars(writer, step, {"train/loss": 1.0 / step})
    objects = event_objects(url)
    assert len(objects) >= 3
    assert all(size < 400 for size in objects.values())
    # TensorBoard reads the files in name order and sees every step exactly once, in order.
    assert scalars(url)["train/loss"] == [(s, pytest.approx(1.0 / s)) for s in range(1, 21)]


def test_hparams_session_on_s3_parses_back(s3_bucket):
    root = f"{s3_bucket}/sweeps/s1/hparams"
    params = {"optim.lr": 1e-3, "model.name": "composeae", "model.use_bert": False,
              "data.batch_size": 32, "seed": np.int64(3), "dropout": None, "layers": [512, 256]}
    metrics = {"val/R@1": 41.5, "test/R@10": 70.25}
    session = tblog.write_hparams(root, params, metrics, run_name="trial_00001", step=200)
    assert session == f"{root}/trial_00001"

    acc = EventAccumulator(session)
    acc.Reload()
    content = acc.PluginTagToContent(hp_metadata.PLUGIN_NAME)
    experiment = hp_metadata.parse_experiment_plugin_data(content[hp_metadata.EXPERIMENT_TAG])
    start = hp_metadata.parse_session_start_info_plugin_data(
        content[hp_metadata.SESSION_START_INFO_TAG])
    end = hp_metadata.parse_session_end_info_plugin_data(content[hp_metadata.SESSION_END_INFO_TAG])

    assert {h.name for h in experiment.hparam_infos} == {
        "optim.lr", "model.name", "model.use_bert", "data.batch_size", "seed", "layers"}
    assert [m.name.tag for m in experiment.metric_infos] == ["val/R_1", "test/R_10"]
    assert start.hparams["optim.lr"].number_value == pytest.approx(1e-3)
    assert start.hparams["model.name"].string_value == "composeae"
    assert start.hparams["model.use_bert"].bool_value is False
    assert start.hparams["data.batch_size"].number_value == 32
    assert start.hparams["seed"].number_value == 3
    assert start.hparams["layers"].string_value == "[512, 256]"
    assert "dropout" not in start.hparams
    assert end.status == api_pb2.STATUS_SUCCESS
    # The metric columns find their values: scalars under the same tags, at the given step.
    assert {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]} == {
        "val/R_1": [(200, 41.5)], "test/R_10": [(200, 70.25)]}


def test_local_run_resume_and_hparams(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = os.path.join("runs", "r1", "tensorboard")  # relative: resolved when opened
    first = tblog.open_writer(url)
    for step in (1, 2, 3, 4):
        tblog.add_scalars(first, step, {"train/loss": float(step)})
    assert scalars(url) == {"train/loss": [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]}  # not closed
    first.close()

    # A restart resumes at step 3: the previous attempt's steps 3 and 4 are hidden.
    with tblog.open_writer(url, purge_step=3) as second:
        tblog.add_scalars(second, 3, {"train/loss": 30.0})
        tblog.add_scalars(second, 4, {"train/loss": 40.0})
    assert scalars(url) == {"train/loss": [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]}
    assert len(os.listdir(url)) == 2

    session = tblog.write_hparams(url, {"lr": 0.1}, {"test/R@1": 50.0}, step=4, status="failure")
    acc = EventAccumulator(session)
    acc.Reload()
    content = acc.PluginTagToContent(hp_metadata.PLUGIN_NAME)
    end = hp_metadata.parse_session_end_info_plugin_data(content[hp_metadata.SESSION_END_INFO_TAG])
    assert end.status == api_pb2.STATUS_FAILURE
    assert acc.Scalars("test/R_1")[-1].value == 50.0


def test_bad_input(s3_server, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        tblog.open_writer("s3://no-such-bucket-for-events/run")
    with pytest.raises(ValueError, match="status"):
        tblog.write_hparams(str(tmp_path), {"lr": 1.0}, {}, status="done")


def test_tensorboard_serves_s3_logdir_with_hparams(s3_bucket):
    """`tensorboard --logdir s3://...` against the S3 server, endpoint from AWS_ENDPOINT_URL."""
    logdir = f"{s3_bucket}/sweeps/s2"
    tblog.write_hparams(logdir, {"lr": 1e-3, "model": "tirg"}, {"val/R@1": 40.0}, "trial_0")
    tblog.write_hparams(logdir, {"lr": 1e-2, "model": "composeae"}, {"val/R@1": 30.0}, "trial_1")
    run = tblog.open_writer(f"{logdir}/train")  # a run still being written
    tblog.add_scalars(run, 1, {"val/R@1": 5.0})

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "S3_ENDPOINT"}
    proc = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "tensorboard"), "--logdir", logdir,
         "--host", "127.0.0.1", "--port", str(port), "--load_fast=false", "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    base = f"http://127.0.0.1:{port}"

    def get(path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(base + path, data=data, headers={
            "Content-Type": "application/json", "X-XSRF-Protected": "1"})
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.load(response)

    def wait_for(check, what: str):
        deadline = time.monotonic() + 30
        while True:
            try:
                value = check()
                if value:
                    return value
            except (urllib.error.URLError, ConnectionError, KeyError):
                pass
            assert proc.poll() is None, "tensorboard exited"
            assert time.monotonic() < deadline, f"tensorboard never showed {what}"
            time.sleep(0.3)

    def r1_steps():
        points = get("/data/plugin/scalars/scalars?run=train&tag=val/R_1")
        return [(p[1], p[2]) for p in points]

    def hparams_table():
        groups = get("/data/plugin/hparams/session_groups", {
            "experimentName": "", "startIndex": 0, "sliceSize": 10,
            "allowedStatuses": ["STATUS_SUCCESS"],
            "colParams": [{"hparam": "lr"}, {"hparam": "model"}, {"metric": {"tag": "val/R_1"}}],
        })["sessionGroups"]
        table = {g["name"]: (g["hparams"]["lr"], g["hparams"]["model"],
                             [m["value"] for m in g["metricValues"]]) for g in groups}
        return len(table) == 2 and all(row[2] for row in table.values()) and table

    try:
        assert wait_for(hparams_table, "the HParams table") == {
            "trial_0": (1e-3, "tirg", [40.0]), "trial_1": (1e-2, "composeae", [30.0])}

        assert wait_for(r1_steps, "step 1") == [(1, 5.0)]
        tblog.add_scalars(run, 2, {"val/R@1": 7.5})  # shows up while the run goes on
        assert wait_for(lambda: len(r1_steps()) == 2 and r1_steps(), "step 2") == [
            (1, 5.0), (2, 7.5)]
    finally:
        run.close()
        proc.terminate()
        proc.wait(timeout=10)
