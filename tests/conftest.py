"""Shared test fixtures: a real S3 HTTP API (moto_server on loopback) and storage roots."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Dict, Iterator, Optional

import pytest

# Environment the S3 fixtures control; saved and restored around the session.
_S3_ENV_KEYS = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE", "AWS_EC2_METADATA_DISABLED", "AWS_MAX_ATTEMPTS",
    "AWS_RETRY_MODE", "QUANTCORE_S3_MAX_ATTEMPTS", "QUANTCORE_S3_RETRY_BASE_DELAY",
    "NO_PROXY", "no_proxy",
)


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``scripts/setup.sh test`` runs ``-n auto``) the workers share the cores:
    each gets its share of intra-op threads, so two workers never oversubscribe two cores."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reset_storage_client() -> None:
    try:
        from quantcore.io import reset_client
    except ImportError:  # storage layer not importable: nothing cached to reset
        return
    reset_client()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start ``moto_server`` on 127.0.0.1:<free port>; point boto3 at it via the standard
    ``AWS_ENDPOINT_URL`` and dummy credentials; yield the endpoint URL. The process is
    terminated (by PID) and the environment restored at session end."""
    exe = Path(sys.executable).with_name("moto_server")
    if not exe.exists():
        pytest.skip(f"moto_server not found next to {sys.executable}")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("moto") / "moto_server.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                log.flush()
                raise RuntimeError(f"moto_server exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
                with opener.open(endpoint + "/", timeout=2) as r:
                    if r.status < 500:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"moto_server did not answer on {endpoint}")
            time.sleep(0.1)

        saved: Dict[str, Optional[str]] = {k: os.environ.get(k) for k in _S3_ENV_KEYS}
        for k in _S3_ENV_KEYS:
            os.environ.pop(k, None)
        os.environ.update({
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            # hermetic: ignore any ~/.aws config/credentials and never probe IMDS
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        })
        _reset_storage_client()
        try:
            yield endpoint
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            _reset_storage_client()
    finally:
        proc.terminate()  # SIGTERM to proc.pid
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="session")
def s3_client(s3_server: str):
    """A plain boto3 S3 client against the moto server (independent of quantcore.io)."""
    import boto3

    return boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.fixture
def s3_bucket(s3_client) -> str:
    """A fresh, uniquely named, empty bucket."""
    name = f"qc-test-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "file", "s3"], ids=["local", "file", "s3_moto_mock"])
def tmp_store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty storage root URI, parametrised over a local path, a ``file://`` URI
    and an ``s3://`` bucket (the latter starts the moto server)."""
    if request.param == "local":
        return str(tmp_path / "store")
    if request.param == "file":
        return (tmp_path / "store").as_uri()
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/store"


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Small tensors on shared cores: intra-op threads only add contention (use per module)."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
