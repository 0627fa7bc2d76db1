"""Acceptance: exactly once across Spark task attempts, and a killed run stops sending.

Both run ``ai-query run`` as a real subprocess against the simulator (a real HTTP server in this
process that counts what it served) and kill real processes with SIGKILL:

- one Python worker, once its task has journaled most of its answers, on ``local[2,4]`` (Spark
  retries a task up to 4 times): the retry replays what the dead attempt journaled before it
  sends anything, so the answers bought twice are at most the requests in flight at the kill;
- the run's process group, then the run's group and the pyspark daemons (whose workers lead no
  group of their own): the provider sees no new request once the kill has settled.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable

from ai_query.process import cmdline
from ai_query.testing import ProviderSimulator
from tests.spark.test_job_resume import run_groups, start_run, wait_groups_gone, write_job

ROWS = 600  # one chunk: two tasks of 300 rows on local[2,4]
SETTLE_S = 0.5


def _journal_lines(out_aiq) -> dict[int, int]:
    """Lines journaled so far by each Python worker (the pid is in the file name)."""
    lines: dict[int, int] = {}
    for path in out_aiq.glob("journal/run-*/part-*.jsonl"):
        pid = int(re.match(r"part-.*-(\d+)-\d+\.jsonl$", path.name).group(1))
        lines[pid] = lines.get(pid, 0) + path.read_bytes().count(b"\n")
    return lines


@pytest.mark.spark
def test_a_retried_task_replays_what_the_killed_attempt_journaled(tmp_path):
    with ProviderSimulator(api_key="sk-sim", latency=("uniform", (0.02, 0.12)), seed=5, served_log=True) as sim:
        job = write_job(tmp_path, sim, rows=ROWS, chunk=ROWS)
        proc = start_run(job, "--master", "local[2,4]")
        deadline = time.monotonic() + 600
        victim = None
        while victim is None:  # a worker whose task has most (2/3) of its 300 answers journaled
            assert proc.poll() is None, f"the run ended before the kill: {proc.communicate()}"
            assert time.monotonic() < deadline, "no progress"
            victim = next((pid for pid, n in _journal_lines(tmp_path / "out.aiq").items() if n >= 200), None)
            time.sleep(0.002)
        # The other worker pauses while the kill settles, so that what the provider received
        # minus what was journaled is what was in flight at the kill (sent, never read).
        others = [pid for pid in _journal_lines(tmp_path / "out.aiq") if pid != victim]
        for pid in others:
            os.kill(pid, signal.SIGSTOP)
        os.kill(victim, signal.SIGKILL)
        time.sleep(0.3)  # the dead worker's last requests reach the provider
        in_flight = sim.snapshot()["requests"] - sum(_journal_lines(tmp_path / "out.aiq").values())
        for pid in others:
            os.kill(pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        served = sim.served_answers()

    table = DeltaTable(str(tmp_path / "out")).to_pyarrow_table()
    assert sorted(table.column("review_id").to_pylist()) == list(range(1, ROWS + 1))
    assert set(table.column("aiq_status").to_pylist()) == {"ok"}
    # Every prompt is distinct: each answer past ROWS was bought twice. Those can only be the
    # requests in flight at the kill (sent by the killed worker, never read by it).
    bought_twice = len(served) - ROWS
    assert bought_twice <= in_flight, (bought_twice, in_flight, victim)
    # the usage table: each committed answer once, with the tokens the provider counted for it
    usage = DeltaTable(str(tmp_path / "out.aiq" / "endpoint_usage")).to_pyarrow_table()
    billed = usage.column("databricks_request_id").to_pylist()
    by_id = {a["request_id"]: a for a in served}
    assert len(billed) == len(set(billed)) == ROWS and set(billed) <= set(by_id)
    assert sorted(billed) == sorted(table.column("aiq_request_id").to_pylist())
    assert pc.sum(usage.column("input_token_count")).as_py() == sum(by_id[r]["prompt_tokens"] for r in billed)
    assert pc.sum(usage.column("output_token_count")).as_py() == sum(by_id[r]["completion_tokens"] for r in billed)


def _kill_and_count(sim: ProviderSimulator, proc: subprocess.Popen, *, daemons_too: bool) -> tuple[set[int], int]:
    """SIGKILL the run (and its pyspark daemons); the run's process groups and the requests that
    reached the provider after the settle time (which must be none)."""
    groups = run_groups(proc.pid)
    daemons = [g for g in groups if b"pyspark.daemon" in cmdline(g)]  # a daemon leads its workers' group
    assert daemons, f"no pyspark daemon among the run's process groups {groups}"
    if daemons_too:  # as a node's OOM killer or a harness killing every group could: workers orphaned
        for pid in daemons:
            os.kill(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(SETTLE_S)
    settled = sim.snapshot()["requests"]
    time.sleep(2)  # a worker that survived would still be sending now
    return groups, sim.snapshot()["requests"] - settled


@pytest.mark.spark
def test_a_killed_run_stops_sending(tmp_path):
    with ProviderSimulator(api_key="sk-sim", latency=("uniform", (0.02, 0.12)), seed=3) as sim:
        job = write_job(tmp_path, sim, rows=3000, chunk=3000)
        for daemons_too in (False, True):
            start = sim.snapshot()["requests"]
            proc = start_run(job)
            while sim.snapshot()["requests"] < start + 300:  # mid-task, well before the chunk's 3,000
                assert proc.poll() is None, f"the run ended early: {proc.communicate()}"
                time.sleep(0.01)
            groups, later = _kill_and_count(sim, proc, daemons_too=daemons_too)
            proc.stdout.close()
            proc.stderr.close()
            assert later == 0, f"{later} requests reached the provider {SETTLE_S} s after the kill (daemons killed: {daemons_too})"
            wait_groups_gone(groups)
