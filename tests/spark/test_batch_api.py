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
from ai_query.transport import TransportError
from batch_runner import JobSpec, run_incremental
from tests.spark.test_job_resume import start_run, write_job

ROWS = 2000
PRICES = {"input_usd_per_million_tokens": 0.5, "output_usd_per_million_tokens": 1.5}


def _job(tmp_path, sim, rows, batch: str, chunk: int = 500, provider: str = "openai") -> str:
    job = write_job(tmp_path, sim, rows=rows, chunk=chunk)
    if provider == "anthropic":
        endpoints = json.loads((tmp_path / "endpoints.json").read_text())
        model = endpoints["config"]["served_entities"][0]["external_model"]
        model["provider"] = "anthropic"
        del model["openai_config"]
        model["anthropic_config"] = {"anthropic_api_key": "{{secrets/sim/key}}", "anthropic_api_base": sim.url}
        (tmp_path / "endpoints.json").write_text(json.dumps(endpoints))
    with open(job, "a") as fh:
        fh.write("\n[batch_api]\n" + batch + "\n")
    return job


def _tables(tmp_path):
    table = DeltaTable(str(tmp_path / "out")).to_pyarrow_table()
    usage = DeltaTable(str(tmp_path / "out.aiq" / "endpoint_usage")).to_pyarrow_table()
    return table, usage


def _run_all_ok(tmp_path, spark, sim, job, rows):
    """Run the job in this process; every key once and ``ok``. Returns (report, served, table, usage)."""
    report = run_incremental(JobSpec.load(job), spark, progress=False)
    served = sim.snapshot()
    table, usage = _tables(tmp_path)
    assert sorted(table.column("review_id").to_pylist()) == list(range(1, rows + 1))
    assert set(table.column("aiq_status").to_pylist()) == {"ok"}
    return report, served, table, usage


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
        report, served, table, usage = _run_all_ok(tmp_path, spark, sim, job, ROWS)
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
        assert not (tmp_path / "out.aiq" / "batches").exists()  # forgotten once every row is committed


@pytest.mark.spark
def test_killed_while_batches_in_progress_resumes_polling_without_resubmitting(tmp_path, spark):
    """A real ``ai-query run`` is SIGKILLed while its batch is in progress; the next run polls the
    recorded batch. Mutation caught: not reading ``<state>/batches/`` on resume (batches_created == 2)."""
    rows = 300
    with ProviderSimulator(api_key="sk-sim", batch_api={"delay_s": 8.0}) as sim:
        job = _job(tmp_path, sim, rows, 'poll_s = 0.05\nmax_poll_s = 0.2')
        proc = start_run(job)
        state = tmp_path / "out.aiq" / "batches"
        give_up = time.monotonic() + 300
        while not [p for p in state.glob("batch_*.json")]:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < give_up, "the run never submitted a batch"
            time.sleep(0.02)
        (batch_id,) = [p.stem for p in state.glob("batch_*.json")]
        assert sim.batches.batches[batch_id].status in ("validating", "in_progress")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
        assert sim.snapshot()["batches_created"] == 1
        assert sim.batches._advance(sim.batches.batches[batch_id], time.monotonic()) in ("validating", "in_progress")

        report, served, table, usage = _run_all_ok(tmp_path, spark, sim, job, rows)
        assert served["batches_created"] == 1, "the resumed run submitted its rows again"
        assert report.batch_phase.resumed == 1 and report.batch_phase.submitted == 0
        assert served["requests"] == 0
        assert set(table.column("aiq_batch_id").to_pylist()) == {batch_id}
        assert usage.num_rows == rows and pc.sum(usage.column("input_token_count")).as_py() == served["batch_prompt_tokens"]


@pytest.mark.spark
def test_a_batch_created_but_never_recorded_is_found_by_its_metadata_not_sent_again(tmp_path, spark):
    """The simulator makes the first batch but loses its answer (a reset connection: what a run
    killed between the create and its state write leaves). That run fails; the next one finds the
    batch by its intent's metadata and polls it. Mutations caught: no orphan lookup on resume
    (batches_created == 2); the intent written after the create instead of before (no intent
    survives the failed create: batches_created == 2)."""
    rows = 100
    with ProviderSimulator(api_key="sk-sim", batch_api={"delay_s": 0.3, "lost_creates": 1}) as sim:
        job = _job(tmp_path, sim, rows, 'poll_s = 0.05')
        with pytest.raises(TransportError, match="closed before the answer was complete"):
            run_incremental(JobSpec.load(job), spark, progress=False)
        assert sim.snapshot()["batches_created"] == 1
        assert len(list((tmp_path / "out.aiq" / "batches").glob("_intent-*.json"))) == 1
        report, served, table, _ = _run_all_ok(tmp_path, spark, sim, job, rows)
        assert served["batches_created"] == 1, "the batch a failed run created was sent again"
        assert report.batch_phase.resumed == 1 and report.batch_phase.submitted == 0
        assert served["requests"] == 0 and table.column("aiq_batch_id").null_count == 0


