"""Batch-API mode for jobs (``[batch_api]``) against the simulator's OpenAI Batch API, over real
HTTP, with real Spark jobs and Delta tables read back. Counts, never wall-clock times.

Each test names the mutation it catches (checked by applying it once and seeing the test fail).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable

from ai_query.testing import ProviderSimulator
from batch_runner import JobSpec, run_incremental
from tests.spark.test_job_resume import start_run, write_job

ROWS = 2000
PRICES = {"input_usd_per_million_tokens": 0.5, "output_usd_per_million_tokens": 1.5}


def _job(tmp_path, sim, rows, batch: str, chunk: int = 500) -> str:
    job = write_job(tmp_path, sim, rows=rows, chunk=chunk)
    with open(job, "a") as fh:
        fh.write("\n[batch_api]\n" + batch + "\n")
    return job


def _tables(tmp_path):
    table = DeltaTable(str(tmp_path / "out")).to_pyarrow_table()
    usage = DeltaTable(str(tmp_path / "out.aiq" / "endpoint_usage")).to_pyarrow_table()
    return table, usage


def _expected_cost(table, batch_rate: bool) -> float:
    factor = 0.5 if batch_rate else 1.0
    return sum((r["aiq_prompt_tokens"] * PRICES["input_usd_per_million_tokens"]
                + r["aiq_completion_tokens"] * PRICES["output_usd_per_million_tokens"]) * factor / 1e6
               for r in table.select(["aiq_prompt_tokens", "aiq_completion_tokens"]).to_pylist())


@pytest.mark.spark
def test_batch_mode_job_every_key_once_usage_equals_served_cost_at_batch_rate(tmp_path, spark):
    """Mutations caught: answers journaled under another key than the UDF's (every row goes
    online: requests > 0); the online price in the batch journal (cost == online rate); a second
    batch for requests a recorded batch carries (batches_created > 1); ``aiq_batch_id`` left null."""
    with ProviderSimulator(api_key="sk-sim", batch_api={"delay_s": 0.5}) as sim:
        job = _job(tmp_path, sim, ROWS, 'poll_s = 0.05')
        report = run_incremental(JobSpec.load(job), spark, progress=False)
        served = sim.snapshot()
        table, usage = _tables(tmp_path)
        assert sorted(table.column("review_id").to_pylist()) == list(range(1, ROWS + 1))
        assert set(table.column("aiq_status").to_pylist()) == {"ok"}
        assert served["requests"] == 0, "rows went online although the batch answered them"
        assert served["batches_created"] == 1 and served["batch_lines"] == ROWS
        assert usage.num_rows == ROWS
        assert pc.sum(usage.column("input_token_count")).as_py() == served["batch_prompt_tokens"]
        assert pc.sum(usage.column("output_token_count")).as_py() == served["batch_completion_tokens"]
        assert pc.sum(table.column("aiq_prompt_tokens")).as_py() == served["batch_prompt_tokens"]
        assert pc.sum(table.column("aiq_cost_usd")).as_py() == pytest.approx(_expected_cost(table, batch_rate=True))
        assert pc.sum(usage.column("cost_usd")).as_py() == pytest.approx(_expected_cost(table, batch_rate=True))
        assert table.column("aiq_batch_id").null_count == 0
        rows = {r["review_id"]: r for r in table.select(["review_id", "review", "product", "answer"]).to_pylist()}
        assert rows[7]["answer"] == f"echo: Review 7 of {rows[7]['product']}: {rows[7]['review']}"[: len(rows[7]["answer"])]
        assert report.batch_phase.submitted == 1 and report.batch_phase.answered == ROWS
        assert not (tmp_path / "out.aiq" / "batches.json").exists()  # forgotten once every row is committed
