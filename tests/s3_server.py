"""A real S3-compatible server for the object storage tests: ``moto`` in server mode on 127.0.0.1.

It runs as a subprocess (an in-process ``ThreadedMotoServer`` deadlocks with delta-rs reads that
call back into Python), speaks the S3 wire protocol over HTTP, and supports conditional puts
(``If-None-Match: *``), which delta-rs uses to make a Delta commit safe against two writers.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from urllib.parse import urlparse


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_environment() -> dict[str, str]:
    """The variables that point pyarrow.fs, delta-rs and boto3 at the test server (a fresh port)."""
    return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}", "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ALLOW_HTTP": "true", "AWS_EC2_METADATA_DISABLED": "true"}


class S3Server:
    """``python -m moto.server`` on the port of ``endpoint``; ``bucket()`` makes a fresh bucket."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.port = urlparse(endpoint).port
        self._proc: subprocess.Popen | None = None
        self._recording = os.path.join(tempfile.mkdtemp(prefix="aiq-moto-"), "recording.jsonl")

    def __enter__(self) -> "S3Server":
        # moto's request recorder (off until ``start_recording``) writes here, not into the cwd
        self._proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      env=dict(os.environ, MOTO_RECORDER_FILEPATH=self._recording))
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2).close()
                return self
            except OSError:
                assert self._proc.poll() is None, f"moto server exited with {self._proc.returncode}"
                time.sleep(0.1)
        raise RuntimeError(f"moto server did not answer on {self.endpoint}")

    @property
    def pid(self) -> int:
        """The server's process (its CPU is the store's, e.g. in bench/storage.py)."""
        assert self._proc is not None
        return self._proc.pid

    def __exit__(self, *exc: object) -> None:
        assert self._proc is not None
        self._proc.terminate()
        self._proc.wait(timeout=30)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=os.environ.get("AWS_REGION", "us-east-1"))

    def bucket(self) -> str:
        name = f"aiq-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def _moto_api(self, action: str) -> str:
        request = urllib.request.Request(f"{self.endpoint}/moto-api/recorder/{action}", method="POST", data=b"")
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.read().decode()

    def start_recording(self) -> None:
        """Record every request from now on (method, URL, headers: who signed it)."""
        self._moto_api("reset-recording")
        self._moto_api("start-recording")

    def recorded(self, bucket: str) -> list[dict]:
        """Stop recording; the requests recorded since ``start_recording`` that name ``bucket``."""
        self._moto_api("stop-recording")
        entries = [json.loads(line) for line in self._moto_api("download-recording").splitlines() if line.strip()]
        return [e for e in entries if f"/{bucket}" in e["url"] or e["url"].split("//", 1)[-1].startswith(f"{bucket}.")]

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", ()))
