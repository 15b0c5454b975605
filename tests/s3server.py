"""A real S3 server over HTTP for tests, in a subprocess: MinIO if a ``minio`` binary is on PATH, else moto.

Use the ``s3_server`` fixture (one server per test session) from a test module with
``from tests import s3server`` and ``s3_server = s3server.s3_server``; then ``server.config()`` gives an
``S3Config`` and ``server.raw_client()`` a minio client that goes behind the store's back.

moto does not check credentials by default; ``start_moto`` creates an IAM user with an access key
allowed ``s3:*``, then switches IAM authentication on, so wrong keys are refused as on a real server.
Set ``MEDDIFFUSE_TEST_S3=moto`` to use moto even where MinIO is installed.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

READY_TIMEOUT_S = 60.0


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it; the socket is closed again)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class S3Server:
    kind: str  # "minio" or "moto"
    endpoint: str  # host:port
    access_key: str
    secret_key: str
    process: subprocess.Popen[bytes]
    log_path: Path
    _buckets: int = field(default=0, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def config(self, **overrides: Any):
        """An S3Config for this server (fast retries, so failure tests return quickly)."""
        from meddiffuse.config import S3Config

        values: dict[str, Any] = {
            "endpoint": self.endpoint,
            "access_key": self.access_key,
            "secret_key": self.secret_key,
            "secure": False,
            "region": "us-east-1",
            "retries": 2,
            "backoff_s": 0.05,
            "timeout_s": 20.0,
        }
        values.update(overrides)
        return S3Config(**values)

    def raw_client(self):
        from minio import Minio

        return Minio(self.endpoint, access_key=self.access_key, secret_key=self.secret_key, secure=False)

    def new_bucket_name(self) -> str:
        """A bucket name no other test uses (the store creates it on first use)."""
        self._buckets += 1
        return f"test-{os.getpid()}-{self._buckets}-{secrets.token_hex(3)}"

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def _wait_until_ready(process: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"S3 test server exited with code {process.returncode} before answering; log:\n"
                + log_path.read_text(errors="replace")[-4000:]
            )
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # an HTTP answer, even an error status, means the server is up
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"S3 test server did not answer {url} within {READY_TIMEOUT_S:.0f}s")


def _moto_command(port: int) -> list[str]:
    # the moto_server of this interpreter's environment; a shim elsewhere on PATH may be another Python
    script = Path(sys.executable).with_name("moto_server")
    launcher = [str(script)] if script.exists() else [sys.executable, "-m", "moto.server"]
    return [*launcher, "-H", "127.0.0.1", "-p", str(port)]


def start_moto(workdir: Path) -> S3Server:
    port = free_port()
    log_path = workdir / "moto.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(_moto_command(port), stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_ready(process, f"{url}/moto-api/", log_path)
        access_key, secret_key = _moto_enable_auth(url)
    except BaseException:
        process.kill()
        raise
    return S3Server("moto", f"127.0.0.1:{port}", access_key, secret_key, process, log_path)


def _moto_enable_auth(url: str) -> tuple[str, str]:
    """Create an IAM user allowed s3:*, then make moto check every request's signature."""
    import boto3

    iam = boto3.client(
        "iam", endpoint_url=url, region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup"
    )
    iam.create_user(UserName="meddiffuse-test")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="meddiffuse-test", PolicyName="s3-all", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="meddiffuse-test")["AccessKey"]
    request = urllib.request.Request(
        f"{url}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()
    return key["AccessKeyId"], key["SecretAccessKey"]


def start_minio(binary: str, workdir: Path) -> S3Server:
    port, console_port = free_port(), free_port()
    data = workdir / "minio-data"
    data.mkdir(exist_ok=True)
    access_key, secret_key = "meddiffuse-test", secrets.token_hex(16)
    env = os.environ | {
        "MINIO_ROOT_USER": access_key,
        "MINIO_ROOT_PASSWORD": secret_key,
        "MINIO_BROWSER": "off",
        "MINIO_UPDATE": "off",
    }
    log_path = workdir / "minio.log"
    cmd = [binary, "server", str(data), "--address", f"127.0.0.1:{port}",
           "--console-address", f"127.0.0.1:{console_port}", "--quiet"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    try:
        _wait_until_ready(process, f"http://127.0.0.1:{port}/minio/health/live", log_path)
    except BaseException:
        process.kill()
        raise
    return S3Server("minio", f"127.0.0.1:{port}", access_key, secret_key, process, log_path)


def start_s3_server(workdir: Path) -> S3Server:
    binary = shutil.which("minio")
    if binary and os.environ.get("MEDDIFFUSE_TEST_S3", "").lower() != "moto":
        return start_minio(binary, workdir)
    return start_moto(workdir)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    try:
        server = start_s3_server(tmp_path_factory.mktemp("s3server"))
    except RuntimeError as exc:
        pytest.fail(f"could not start an S3 server for the tests: {exc}")
    try:
        yield server
    finally:
        server.stop()
