"""Acceptance (issue 13 item 2): an `ai-query run` job rides out its provider going away.

The provider is the simulator in a process of its own, stopped mid-job (SIGTERM: it closes its
port and its connections, so the job meets refused connections, as from a crashed server) and
started again on the same port. On the way down it writes what it served, counted after its
last answer went out (a SIGKILL would leave no count), so the test holds the usage table to
exactly what was served.

- (a) down for ~20 s within the default outage_wait_s: the job waits (no chunk commits an error
  row meanwhile), then finishes with 0 failed rows, exit 0, usage == served.
  Mutation: the client not converting failures met while the breaker is open (`endpoints_fault =
  False` in ai_query/_client.py) -> rows probing during the outage spend their 2 attempts and
  fail, exit 3.
- (b) outage_wait_s shorter than the outage: the rows fail with the outage message (exit 3);
  once the provider is back, `--retry-failed` completes the job.
  Mutation: the breaker never giving up (no "give_up" in CircuitBreaker.decide) -> the job
  does not end while the provider is down.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from types import SimpleNamespace

import pyarrow.compute as pc
import pytest
from deltalake import DeltaTable

from tests.spark.test_job_resume import start_run, write_job as write_resume_job

ROWS = 300
CHUNK = 100
KEY = "sk-sim"

PROVIDER = textwrap.dedent('''
    import json, signal, sys, threading
    from ai_query.testing import ProviderSimulator
    port, out = int(sys.argv[1]), sys.argv[2]
    sim = ProviderSimulator(api_key="%s", latency_s=0.05, port=port).start()
    print(sim.port, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    sim.stop()  # the port closes; answers in flight go out first (1 s grace), then it is counted
    s = sim.stats
    with open(out, "w") as f:
        json.dump({"ok": s.ok, "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens}, f)
''' % KEY)


class Provider:
    """The simulator as a process: ``start`` (on ``port``, 0 = any), ``served()`` while up, ``stop``."""

    def __init__(self, workdir) -> None:
        self.workdir = workdir
        self.port = 0
        self.lives: list[dict] = []
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        stats = self.workdir / f"provider-{len(self.lives)}.json"
        self.proc = subprocess.Popen([sys.executable, "-c", PROVIDER, str(self.port), str(stats)], stdout=subprocess.PIPE,
                                     text=True, start_new_session=True)
        self.port = int(self.proc.stdout.readline())
        self._stats = stats

    def served(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/_sim/stats", timeout=10) as r:
            return json.loads(r.read())["ok"]

    def stop(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGTERM)
        assert self.proc.wait(timeout=30) == 0
        self.proc.stdout.close()
        self.lives.append(json.loads(self._stats.read_text()))
        self.proc = None

    def total(self, key: str) -> int:
        return sum(life[key] for life in self.lives)


def write_job(workdir, port: int, outage_wait_s: float | None) -> str:
    """The resume test's job (300 rows, chunks of 100), its endpoint with 2 attempts a row, 8 in flight."""
    job = write_resume_job(workdir, SimpleNamespace(base_url=f"http://127.0.0.1:{port}/v1"), rows=ROWS, chunk=CHUNK)
    client = {"max_attempts": 2, "max_concurrency": 8}
    if outage_wait_s is not None:
        client["outage_wait_s"] = outage_wait_s
    endpoints = json.loads((workdir / "endpoints.json").read_text())
    endpoints["client_config"] = client
    endpoints["config"]["served_entities"][0]["external_model"]["openai_config"]["openai_api_key_plaintext"] = KEY
    del endpoints["config"]["served_entities"][0]["external_model"]["openai_config"]["openai_api_key"]
    (workdir / "endpoints.json").write_text(json.dumps(endpoints))
    return job


def wait_served(provider: Provider, proc: subprocess.Popen, at_least: int) -> None:
    deadline = time.monotonic() + 600
    while provider.served() < at_least:
        assert proc.poll() is None, f"the run ended before the outage: {proc.communicate()}"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.02)


def statuses(out: str) -> list[str]:
    return DeltaTable(out).to_pyarrow_table().column("aiq_status").to_pylist() if DeltaTable.is_deltatable(out) else []


def check_usage_equals_served(workdir, provider: Provider) -> None:
    usage = DeltaTable(str(workdir / "out.aiq" / "endpoint_usage")).to_pyarrow_table()
    answered = usage.filter(pc.equal(usage.column("status_code"), 200))  # failed rows have a usage row too, 0 tokens
    assert answered.num_rows == provider.total("ok")
    assert pc.sum(usage.column("input_token_count")).as_py() == provider.total("prompt_tokens")
    assert pc.sum(usage.column("output_token_count")).as_py() == provider.total("completion_tokens")


@pytest.mark.spark
def test_a_job_waits_out_a_20_s_outage_of_its_provider_and_fails_no_row(tmp_path):
    provider = Provider(tmp_path)
    provider.start()
    job = write_job(tmp_path, provider.port, outage_wait_s=None)  # the default, 300 s
    out = str(tmp_path / "out")
    proc = start_run(job)
    try:
        wait_served(provider, proc, CHUNK + CHUNK // 2)  # inside the second chunk
        provider.stop()
        for _ in range(200):  # ~20 s down, meanwhile the run waits and commits no error row
            time.sleep(0.1)
            assert proc.poll() is None, f"the run ended while the provider was down: {proc.communicate()}"
        assert "error" not in statuses(out)
        provider.start()  # the same port
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if provider.proc is not None:
            provider.stop()
    assert proc.returncode == 0, stderr[-3000:]
    table = DeltaTable(out).to_pyarrow_table()
    assert sorted(table.column("review_id").to_pylist()) == list(range(1, ROWS + 1))
    assert set(table.column("aiq_status").to_pylist()) == {"ok"}
    assert len(provider.lives) == 2 and provider.lives[0]["ok"] < ROWS  # the outage did strike mid-job
    check_usage_equals_served(tmp_path, provider)


@pytest.mark.spark
def test_rows_fail_with_the_outage_message_after_outage_wait_s_and_retry_failed_completes_the_job(tmp_path):
    provider = Provider(tmp_path)
    provider.start()
    job = write_job(tmp_path, provider.port, outage_wait_s=2)
    out = str(tmp_path / "out")
    proc = start_run(job)
    try:
        wait_served(provider, proc, CHUNK // 2)
        provider.stop()  # and it stays down until the run has given up
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 3, stderr[-3000:]
    table = DeltaTable(out).to_pyarrow_table().to_pylist()
    failed = [r for r in table if r["aiq_status"] == "error"]
    assert len(table) == ROWS and failed and len(failed) == ROWS - provider.lives[0]["ok"]
    for row in failed:
        assert "endpoint 'sim-chat' has not answered for" in row["aiq_error"], row["aiq_error"]
        assert "client_config.outage_wait_s (2 s)" in row["aiq_error"] and "--retry-failed" in row["aiq_error"]

    provider.start()
    try:
        done = subprocess.run([sys.executable, "-m", "batch_runner.cli", "run", "--no-progress", job, "--retry-failed"],
                              capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    finally:
        provider.stop()
    assert done.returncode == 0, done.stderr[-3000:]
    table = DeltaTable(out).to_pyarrow_table()
    assert sorted(table.column("review_id").to_pylist()) == list(range(1, ROWS + 1))
    assert set(table.column("aiq_status").to_pylist()) == {"ok"}
    assert provider.lives[1]["ok"] == len(failed)  # --retry-failed asked for the failed rows only
    check_usage_equals_served(tmp_path, provider)
