"""Incremental jobs on the shared Spark session, real Delta tables and the provider simulator:
only new (or, asked, failed) keys are sent, merge and append, the budget guard, the plan."""

from __future__ import annotations

import json
import textwrap

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable, write_deltalake

from ai_query import ConfigError
from ai_query.testing import ProviderSimulator
from batch_runner import JobSpec, sample_reviews, write_sample_reviews
from batch_runner import job_status, run_incremental
from batch_runner._plan import plan_job

pytestmark = pytest.mark.spark


@pytest.fixture(scope="module")
def sim():
    with ProviderSimulator(api_key="sk-sim", latency_s=0.005) as simulator:
        yield simulator


@pytest.fixture
def workdir(tmp_path, sim):
    (tmp_path / "endpoints.json").write_text(json.dumps({"name": "sim-chat", "config": {"served_entities": [{
        "name": "sim", "pricing": {"input_usd_per_million_tokens": 100.0, "output_usd_per_million_tokens": 200.0},
        "external_model": {"name": "sim-model", "provider": "openai", "task": "llm/v1/chat",
                           "openai_config": {"openai_api_key": "{{secrets/sim/key}}", "openai_api_base": sim.base_url}}}]},
        "client_config": {"max_attempts": 2}}))
    sim.reset()
    return tmp_path


def write_reviews(path, rows: int, start: int = 1, hint: str = "", mode: str = "overwrite") -> None:
    table = sample_reviews(rows)
    ids = pa.array(range(start, start + rows), pa.int64())
    table = table.set_column(0, "review_id", ids)
    hints = [hint if i % 10 == 0 else "" for i in ids.to_pylist()]
    write_deltalake(str(path), table.append_column("hint", pa.array(hints)), mode=mode)


def job(workdir, body: str = "", mode: str = "merge", options: str = "") -> JobSpec:
    (workdir / "job.toml").write_text(textwrap.dedent(f'''
        name = "inc"
        endpoints = "endpoints.json"
        key = ["review_id"]
        {body or """
        [prompt]
        endpoint = "sim-chat"
        template = "{hint}#{review_id} {review}"
        column = "answer"
        max_tokens = 6
        """}
        [sources]
        reviews = "reviews"
        [output]
        path = "out"
        mode = "{mode}"
        [options]
        chunk_rows = 25
        {options}
    '''))
    return JobSpec.load(workdir / "job.toml")


def out_rows(workdir) -> dict:
    return {r["review_id"]: r for r in DeltaTable(str(workdir / "out")).to_pyarrow_table().to_pylist()}


def test_a_second_run_of_a_running_job_is_refused_before_any_request(spark, workdir, sim):
    """A schedule firing while the last run still goes: the second run stops at once, sends nothing,
    and the job runs normally once the first run's lock is gone."""
    import subprocess
    import sys

    from batch_runner import JobRunningError
    from batch_runner._job_lock import lock_path

    write_reviews(workdir / "reviews", 30)
    spec = job(workdir)
    # the first run: another process on this host that holds the job's lock (it takes it as a run does)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom batch_runner import JobSpec\nfrom batch_runner._job_lock import RunLock\n"
        f"lock = RunLock.acquire(JobSpec.load({str(workdir / 'job.toml')!r}), 'first-run')\n"
        "print('held', flush=True)\nsys.stdin.read()\nlock.release()\n")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(JobRunningError, match=rf"job 'inc' is being run by run first-run .*pid {holder.pid}"):
            run_incremental(spec, spark, progress=False)
        assert sim.stats.requests == 0
        assert not (workdir / "out").exists()
        status = job_status(spec)  # where the refusal sends the user: it names the run going now
        assert status.running == "first-run" and f"pid {holder.pid}" in status.render()
    finally:
        holder.communicate("", timeout=60)
    assert not (workdir / "out.aiq" / "run.lock").exists() and lock_path(spec).endswith("run.lock")
    report = run_incremental(spec, spark, progress=False)
    assert report.rows == 30 and sim.stats.requests == 30
    assert not (workdir / "out.aiq" / "run.lock").exists()  # released when the run ended


