"""A real S3-compatible server for the tests: moto's standalone server (`moto[server]` from
PyPI) as its own process on a free loopback port, spoken to over HTTP by boto3 exactly as a
worker would speak to MinIO or AWS S3. It keeps objects in memory: a restart loses them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from stack_helpers import free_port, wait_until

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "linearize-test",
    "AWS_SECRET_ACCESS_KEY": "linearize-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class S3Server:
    """`python -m moto.server` on a free port; `strict` turns on moto's access-key checks, so
    an unknown key is refused like on a real server (InvalidAccessKeyId)."""

    def __init__(self, log: Path, *, strict: bool = False):
        self.port = free_port()
        self.log = log
        self.strict = strict
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Server:
        env = {**os.environ, **CREDENTIALS}
        if self.strict:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
        try:
            import moto.server  # noqa: F401
        except ImportError:
            pytest.fail("moto[server] is not installed (the dev extra has it: make setup)")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            env=env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_until(self._answers, 60, what="the S3 server")
        return self

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"S3 server exited:\n{self.log.read_text(errors='ignore')}")
        try:
            httpx.get(f"{self.url}/", timeout=1)
            return True
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def client(self, **credentials):
        import boto3

        creds = {
            "aws_access_key_id": credentials.get("key", CREDENTIALS["AWS_ACCESS_KEY_ID"]),
            "aws_secret_access_key": credentials.get(
                "secret", CREDENTIALS["AWS_SECRET_ACCESS_KEY"]
            ),
        }
        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1", **creds)

    def new_bucket(self) -> str:
        name = f"linearize-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name


def s3_env(server: S3Server, bucket: str, prefix: str = "artifacts") -> dict:
    """What every process of a bucket-backed stack gets (API and workers alike)."""
    return {
        **CREDENTIALS,
        "LINEARIZE_ARTIFACT_URL": f"s3://{bucket}/{prefix}",
        "LINEARIZE_S3_ENDPOINT_URL": server.url,
        "LINEARIZE_S3_MAX_ATTEMPTS": "2",
    }


def bucket_keys(server: S3Server, bucket: str, prefix: str = "") -> list[str]:
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def upload_dir(server: S3Server, directory: Path, bucket: str, prefix: str) -> None:
    client = server.client()
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(directory)}")
