"""Object storage: Delta tables and a whole job (sources, output, usage and payload tables, state)
on ``s3://``, against a real S3 server (moto, ``tests/s3_server.py``) on 127.0.0.1.

Nothing is mocked: pyarrow.fs and delta-rs talk HTTP to the server with the credentials of the
environment (``AWS_*``), as they would to AWS.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable, write_deltalake

from ai_query import storage
from ai_query.batch.journal import REMOTE_FLUSH_S
from ai_query.testing import ProviderSimulator
from batch_runner import JobSpec, job_status, run_incremental, write_sample_reviews
from spark_udfs import register_delta
from tests.spark.test_job_resume import kill_group_when, start_run, write_job

pytestmark = pytest.mark.spark


def test_storage_seam_joins_and_lists_uris_without_mangling(s3_server):
    bucket = s3_server.bucket()
    root = f"s3://{bucket}/job.aiq"
    assert storage.join(root, "journal", "run-1") == f"s3://{bucket}/job.aiq/journal/run-1"
    storage.append_text(storage.join(root, "runs.jsonl"), "a\n")
    storage.append_text(storage.join(root, "runs.jsonl"), "b\n")
    assert storage.read_appended(storage.join(root, "runs.jsonl")) == "a\nb\n"
    assert storage.create_exclusive(storage.join(root, "journal", "run-1", "tasks", "0.1"))
    assert not storage.create_exclusive(storage.join(root, "journal", "run-1", "tasks", "0.1"))
    assert storage.list_dir(storage.join(root, "journal"), dirs=True) == [f"s3://{bucket}/job.aiq/journal/run-1"]
    storage.remove_tree(storage.join(root, "journal"))
    objects = [k for k in s3_server.keys(bucket) if not k.endswith("/")]  # pyarrow keeps "directory" markers
    assert len(objects) == 2 and all(k.startswith("job.aiq/runs.jsonl.d/") for k in objects), objects


def test_preflight_writes_a_probe_object_on_s3(s3_server):
    from ai_query import ConfigError
    from ai_query._preflight import check_writable

    bucket = s3_server.bucket()
    check_writable(f"s3://{bucket}/out", "output.path", "fix it")
    assert [k for k in s3_server.keys(bucket) if not k.endswith("/")] == []  # the probe is deleted
    with pytest.raises(ConfigError, match=r"output.path s3://no-such-bucket-aiq/out cannot be written .*AWS_"):
        check_writable("s3://no-such-bucket-aiq/out", "output.path", "fix it")


def test_a_jobs_paths_on_s3_are_checked_together_and_the_first_bad_one_is_named(tmp_path, s3_server):
    from ai_query import ConfigError
    from batch_runner._preflight import check_job_paths

    bucket = s3_server.bucket()
    with ProviderSimulator(api_key="sk-sim", seed=3) as sim:
        job = _s3_job(tmp_path, sim, bucket, rows=10, chunk=5)[0]
    spec = JobSpec.load(job)
    check_job_paths(spec)  # output, state, usage and payloads: four probes, all deleted
    assert [k for k in s3_server.keys(bucket) if not k.endswith("/") and ".aiq-preflight-" in k] == []
    text = open(job).read()
    for bad in ('inference_path = "s3://no-such-bucket-aiq/payloads"', 'state_dir = "s3://no-such-bucket-aiq/state"'):
        text = text.replace("[output]\n", f"[output]\n{bad}\n", 1) if bad.startswith("state") else text.replace(
            f'inference_path = "s3://{bucket}/payloads"', bad)
    open(job, "w").write(text)
    with pytest.raises(ConfigError, match=r"^the job's state directory .*s3://no-such-bucket-aiq/state cannot be written"):
        check_job_paths(JobSpec.load(job))  # both fail; the state directory comes first in the order of the checks


def test_spark_reads_and_writes_delta_tables_on_s3(spark, s3_server):
    assert register_delta(spark) == "delta-rs"
    bucket = s3_server.bucket()
    uri = f"s3://{bucket}/tables/items"
    first = spark.createDataFrame([(i, f"item {i}") for i in range(50)], "id long, name string")
    first.repartition(3).write.format("delta").mode("overwrite").save(uri)
    spark.createDataFrame([(i, f"item {i}") for i in range(50, 80)], "id long, name string").write.format("delta").mode("append").save(uri)

    back = spark.read.format("delta").load(uri)
    assert sorted(r.id for r in back.collect()) == list(range(80))
    assert back.filter("id = 63").first().name == "item 63"
    # the table is really in the bucket: two commits in its _delta_log, read back by delta-rs too
    assert DeltaTable(uri).version() == 1 and DeltaTable(uri).to_pyarrow_table().num_rows == 80
    log = [k for k in s3_server.keys(bucket, "tables/items/_delta_log/") if k.endswith(".json")]
    assert [k.rsplit("/", 1)[1] for k in log] == ["00000000000000000000.json", "00000000000000000001.json"]
    # a table written by another Delta writer (delta-rs directly) reads through the same path
    other = f"s3://{bucket}/tables/other"
    write_deltalake(other, DeltaTable(uri).to_pyarrow_table().slice(0, 5))
    assert spark.read.format("delta").load(other).count() == 5


def test_two_writers_commit_on_s3_without_a_lock(s3_server):
    """delta-rs puts each commit file with ``If-None-Match: *``: the second writer of a version is
    refused by the store, re-reads the log and commits the next version (no lost commit)."""
    bucket = s3_server.bucket()
    uri = f"s3://{bucket}/t"
    write_deltalake(uri, DeltaTable.__module__ and __import__("pyarrow").table({"x": [0]}))
    a, b = DeltaTable(uri), DeltaTable(uri)  # both at version 0
    write_deltalake(a, __import__("pyarrow").table({"x": [1]}), mode="append")
    write_deltalake(b, __import__("pyarrow").table({"x": [2]}), mode="append")
    assert "AWS_S3_ALLOW_UNSAFE_RENAME" not in os.environ
    assert DeltaTable(uri).version() == 2
    assert sorted(DeltaTable(uri).to_pyarrow_table().column("x").to_pylist()) == [0, 1, 2]


def _s3_job(tmp_path, sim, bucket: str, rows: int, chunk: int) -> tuple[str, str]:
    source = f"s3://{bucket}/reviews"
    write_sample_reviews(source, rows=rows)
    job = write_job(tmp_path, sim, rows=rows, chunk=chunk)
    text = open(job).read()
    for local, remote in (('reviews = "reviews"', f'reviews = "{source}"'), ('path = "out"', f'path = "s3://{bucket}/out"'),
                          ('inference_path = "payloads"', f'inference_path = "s3://{bucket}/payloads"')):
        assert local in text
        text = text.replace(local, remote)
    open(job, "w").write(text)
    return job, f"s3://{bucket}/out"


def test_job_on_s3_runs_and_keeps_its_state_in_the_bucket(tmp_path, spark, s3_server):
    bucket = s3_server.bucket()
    with ProviderSimulator(api_key="sk-sim", seed=3) as sim:
        job, out = _s3_job(tmp_path, sim, bucket, rows=120, chunk=50)
        spec = JobSpec.load(job)
        assert spec.state_path == f"s3://{bucket}/out.aiq"
        s3_server.start_recording()
        report = run_incremental(spec, spark, progress=False)
        assert report.rows == 120 and report.table_rows == 120 and report.chunks == 3
        # the source's data file is opened twice (its keys, then the pending rows, kept for the
        # run), not once more per chunk
        opened = [r for r in s3_server.recorded(bucket) if r["method"] == "HEAD" and "/reviews/part-" in r["url"]]
        assert len(opened) == 2, [r["url"] for r in opened]
        table = DeltaTable(out).to_pyarrow_table()
        assert sorted(table.column("review_id").to_pylist()) == list(range(1, 121))
        usage = DeltaTable(f"{out}.aiq/endpoint_usage").to_pyarrow_table()
        assert usage.num_rows == sim.snapshot()["ok"] == 120
        assert DeltaTable(f"s3://{bucket}/payloads").to_pyarrow_table().num_rows == 120
        keys = [k for k in s3_server.keys(bucket, "out.aiq/") if not k.endswith("/")]  # not pyarrow's dir markers
        assert any(k.startswith("out.aiq/runs.jsonl.d/") for k in keys)
        assert not any(k.startswith(("out.aiq/journal/", "out.aiq/staged/")) for k in keys)  # committed, cleaned up
        assert not any("s3:/" in k for k in s3_server.keys(bucket))  # no mangled key
        status = job_status(spec)
        assert (status.done, status.failed, status.pending) == (120, 0, 0)
        assert [r["status"] for r in status.runs] == ["finished"]


def test_job_on_s3_killed_then_resumed_exactly_once(tmp_path, spark, s3_server):
    """A real ``ai-query run`` with everything on s3:// is SIGKILLed inside a chunk, then run again:
    every key once, and the answers the killed run journaled (in the bucket) are not sent again."""
    rows, chunk = 1500, 500
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    bucket = s3_server.bucket()
    # a model's latency (a few answers a second per request slot), so that the journal's
    # interval is short beside the chunk and the kill comes seconds into it
    with ProviderSimulator(api_key="sk-sim", latency=("uniform", (0.2, 0.4)), seed=seed, served_log=True) as sim:
        job, out = _s3_job(tmp_path, sim, bucket, rows=rows, chunk=chunk)
        times: dict[str, float] = {}
        killed_at = kill_group_when(start_run(job), out, sim, 1, rng, chunk_rows=chunk, times=times)
        assert killed_at == 1
        journaled = [k for k in s3_server.keys(bucket, "out.aiq/journal/") if k.endswith(".jsonl")]
        assert journaled, "the killed run journaled nothing in the bucket"
        served_before = sim.snapshot()["ok"]

        done = subprocess.run([sys.executable, "-m", "batch_runner.cli", "run", "--no-progress", job],
                              capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        assert done.returncode == 0, done.stderr[-3000:]
        served = sim.snapshot()
        table = DeltaTable(out).to_pyarrow_table()
        assert sorted(table.column("review_id").to_pylist()) == list(range(1, rows + 1)), seed
        assert set(table.column("aiq_status").to_pylist()) == {"ok"}
        usage = DeltaTable(f"{out}.aiq/endpoint_usage").to_pyarrow_table()
        billed = usage.column("databricks_request_id").to_pylist()
        assert len(set(billed)) == len(billed), "an answer is in the usage table twice"
        answers = {a["request_id"]: a["at"] for a in sim.served_answers()}
        assert set(billed) <= set(answers)
        # What the kill re-bought: the answers in flight at it (served after it, or just before)
        # and those still queued for the journal's next object (served in the last REMOTE_FLUSH_S,
        # plus a write or two and the client's own delay: 0.5 s). Every answer served before that
        # window was journaled in the bucket and bought once; there were enough of them in the
        # killed chunk that a journal that did not work would have lost them.
        window = times["killed"] - (REMOTE_FLUSH_S + 0.5)
        paid_once = set(billed)
        lost = {r: at for r, at in answers.items() if r not in paid_once}
        assert len(lost) == served["ok"] - len(billed)
        early_lost = sorted(at - times["killed"] for at in lost.values() if at < window)
        assert not early_lost, (f"{len(early_lost)} answers served before the journal's window (s before the kill: "
                                f"{early_lost[:5]}) were bought again; seed {seed}")
        early = sum(1 for at in answers.values() if times["committed"] < at < window)
        assert early >= 50, f"only {early} answers of the killed chunk came before the window: no test of the journal; seed {seed}"
        assert pc.sum(table.column("aiq_prompt_tokens")).as_py() == pc.sum(usage.column("input_token_count")).as_py()
        assert not [k for k in s3_server.keys(bucket, "out.aiq/journal/") if not k.endswith("/")]  # every journaled answer is committed
        report = run_incremental(JobSpec.load(job), spark, progress=False)
        assert report.rows == 0 and sim.snapshot()["requests"] == served["requests"]
