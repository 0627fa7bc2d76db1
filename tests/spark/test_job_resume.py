"""Acceptance: `ai-query run` killed with SIGKILL mid-job, three times, then re-run: every key once,
all ok, and the usage table holds every answer the job received once, with the tokens the
simulator counted for it; the only answers it lacks are those in flight at a kill (served, never
read by the dead process: at most the requests in flight); a finished job sends nothing.

The job runs as a real subprocess (its own Spark driver, JVM and Python workers, in their own
process group); the simulator runs in this process and counts what it served.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable

from ai_query.process import descendants, group_alive
from ai_query.testing import ProviderSimulator
from batch_runner import JobSpec, write_sample_reviews
from batch_runner import job_status, run_incremental

ROWS = 2000
CHUNK = 200
JOB_ID = "ai-query:resume"


def _endpoints(sim: ProviderSimulator) -> dict:
    return {"name": "sim-chat", "config": {"served_entities": [{
        "name": "sim", "pricing": {"input_usd_per_million_tokens": 0.5, "output_usd_per_million_tokens": 1.5},
        "external_model": {"name": "sim-model", "provider": "openai", "task": "llm/v1/chat",
                           "openai_config": {"openai_api_key": "{{secrets/sim/key}}", "openai_api_base": sim.base_url}}}]},
        "client_config": {"max_attempts": 3, "max_concurrency": 32}}


def write_job(workdir, sim, rows: int = ROWS, chunk: int = CHUNK, extra_options: str = "") -> str:
    (workdir / "endpoints.json").write_text(json.dumps(_endpoints(sim)))
    if not (workdir / "reviews").exists():
        write_sample_reviews(str(workdir / "reviews"), rows=rows)
    (workdir / "job.toml").write_text(textwrap.dedent(f'''
        name = "resume"
        endpoints = "endpoints.json"
        key = ["review_id"]
        [prompt]
        endpoint = "sim-chat"
        template = "Review {{review_id}} of {{product}}: {{review}}"
        column = "answer"
        max_tokens = 12
        [sources]
        reviews = "reviews"
        [output]
        path = "out"
        mode = "merge"
        inference_path = "payloads"
        max_payload_bytes = 40
        [options]
        chunk_rows = {chunk}
        {extra_options}
    '''))
    return str(workdir / "job.toml")


def start_run(job: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "batch_runner.cli", "run", "--no-progress", job, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def committed(path: str) -> int:
    return int(DeltaTable(path).transaction_version(JOB_ID) or 0) if DeltaTable.is_deltatable(path) else 0


def run_groups(pid: int) -> set[int]:
    """The process groups of a run: its own and those of its descendants (pyspark's daemons lead
    their own groups, with the Python workers they fork in them)."""
    groups = {os.getpgid(pid)}
    for child in descendants(pid):
        try:
            groups.add(os.getpgid(child))
        except ProcessLookupError:
            pass
    return groups


def wait_groups_gone(groups: set[int]) -> None:
    """Every process of ``groups`` exits soon (a process of a killed run that survives fails the test)."""
    for _ in range(200):
        alive = [g for g in groups if group_alive(g)]
        if not alive:
            return
        time.sleep(0.05)
    pytest.fail(f"processes of the killed run survived SIGKILL in groups {alive}")


def kill_group_when(proc: subprocess.Popen, out: str, sim: ProviderSimulator, chunks: int, rng: random.Random,
                    timeout: float = 600, chunk_rows: int | None = None, times: dict[str, float] | None = None) -> int:
    """SIGKILL the run's whole process group inside the chunk after ``chunks`` committed chunks,
    once a random 50-85 % of that chunk's answers have been served (so that a journal that did
    not work would lose far more than the requests in flight at the kill). ``times`` gets
    ``committed`` (when the commits were seen: the next chunk's answers come after it) and
    ``killed`` (``time.monotonic()``, the simulator's clock)."""
    deadline = time.monotonic() + timeout
    while committed(out) < chunks:
        assert proc.poll() is None, f"the run ended before chunk {chunks}: {proc.communicate()}"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.02)
    if times is not None:
        times["committed"] = time.monotonic()
    target = sim.snapshot()["ok"] + int(rng.uniform(0.5, 0.85) * (chunk_rows or CHUNK))
    while sim.snapshot()["ok"] < target and committed(out) == chunks:
        assert proc.poll() is None, f"the run ended inside chunk {chunks + 1}: {proc.communicate()}"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.002)
    groups = run_groups(proc.pid)
    assert len(groups) > 1, groups  # the pyspark daemons' groups, where the Python workers live
    if times is not None:
        times["killed"] = time.monotonic()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    wait_groups_gone(groups)  # the JVM, the daemons and the Python workers are gone too
    proc.stdout.close()
    proc.stderr.close()
    return committed(out)


