"""Object storage credentials from the job spec: ``[storage_options]`` with secret references, and
no ``AWS_*`` in the environment of the real ``ai-query`` processes.

The test process itself has ``AWS_*`` (conftest points it at the moto server); the ``ai-query``
subprocesses run without any of them: the endpoint, region and keys reach delta-rs and pyarrow.fs
(driver, Spark's planner workers and executors) from the spec alone, the keys through
``AIQ_SECRET_*``. Without the endpoint from the spec every request would go to AWS (no network
here) and fail, so a job that lands its rows in the bucket proves the options arrived.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
from deltalake import DeltaTable

from ai_query.testing import ProviderSimulator
from tests.spark.test_s3 import _s3_job

pytestmark = pytest.mark.spark


def _spec_with_storage_options(job: str, endpoint: str) -> None:
    with open(job, "a") as fh:
        fh.write(f'''
[storage_options]
AWS_ACCESS_KEY_ID = "{{{{secrets/s3/key_id}}}}"
AWS_SECRET_ACCESS_KEY = "{{{{secrets/s3/secret}}}}"
AWS_ENDPOINT_URL = "{endpoint}"
AWS_REGION = "us-east-1"
AWS_ALLOW_HTTP = "true"
''')


def _env_without_aws(**secrets: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AIQ_SECRET_S3_", "AIQ_STORAGE_OPTIONS"))}
    return dict(env, PYTHONUNBUFFERED="1", **secrets)


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "batch_runner.cli", *args], capture_output=True, text=True,
                          timeout=600, env=env)


def _bucket_bytes(s3_server, bucket: str) -> bytes:
    client = s3_server.client()
    return b"".join(client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in s3_server.keys(bucket))


def test_job_runs_with_credentials_only_in_the_spec_and_never_shows_the_secret(tmp_path, s3_server):
    bucket = s3_server.bucket()
    key_id, secret = f"AKIA{uuid.uuid4().hex[:16].upper()}", f"s3cret-{uuid.uuid4().hex}"
    env = _env_without_aws(AIQ_SECRET_S3_KEY_ID=key_id, AIQ_SECRET_S3_SECRET=secret)
    assert not [k for k in env if k.startswith("AWS_")]
    with ProviderSimulator(api_key="sk-sim", seed=5) as sim:
        job, out = _s3_job(tmp_path, sim, bucket, rows=90, chunk=40)
        _spec_with_storage_options(job, s3_server.endpoint)
        s3_server.start_recording()
        run = _cli("run", "--no-progress", job, env=env)
        assert run.returncode == 0, run.stderr[-3000:]
        status = _cli("status", job, env=env)
        assert status.returncode == 0, status.stderr[-3000:]
        plan = _cli("plan", "--no-pilot", job, env=env)
        assert plan.returncode == 0, plan.stderr[-3000:]
        requests = s3_server.recorded(bucket)
        assert sim.snapshot()["ok"] == 90
    # every request of the three commands was signed with the spec's key (delta-rs and pyarrow.fs alike)
    signers = {r["headers"].get("Authorization", "unsigned").split("Credential=")[-1].split("/")[0] for r in requests}
    assert len(requests) > 20 and signers == {key_id}, signers

    table = DeltaTable(out).to_pyarrow_table()
    assert sorted(table.column("review_id").to_pylist()) == list(range(1, 91))
    assert DeltaTable(f"{out}.aiq/endpoint_usage").to_pyarrow_table().num_rows == 90
    assert DeltaTable(f"s3://{bucket}/payloads").to_pyarrow_table().num_rows == 90
    assert "90" in status.stdout and "pending" in status.stdout.lower()
    assert any(k.startswith("out.aiq/runs.jsonl.d/") for k in s3_server.keys(bucket))  # the run log went through pyarrow.fs
    stored = _bucket_bytes(s3_server, bucket)  # every table, run log and journal object
    for value in (secret, key_id):
        for where, text in (("run stdout", run.stdout), ("run stderr", run.stderr), ("status", status.stdout + status.stderr),
                            ("plan", plan.stdout + plan.stderr)):
            assert value not in text, f"a secret value shows in the {where}"
        assert value.encode() not in stored, "a secret value is stored in the bucket"
    assert b"{{secrets/s3/secret}}" not in stored  # not even its name: the options stay out of the tables


def test_an_unset_storage_secret_stops_the_run_before_any_request(tmp_path, s3_server):
    bucket = s3_server.bucket()
    env = _env_without_aws(AIQ_SECRET_S3_KEY_ID="AKIAEXAMPLE")  # the secret key is missing
    with ProviderSimulator(api_key="sk-sim", seed=6) as sim:
        job, _ = _s3_job(tmp_path, sim, bucket, rows=20, chunk=20)
        _spec_with_storage_options(job, s3_server.endpoint)
        s3_server.start_recording()
        run = _cli("run", "--no-progress", job, env=env)
        assert s3_server.recorded(bucket) == []  # not even the preflight's probe object
        assert sim.snapshot()["requests"] == 0
    assert run.returncode == 2, run.stderr[-3000:]
    message = run.stderr.strip().splitlines()
    assert len(message) == 1, run.stderr  # one paragraph, no traceback
    assert "storage_options.AWS_SECRET_ACCESS_KEY" in message[0] and "{{secrets/s3/secret}}" in message[0]
    assert "AIQ_SECRET_S3_SECRET" in message[0] and "Nothing was read, written or sent" in message[0]


def test_a_session_started_without_the_options_is_refused_naming_the_fix(tmp_path, spark, s3_server, monkeypatch):
    """The shared test session's workers started before this job's options were installed: they
    would read and write without them, so the run stops before its first request."""
    from ai_query import ConfigError
    from ai_query._storage_options import ENV
    from batch_runner import JobSpec, run_incremental

    monkeypatch.setenv(ENV, "{}")  # restored afterwards: the preflight installs the job's options here
    monkeypatch.setenv("AIQ_SECRET_S3_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AIQ_SECRET_S3_SECRET", "s3cret")
    bucket = s3_server.bucket()
    with ProviderSimulator(api_key="sk-sim", seed=7) as sim:
        job, _ = _s3_job(tmp_path, sim, bucket, rows=20, chunk=20)
        _spec_with_storage_options(job, s3_server.endpoint)
        with pytest.raises(ConfigError, match=r"has \[storage_options\], which reach Spark's Python workers through "
                                              r"AIQ_STORAGE_OPTIONS, but this Spark session was started without them; "
                                              r"run the job with `ai-query run`, or call batch_runner.use_storage_options"):
            run_incremental(JobSpec.load(job), spark, progress=False)
        assert sim.snapshot()["requests"] == 0