def test_an_output_written_before_aiq_status_code_gains_the_column(spark, workdir, sim):
    """Upgrading: a job's output written by an earlier version (no aiq_status_code) takes the next
    run's merge with the column added, NULL in its earlier rows (a merge without schema evolution
    drops the new column's values)."""
    write_reviews(workdir / "reviews", 30)
    spec = job(workdir)
    assert run_incremental(spec, spark, progress=False, limit=20).rows == 20
    out = str(workdir / "out")
    earlier = DeltaTable(out).to_pyarrow_table().drop_columns(["aiq_status_code"])
    write_deltalake(out, earlier, mode="overwrite", schema_mode="overwrite")  # as an earlier version left it
    assert "aiq_status_code" not in DeltaTable(out).to_pyarrow_table().column_names
    assert run_incremental(spec, spark, progress=False).rows == 10 and sim.stats.requests == 30
    rows = out_rows(workdir)
    assert [rows[k]["aiq_status_code"] for k in sorted(rows)] == [None] * 20 + [200] * 10


def test_only_new_and_failed_keys_are_sent(spark, workdir, sim):
    write_reviews(workdir / "reviews", 60, hint="[[status:400]] ")
    spec = job(workdir)
    first = run_incremental(spec, spark, progress=False, limit=40)
    assert (first.rows, first.chunks, first.pending_after) == (40, 2, 0) and sim.stats.requests == 40
    second = run_incremental(spec, spark, progress=False)
    assert second.rows == 20 and sim.stats.requests == 60
    rows = out_rows(workdir)
    assert sorted(rows) == list(range(1, 61))
    failed = sorted(k for k, r in rows.items() if r["aiq_status"] == "error")
    assert failed == [10, 20, 30, 40, 50, 60] and second.table_failed == 6
    assert "failed requests by HTTP status" in second.render() and "400: 2" in second.render()  # keys 50 and 60
    # the HTTP status of each row and of each request's usage row: the failed ones' 400 too (was NULL)
    assert {rows[k]["aiq_status_code"] for k in failed} == {400} and rows[7]["aiq_status_code"] == 200
    usage_codes = DeltaTable(spec.usage_table).to_pyarrow_table().column("status_code").to_pylist()
    assert sorted(usage_codes) == [200] * 54 + [400] * 6
    assert rows[7]["answer"] == " ".join(("echo: #7 " + rows[7]["review"]).split()[:6])  # max_tokens: 6 words of the echo

    # nothing new: no request; the failed rows stay failed without --retry-failed
    assert run_incremental(spec, spark, progress=False).rows == 0 and sim.stats.requests == 60
    # the source is fixed and grows: a plain run sends the 5 new keys only, --retry-failed the 6 failed too
    write_reviews(workdir / "reviews", 65)
    assert run_incremental(spec, spark, progress=False).rows == 5 and sim.stats.requests == 65
    retried = run_incremental(spec, spark, progress=False, retry_failed=True)
    assert retried.rows == 6 and sim.stats.requests == 71 and retried.table_failed == 0
    rows = out_rows(workdir)
    assert len(rows) == 65 and DeltaTable(str(workdir / "out")).to_pyarrow_table().num_rows == 65  # merged, not appended
    assert all(r["aiq_status"] == "ok" for r in rows.values())
    usage = DeltaTable(spec.usage_table).to_pyarrow_table()
    assert usage.num_rows == 71  # one row per request sent, the failed ones included
    assert pc.sum(usage.column("input_token_count")).as_py() == sim.stats.prompt_tokens
    assert set(usage.column("source").to_pylist()) == {"batch:inc"}
    assert DeltaTable(str(workdir / "out")).transaction_version("ai-query:inc") == 2 + 1 + 1 + 1  # one version per chunk
    status = job_status(spec)
    assert (status.done, status.failed, status.pending, len(status.runs)) == (65, 0, 0, 5)


def test_append_mode_adds_rows_of_new_keys_only(spark, workdir, sim):
    write_reviews(workdir / "reviews", 30)
    spec = job(workdir, mode="append")
    run_incremental(spec, spark, progress=False)
    write_reviews(workdir / "reviews", 10, start=31, mode="append")
    report = run_incremental(spec, spark, progress=False)
    table = DeltaTable(str(workdir / "out")).to_pyarrow_table()
    assert report.rows == 10 and sorted(table.column("review_id").to_pylist()) == list(range(1, 41))
    assert sim.stats.requests == 40