@pytest.mark.spark
def test_killed_three_times_then_exactly_once(tmp_path, spark):
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    with ProviderSimulator(api_key="sk-sim", latency=("uniform", (0.02, 0.12)), seed=seed, served_log=True) as sim:
        job = write_job(tmp_path, sim)
        out = str(tmp_path / "out")
        kills: list[int] = []
        starts: list[float] = []  # when each run started: its requests reach the server after it
        for after in (1, 5, 8):  # after the first commit, mid-run, near the end (of 10 chunks)
            starts.append(time.monotonic())
            kills.append(kill_group_when(start_run(job), out, sim, after, rng))
        assert kills[-1] < ROWS // CHUNK, f"the last kill came after the job finished ({kills}); seed {seed}"
        starts.append(time.monotonic())

        done = subprocess.run([sys.executable, "-m", "batch_runner.cli", "run", "--no-progress", job],
                              capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        assert done.returncode == 0, done.stderr[-3000:]
        served = sim.snapshot()

        table = DeltaTable(out).to_pyarrow_table()
        keys = table.column("review_id").to_pylist()
        assert sorted(keys) == list(range(1, ROWS + 1)), f"lost or duplicated keys; kills at chunks {kills}, seed {seed}"
        assert set(table.column("aiq_status").to_pylist()) == {"ok"}
        rows = {r["review_id"]: r for r in table.select(["review_id", "review", "product", "answer"]).to_pylist()}
        assert rows[7]["answer"] == f"echo: Review 7 of {rows[7]['product']}: {rows[7]['review']}"[: len(rows[7]["answer"])]

        # Every answer the job received is in the usage table once, with the tokens the server
        # counted. The only answers missing are those of requests in flight when a kill struck:
        # served (and billed) by the provider but never read by the dead process. At a kill at
        # most max_concurrency (32) requests per Python worker (2) are in flight.
        usage = DeltaTable(str(tmp_path / "out.aiq" / "endpoint_usage")).to_pyarrow_table()
        answers = {a["request_id"]: a for a in sim.served_answers()}
        assert len(answers) == served["ok"]
        billed = usage.column("databricks_request_id").to_pylist()
        assert len(set(billed)) == len(billed), "an answer is in the usage table twice"
        assert set(billed) <= set(answers), "a usage row names no answer the server sent"
        billed_ids = set(billed)
        lost = [a for rid, a in answers.items() if rid not in billed_ids]
        per_kill = [sum(1 for a in lost if start <= a["received_at"] < end) for start, end in zip(starts, starts[1:])]
        assert sum(per_kill) == len(lost), f"answers to requests of the last run are not in the usage table: {lost[:3]}"
        assert all(n <= 2 * 32 for n in per_kill), f"more answers lost at a kill than were in flight: {per_kill}; seed {seed}"
        kept = [answers[rid] for rid in billed]
        assert pc.sum(usage.column("input_token_count")).as_py() == sum(a["prompt_tokens"] for a in kept), (kills, seed)
        assert pc.sum(usage.column("output_token_count")).as_py() == sum(a["completion_tokens"] for a in kept), (kills, seed)
        assert usage.num_rows == served["ok"] - len(lost), (kills, seed)
        assert pc.sum(table.column("aiq_prompt_tokens")).as_py() == pc.sum(usage.column("input_token_count")).as_py()
        assert sorted(json.loads(c["key"]) for c in usage.column("usage_context").to_pylist() for c in [dict(c)]) == list(range(1, ROWS + 1))
        payloads = DeltaTable(str(tmp_path / "payloads")).to_pyarrow_table()
        assert payloads.num_rows == usage.num_rows and all(len(p.encode()) <= 40 for p in payloads.column("request").to_pylist())
        assert DeltaTable(out).transaction_version(JOB_ID) >= ROWS // CHUNK
        assert not (tmp_path / "out.aiq" / "journal").exists()  # every journaled answer is committed

        # a finished job sends nothing (re-run in this process's Spark session: no second JVM start)
        report = run_incremental(JobSpec.load(job), spark, progress=False)
        assert sim.snapshot()["requests"] == served["requests"]
        assert report.rows == 0 and report.pending_before == 0 and report.table_rows == ROWS
        status = job_status(JobSpec.load(job))
        assert (status.done, status.failed, status.pending) == (ROWS, 0, 0)
        assert [r["status"] for r in status.runs].count("running") == 3  # the three killed runs show as interrupted
        assert status.usage_prompt_tokens == pc.sum(usage.column("input_token_count")).as_py()
