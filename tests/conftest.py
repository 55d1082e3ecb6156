"""Shared fixtures: tiny Wan models built in code (no downloads), and a local S3 server when asked."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from pipeline.models.causal_wan import CausalWanModel
from pipeline.models.wan_weights import WAN_CONFIGS


def tiny_wan(seed: int = 0, **overrides) -> CausalWanModel:
    torch.manual_seed(seed)
    return CausalWanModel(**{**WAN_CONFIGS["tiny"], **overrides}).eval()


@pytest.fixture
def tiny_model() -> CausalWanModel:
    return tiny_wan()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto) on 127.0.0.1 with a bucket `oneforce-test`; yields the
    environment that fsspec/s3fs/boto read, already exported into os.environ."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import boto3

        deadline = time.time() + 30
        while True:
            try:
                boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="oneforce-test")
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray instance (2 CPUs, no dashboard) shared by every test that needs Ray. It starts after
    the S3 server, so its workers inherit the AWS_* environment that points at it."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield ray
    finally:
        ray.shutdown()