def test_budget_guard_stops_and_the_next_run_continues(spark, workdir, sim):
    write_reviews(workdir / "reviews", 100)
    spec = job(workdir, options="max_tokens = 600")
    report = run_incremental(spec, spark, progress=False)
    assert report.stopped and "options.max_tokens = 600 reached" in report.stopped and "run the job again" in report.stopped
    assert 600 <= report.total_tokens < 600 + 4 * 20  # chunks shrink near the budget: a few rows past it at most
    assert report.rows + report.pending_after == 100 and report.pending_after > 0
    done = out_rows(workdir)
    assert len(done) == report.rows and sim.stats.requests == report.rows  # committed rows stay, nothing else was sent
    assert job_status(spec).pending == report.pending_after
    rest = run_incremental(job(workdir), spark, progress=False)  # the budget lifted: the rest
    assert rest.rows == report.pending_after and not rest.stopped and len(out_rows(workdir)) == 100


def test_cost_budget_needs_prices(spark, workdir):
    write_reviews(workdir / "reviews", 5)
    (workdir / "endpoints.json").write_text(json.dumps({"name": "sim-chat", "config": {"served_entities": [{
        "name": "sim", "external_model": {"name": "m", "provider": "openai", "task": "llm/v1/chat",
                                          "openai_config": {"openai_api_key": "{{secrets/sim/key}}", "openai_api_base": "http://127.0.0.1:9/v1"}}}]}}))
    with pytest.raises(ConfigError, match="max_cost_usd needs prices, but endpoint 'sim-chat' has no pricing"):
        run_incremental(job(workdir, options="max_cost_usd = 1.0"), spark, progress=False)


def test_cost_budget(spark, workdir, sim):
    write_reviews(workdir / "reviews", 80)
    report = run_incremental(job(workdir, options="max_cost_usd = 0.05"), spark, progress=False)
    assert report.stopped and "max_cost_usd = 0.05 reached" in report.stopped
    assert 0.05 <= report.cost_usd < 0.07 and report.pending_after > 0


def test_plan_estimates_input_tokens_within_ten_percent(spark, workdir, sim):
    write_reviews(workdir / "reviews", 300)
    spec = job(workdir)
    blind = plan_job(spec, spark, pilot=False)
    assert sim.stats.requests == 0 and blind.pending_rows == 300 and blind.endpoints[0].output_tokens == 300 * 6
    plan = plan_job(spec, spark)
    assert sim.stats.requests == 20 and plan.pilot_requests == 20
    report = run_incremental(spec, spark, progress=False)
    assert sim.stats.requests == 300  # the pilot's 20 answers came from the journal
    assert abs(plan.input_tokens - report.prompt_tokens) <= 0.10 * report.prompt_tokens, (plan.input_tokens, report.prompt_tokens)
    assert abs(plan.output_tokens - report.completion_tokens) <= 0.10 * report.completion_tokens
    assert report.prompt_tokens == sim.stats.prompt_tokens
    assert plan.cost_usd == pytest.approx(report.cost_usd, rel=0.15)
    assert "sim-chat" in plan.render() and "calibrated by the pilot" in plan.render()


def test_input_sql_over_two_sources(spark, workdir, sim):
    write_reviews(workdir / "reviews", 12)
    products = sorted(set(sample_reviews(12).column("product").to_pylist()))
    write_deltalake(str(workdir / "products"), pa.table({"product": products, "shelf": ["A"] * len(products)}))
    (workdir / "job.toml").write_text(textwrap.dedent('''
        name = "joined"
        endpoints = "endpoints.json"
        key = "review_id"
        query = "SELECT review_id, shelf, ai_query('sim-chat', CONCAT(shelf, ': ', review)) AS answer FROM enriched"
        [sources]
        reviews = "reviews"
        products = "products"
        [input]
        view = "enriched"
        sql = "SELECT r.*, p.shelf FROM reviews r JOIN products p USING (product)"
        [output]
        path = "out"
        mode = "merge"
    '''))
    report = run_incremental(JobSpec.load(workdir / "job.toml"), spark, progress=False)
    rows = out_rows(workdir)
    assert report.rows == 12 and all(r["answer"].startswith("echo: A: ") for r in rows.values())
    assert job_status(JobSpec.load(workdir / "job.toml"), spark).pending == 0


def test_a_key_with_several_rows_is_refused(spark, workdir):
    write_sample_reviews(str(workdir / "reviews"), rows=5)
    spec = job(workdir, body='''query = "SELECT r.review_id, ai_query('sim-chat', r.review) AS a FROM reviews r CROSS JOIN reviews s"''')
    with pytest.raises(ConfigError, match="several rows for one key"):
        run_incremental(spec, spark, progress=False)
