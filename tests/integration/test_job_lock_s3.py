"""The run lock on a real S3 server (moto on 127.0.0.1): refused while held, released, taken over."""

from __future__ import annotations

import json
import time

import pytest

from ai_query import storage
from batch_runner import JobRunningError, JobSpec
from batch_runner._job_lock import LEASE_S, RunLock, lock_path


def _spec(tmp_path, bucket: str) -> JobSpec:
    (tmp_path / "j.toml").write_text(f'''name = "nightly"
key = ["id"]
query = "SELECT id, ai_query('e', text) AS answer FROM t"
[sources]
t = "s3://{bucket}/t"
[output]
path = "s3://{bucket}/out"
mode = "merge"
''')
    return JobSpec.load(tmp_path / "j.toml")


def test_a_run_lock_on_s3(tmp_path, s3_server):
    bucket = s3_server.bucket()
    spec = _spec(tmp_path, bucket)
    assert lock_path(spec) == f"s3://{bucket}/out.aiq/run.lock"
    with RunLock.acquire(spec, "run-1"):
        assert json.loads(storage.read_bytes(lock_path(spec)))["run_id"] == "run-1"
        with pytest.raises(JobRunningError, match="is being run by run run-1"):
            RunLock.acquire(spec, "run-2")
    assert not storage.file_exists(lock_path(spec))
    # a lock whose driver was lost on another host: taken over once its lease ran out
    storage.write_bytes(lock_path(spec), json.dumps({"run_id": "lost", "host": "gone", "pid": 7,
                                                     "heartbeat": time.time() - LEASE_S - 1}).encode())
    with RunLock.acquire(spec, "run-3"):
        assert json.loads(storage.read_bytes(lock_path(spec)))["run_id"] == "run-3"
    assert not storage.file_exists(lock_path(spec))
