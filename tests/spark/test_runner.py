"""The batch runner end to end on real Spark, real Delta tables and the provider simulator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable, write_deltalake

from ai_query import ConfigError
from ai_query.testing import ProviderSimulator
from batch_runner import JobSpec, run_job, write_sample_reviews
from spark_udfs import AUDIT_COLUMNS


@pytest.fixture(scope="module")
def sim():
    with ProviderSimulator(api_key="sk-sim") as simulator:
        yield simulator


@pytest.fixture
def workdir(tmp_path, sim):
    (tmp_path / "endpoints.json").write_text(json.dumps({"name": "sim-chat", "config": {"served_entities": [{
        "name": "sim", "external_model": {"name": "sim-model", "provider": "openai", "task": "llm/v1/chat",
        "openai_config": {"openai_api_key": "{{secrets/sim/key}}", "openai_api_base": sim.base_url}}}]},
        "client_config": {"max_attempts": 3}}))
    write_sample_reviews(str(tmp_path / "reviews"), rows=60)
    sim.reset()
    return tmp_path


def write_spec(workdir, query, **extra):
    options = extra.pop("options", "")
    (workdir / "job.toml").write_text(textwrap.dedent(f'''
        name = "t"
        endpoints = "endpoints.json"
        key = ["review_id"]
        query = """{query}"""
        [sources]
        reviews = "reviews"
        [output]
        path = "out"
        mode = "{extra.get('mode', 'overwrite')}"
        [options]
        {options}
    '''))
    return workdir / "job.toml"


QUERY = "SELECT review_id, review, ai_query('sim-chat', CONCAT(CASE WHEN review_id % 20 = 0 THEN '[[status:400]] ' ELSE '' END, review)) AS answer FROM reviews"


def test_job_writes_every_row_with_audit_columns(spark, workdir, sim):
    spec = JobSpec.load(write_spec(workdir, QUERY))
    summary = run_job(spec, spark=spark, progress=False)
    table = DeltaTable(str(workdir / "out")).to_pyarrow_table()
    assert table.num_rows == 60 and summary.rows == 60
    assert set(AUDIT_COLUMNS) <= set(table.column_names) and "answer" in table.column_names
    assert sorted(table.column("review_id").to_pylist()) == list(range(1, 61))
    rows = {r["review_id"]: r for r in table.to_pylist()}
    failed = sorted(i for i, r in rows.items() if r["aiq_status"] == "error")
    assert failed == [20, 40, 60] and summary.rows_failed == 3
    assert all("HTTP 400" in rows[i]["aiq_error"] and rows[i]["answer"] is None for i in failed)
    assert rows[1]["answer"] == "echo: " + rows[1]["review"]
    assert rows[1]["aiq_endpoint"] == "sim-chat" and rows[1]["aiq_model"] == "sim-model" and rows[1]["aiq_attempts"] == 1
    # token counts in the table are exactly what the server served
    assert pc.sum(table.column("aiq_prompt_tokens")).as_py() == sim.stats.prompt_tokens
    assert pc.sum(table.column("aiq_completion_tokens")).as_py() == sim.stats.completion_tokens
    assert summary.total_tokens == sim.stats.total_tokens
    # a row answered by an identical request of the query sent nothing itself
    assert sim.stats.requests == 60 - summary.rows_deduplicated
    assert "deduplicated" in summary.render()
    # readable through Spark too
    assert spark.read.format("delta").load(str(workdir / "out")).filter("aiq_status = 'ok'").count() == 57


def test_append_mode_adds_a_version(spark, workdir):
    spec = JobSpec.load(write_spec(workdir, QUERY, mode="append"))
    run_job(spec, spark=spark, progress=False)
    run_job(spec, spark=spark, progress=False)
    dt = DeltaTable(str(workdir / "out"))
    assert dt.to_pyarrow_table().num_rows == 120
    assert dt.transaction_version("ai-query:t") == 2


@pytest.mark.parametrize("mode", ["append", "overwrite"])
def test_an_output_written_before_the_newer_audit_columns_gains_them(spark, workdir, mode):
    # mutation caught: run_job not passing merge_schema (the write is refused: columns not in the table)
    spec = JobSpec.load(write_spec(workdir, QUERY, mode=mode))
    run_job(spec, spark=spark, progress=False)
    out = str(workdir / "out")
    earlier = DeltaTable(out).to_pyarrow_table().drop_columns(["aiq_status_code", "aiq_batch_id"])
    write_deltalake(out, earlier, mode="overwrite", schema_mode="overwrite")  # as an earlier version left it
    run_job(spec, spark=spark, progress=False)
    table = DeltaTable(out).to_pyarrow_table()
    codes = table.column("aiq_status_code").to_pylist()
    assert table.num_rows == (120 if mode == "append" else 60) and "aiq_batch_id" in table.column_names
    assert sorted(c for c in codes if c is not None) == [200] * 57 + [400] * 3
    assert codes.count(None) == (60 if mode == "append" else 0)


@pytest.mark.parametrize(
    "body, message",
    [
        ('name = "x"\nquery = "SELECT 1"\n[output]\npath = "o"', "[sources]"),
        ('name = "x y"', "name must be a short identifier"),
        ('name = "x"\nquery = "SELECT 1"\n[sources]\nr = "r"\n[output]\npath = "o"\nmode = "merge-ish"', "output.mode"),
        ('name = "x"\nqeury = "SELECT 1"', "unknown key(s) qeury"),
    ],
)
def test_bad_specs_name_the_key(tmp_path, body, message):
    (tmp_path / "bad.toml").write_text(body)
    with pytest.raises(ConfigError) as info:
        JobSpec.load(tmp_path / "bad.toml")
    assert message in str(info.value)


def test_query_without_ai_query_is_refused(spark, workdir):
    spec = JobSpec.load(write_spec(workdir, "SELECT review_id FROM reviews"))
    with pytest.raises(ConfigError, match="no ai_query"):
        run_job(spec, spark=spark, progress=False)


def test_cli_exit_codes_and_messages(workdir, sim):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    spec = write_spec(workdir, QUERY, options="allowed_failure_rate = 0.01")
    out = subprocess.run([sys.executable, "-m", "batch_runner.cli", "run", "--no-progress", str(spec)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 3, out.stderr
    assert "3 of 60 rows failed" in out.stderr and "rows ok" in out.stdout
    out = subprocess.run([sys.executable, "-m", "batch_runner.cli", "run", "--no-progress", "--json", str(spec)],
                         capture_output=True, text=True, env=env, timeout=300)
    summary = json.loads(out.stdout)  # stdout is the JSON document alone; messages stay on stderr
    assert out.returncode == 3 and summary["exit_code"] == 3, out.stderr
    (job,) = summary["jobs"]
    assert (job["rows"], job["rows_ok"], job["rows_failed"], job["failure_rate"]) == (60, 57, 3, 0.05)
    assert job["total_tokens"] == job["prompt_tokens"] + job["completion_tokens"] > 0
    usage = subprocess.run([sys.executable, "-m", "batch_runner.cli", "run", "--no-such-option", str(spec)],
                           capture_output=True, text=True, env=env, timeout=300)
    assert usage.returncode == 64 and "unrecognized arguments: --no-such-option" in usage.stderr  # usage, not systemic (2)
    bad = write_spec(workdir, "SELECT review_id, ai_query('nope', review) AS a FROM reviews")
    out = subprocess.run([sys.executable, "-m", "batch_runner.cli", "run", str(bad)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2
    assert "unknown endpoint 'nope'" in out.stderr and "'sim-chat'" in out.stderr
    assert "Traceback" not in out.stderr
