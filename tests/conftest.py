"""Shared test fixtures.

S3: one moto S3 server per test session (`s3_server`), reached over real HTTP by boto3, by the
webdataset `s3` scheme and by pyarrow, and a fresh bucket per test (`s3_bucket`).
"""

from __future__ import annotations

import os
import uuid

import pytest


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 at a free port; yields its endpoint URL.

    The endpoint and dummy credentials go into `os.environ` for the whole session (not through
    monkeypatch, which is function-scoped) so every S3 client in the process and its children
    (DataLoader workers, Ray workers started later) finds the server.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update({
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    })
    yield endpoint
    server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, uniquely named bucket on the session's S3 server, as `s3://<bucket>`."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def css_tiny(tmp_path_factory) -> str:
    """The tiny CSS-synth preset (seed 0) in a local directory, built once per session."""
    from composeae.data.synth import generate

    url = str(tmp_path_factory.mktemp("css") / "css-synth-tiny")
    generate(url, preset="tiny", seed=0)
    return url


@pytest.fixture(scope="module")
def ray_local(s3_server):
    """A local Ray (3 logical CPUs) for one test module, started after the S3 server so its
    workers inherit the server's endpoint and credentials. `address="local"` never joins a
    stray cluster on the machine."""
    import ray

    ray.init(address="local", num_cpus=3)
    yield
    ray.shutdown()