@pytest.mark.spark
def test_deadline_shorter_than_the_batch_moves_the_rest_online(tmp_path, spark):
    """The batch would take 120 s; the deadline is 3 s: the batch is cancelled, the lines it did
    are kept, the rest go online, the job ends with every row ok. Mutations caught: no cancel at
    the deadline (the run waits for the batch: batches_cancelled == 0); lines finished before the
    cancel not collected (online requests == rows)."""
    rows = 200
    with ProviderSimulator(api_key="sk-sim", batch_api={"delay_s": 120.0}) as sim:
        job = _job(tmp_path, sim, rows, 'deadline = "3s"\nonline_rows_per_s = 100000\npoll_s = 0.05\nmax_poll_s = 0.2')
        report, served, table, usage = _run_all_ok(tmp_path, spark, sim, job, rows)
        assert served["batches_created"] == 1 and served["batches_cancelled"] == 1 and report.batch_phase.cancelled == 1
        in_batch = rows - table.column("aiq_batch_id").null_count
        assert in_batch == served["batch_lines_ok"] == report.batch_phase.answered
        assert served["requests"] == rows - in_batch  # exactly the rows the batch did not finish went online
        assert usage.num_rows == rows
        assert pc.sum(usage.column("input_token_count")).as_py() == served["batch_prompt_tokens"] + served["prompt_tokens"]
        assert report.pending_after == 0


@pytest.mark.spark
def test_a_job_on_an_endpoint_in_batch_mode_sends_its_remainder_online_not_as_new_batches(tmp_path, spark):
    """The endpoint itself has ``client_config.batch_api`` (as for SQL); after the job's batch
    phase its chunks must go online. Mutation caught: the chunks run without the online-only
    property (the remainder goes out as new batches: batches_created > 1, requests == 0)."""
    rows = 120
    with ProviderSimulator(api_key="sk-sim", batch_api={"delay_s": 120.0}) as sim:
        job = _job(tmp_path, sim, rows, 'deadline = "3s"\nonline_rows_per_s = 100000\npoll_s = 0.05\nmax_poll_s = 0.2')
        endpoints = json.loads((tmp_path / "endpoints.json").read_text())
        endpoints["client_config"]["batch_api"] = {"poll_s": 0.05}
        (tmp_path / "endpoints.json").write_text(json.dumps(endpoints))
        report, served, table, _ = _run_all_ok(tmp_path, spark, sim, job, rows)
        assert served["batches_created"] == 1 and served["batches_cancelled"] == 1
        assert served["requests"] == rows - served["batch_lines_ok"] > 0


@pytest.mark.spark
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_failed_lines_of_a_batch_are_retried_alone(tmp_path, spark, provider):
    """A seeded 15 % of batch lines fail (500 in the error file); the rows are split into 3 batches
    (max_requests = 70). Only the failed lines go online, at the online price. Mutations caught:
    error lines journaled as answers (rows with status error); every line of a batch with an error
    sent again (online requests > failed lines); split ignoring max_requests (batches_created == 1)."""
    rows = 200
    with ProviderSimulator(api_key="sk-sim", batch_api={"delay_s": 0.3, "error_rate": 0.15}) as sim:
        job = _job(tmp_path, sim, rows, 'poll_s = 0.05\nmax_requests = 70', provider=provider)
        report, served, table, _ = _run_all_ok(tmp_path, spark, sim, job, rows)
        failed_lines = served["batch_lines"] - served["batch_lines_ok"]
        assert served["batches_created"] == 3 and served["batch_lines"] == rows
        assert failed_lines > 0 and report.batch_phase.failed_lines == failed_lines
        assert served["requests"] == failed_lines
        online = table.filter(pc.is_null(table.column("aiq_batch_id")))
        batched = table.filter(pc.is_valid(table.column("aiq_batch_id")))
        assert online.num_rows == failed_lines
        assert pc.sum(online.column("aiq_cost_usd")).as_py() == pytest.approx(_expected_cost(online, batch_rate=False))
        assert pc.sum(batched.column("aiq_cost_usd")).as_py() == pytest.approx(_expected_cost(batched, batch_rate=True))


@pytest.mark.spark
def test_plan_shows_online_and_batch_cost_and_finish(tmp_path, spark):
    """Mutation caught: the plan pricing batch mode at the online rate (ratio 1), or ignoring the deadline."""
    from batch_runner._plan import plan_job

    with ProviderSimulator(api_key="sk-sim") as sim:
        job = _job(tmp_path, sim, 60, 'deadline = "6h"')
        plan = plan_job(JobSpec.load(job), spark)
        (e,) = plan.endpoints
        assert e.cost_usd and e.batch_cost_usd == pytest.approx(e.cost_usd / 2)
        assert e.batch_seconds == 6 * 3600 and e.seconds is not None
        text = plan.render()
        assert f"{e.batch_cost_usd:.4f} USD, done within 6.0 h" in text
