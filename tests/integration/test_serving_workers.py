"""``ai-query serve --workers N``: several real server processes on one port, over real HTTP.

Each check opens fresh connections (the kernel spreads them over the workers with
``SO_REUSEPORT``) and asks ``/health`` on the same connection which worker (pid) answered, so a
test knows its requests reached every worker. Rate limits must hold for the server as a whole,
a management change made through one worker must be served by all, usage rows of every worker
must reach the one Delta table, a killed worker is started again, and no process outlives
the supervisor, however it is stopped.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from ai_query.testing import ProviderSimulator

pytestmark = pytest.mark.integration

TOKEN = "tok-workers-admin-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ASK = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def sim():
    with ProviderSimulator(api_key="sk-sim", endpoint_names=["*"]) as s:
        yield s


def chat_endpoint(sim, name: str, **extra) -> dict:
    return {"name": name, "config": {"served_entities": [{"name": "sim", "external_model": {
        "name": "sim-model", "provider": "openai", "task": "llm/v1/chat",
        "openai_config": {"openai_api_key": "{{secrets/sim/key}}", "openai_api_base": sim.base_url}}}]}, **extra}


class Served:
    """A running ``ai-query serve --workers N`` (the supervisor's process and its URL)."""

    def __init__(self, proc: subprocess.Popen, url: str) -> None:
        self.proc = proc
        self.url = url

    def worker_pids(self, connections: int = 40) -> set[int]:
        return {pid for pid, _ in self.spread(connections, None)}

    def spread(self, connections: int, send) -> list[tuple[int, httpx.Response | None]]:
        """``connections`` fresh connections: on each, ``/health`` (which worker) then ``send(client)``."""
        out = []
        for _ in range(connections):
            with httpx.Client(base_url=self.url, headers=AUTH, timeout=30) as client:
                pid = client.get("/health").json()["pid"]
                out.append((pid, send(client) if send is not None else None))
        return out


@contextmanager
def serve(tmp_path: Path, *extra: str, workers: int = 2, env: dict[str, str] | None = None) -> Iterator[Served]:
    env = {**os.environ, "AIQ_SERVING_TOKEN": TOKEN, "AIQ_SECRET_SIM_KEY": "sk-sim", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "ai_query.serving", "--port", "0", "--workers", str(workers),
                             "--state-dir", str(tmp_path / "state"), "--log-level", "warning", *extra],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once every worker is ready
        match = re.search(r"serving on (http://127\.0\.0\.1:\d+) \((\d+) workers", line)
        assert match, f"unexpected first line {line!r} (exit status {proc.poll()})"
        yield Served(proc, match.group(1))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie has exited: it only waits to be reaped by its parent
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def wait_until(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_a_rate_limit_holds_for_all_workers_together(sim, tmp_path):
    with serve(tmp_path) as served:
        with httpx.Client(base_url=served.url, headers=AUTH) as admin:
            body = chat_endpoint(sim, "limited", rate_limits=[{"calls": 10, "key": "endpoint", "renewal_period": "minute"}])
            assert admin.post("/api/2.0/serving-endpoints", json=body).status_code == 200
        answers = served.spread(40, lambda c: c.post("/serving-endpoints/limited/invocations", json=ASK))
    pids = {pid for pid, _ in answers}
    codes = [r.status_code for _, r in answers]
    assert len(pids) == 2, "the requests should have reached both workers"
    # one limit of 10 calls per minute for the server: each worker counting alone would admit ~20
    assert codes.count(200) == 10 and codes.count(429) == 30
    refused = [r for _, r in answers if r.status_code == 429]
    assert {pid for pid, r in answers if r.status_code == 429} == pids  # both workers refuse
    assert all(1 <= int(r.headers["Retry-After"]) <= 60 for r in refused)
    assert "10 calls per minute for the whole endpoint" in refused[0].json()["message"]


def test_management_changes_through_one_worker_are_served_by_all(sim, tmp_path):
    with serve(tmp_path) as served:
        with httpx.Client(base_url=served.url, headers=AUTH) as admin:
            created = admin.post("/api/2.0/serving-endpoints", json=chat_endpoint(sim, "fresh"))
            assert created.status_code == 200
        # right after the create returned: every worker serves it
        answers = served.spread(30, lambda c: c.post("/serving-endpoints/fresh/invocations", json=ASK))
        assert len({pid for pid, _ in answers}) == 2
        assert all(r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "echo: hi" for _, r in answers)
        listed = served.spread(20, lambda c: {e["name"] for e in c.get("/api/2.0/serving-endpoints").json()["endpoints"]})
        assert all("fresh" in names for _, names in listed)
        # rate limits and tags set through one worker hold on all
        with httpx.Client(base_url=served.url, headers=AUTH) as admin:
            put = admin.put("/api/2.0/serving-endpoints/fresh/rate-limits",
                            json={"rate_limits": [{"calls": 1, "key": "user", "renewal_period": "minute"}]})
            assert put.status_code == 200
            assert admin.patch("/api/2.0/serving-endpoints/fresh/tags", json={"add_tags": [{"key": "team", "value": "a"}]}).status_code == 200
        got = served.spread(20, lambda c: c.get("/api/2.0/serving-endpoints/fresh").json())
        assert all(g["rate_limits"] == [{"calls": 1, "key": "user", "renewal_period": "minute"}] and g["tags"] == [{"key": "team", "value": "a"}]
                   for _, g in got)
        codes = [r.status_code for _, r in served.spread(20, lambda c: c.post("/serving-endpoints/fresh/invocations", json=ASK))]
        assert codes.count(200) == 1 and codes.count(429) == 19
        # a second create of the same name through another worker is refused; a delete is seen by all
        again = served.spread(10, lambda c: c.post("/api/2.0/serving-endpoints", json=chat_endpoint(sim, "fresh")).status_code)
        assert {code for _, code in again} == {409}
        with httpx.Client(base_url=served.url, headers=AUTH) as admin:
            assert admin.delete("/api/2.0/serving-endpoints/fresh").status_code == 200
        gone = served.spread(20, lambda c: c.post("/serving-endpoints/fresh/invocations", json=ASK).status_code)
        assert len({pid for pid, _ in gone}) == 2 and {code for _, code in gone} == {404}
    state = json.loads((tmp_path / "state" / "endpoints.json").read_text())
    assert state == {"endpoints": []}


SLOW_MODEL = """
import time
import mlflow
from mlflow.pyfunc import PythonModel

class Shout(PythonModel):
    def load_context(self, context):
        time.sleep({delay})

    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        return [{transform} for t in model_input]

mlflow.models.set_model(Shout())
"""


@pytest.fixture(scope="module")
def mlflow_env(tmp_path_factory):
    """A file model registry with ``shouter`` v1 (loads at once) and v2 (takes 4 s to load)."""
    import warnings

    import mlflow
    import mlflow.pyfunc

    root = tmp_path_factory.mktemp("workers-mlflow")
    env = {"MLFLOW_TRACKING_URI": (root / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true"}
    mp = pytest.MonkeyPatch()
    for key, value in env.items():
        mp.setenv(key, value)
    try:
        for version, (delay, transform) in enumerate([(0.0, "t.upper()"), (4.0, "t.upper() + '!'")], start=1):
            source = root / f"shout{version}.py"
            source.write_text(SLOW_MODEL.format(delay=delay, transform=transform))
            with warnings.catch_warnings(), mlflow.start_run():
                warnings.simplefilter("ignore")
                mlflow.pyfunc.log_model(name="model", python_model=str(source), registered_model_name="shouter", pip_requirements=[])
    finally:
        mp.undo()
    return env


V1 = {"served_entities": [{"entity_name": "shouter", "entity_version": "1"}]}
V2 = {"served_entities": [{"entity_name": "shouter", "entity_version": "2"}]}


def shout(client: httpx.Client, text: str) -> str:
    return client.post("/serving-endpoints/shout/invocations", json={"prompt": text}).json()["choices"][0]["text"]


def update_to_v2(served: Served) -> int:
    """Create ``shout`` at version 1, ask for version 2; the pid of the worker that took the update."""
    with httpx.Client(base_url=served.url, headers=AUTH, timeout=60) as admin:
        assert admin.post("/api/2.0/serving-endpoints", json={"name": "shout", "config": V1}).status_code == 200
        assert wait_until(lambda: all(g["state"]["ready"] == "READY"
                                      for _, g in served.spread(10, lambda c: c.get("/api/2.0/serving-endpoints/shout").json())))
        owner = admin.get("/health").json()["pid"]
        pending = admin.put("/api/2.0/serving-endpoints/shout/config", json=V2).json()  # on the same connection
    assert pending["state"]["config_update"] == "IN_PROGRESS"
    return owner


def test_a_config_update_in_progress_is_seen_and_guarded_by_every_worker(tmp_path, mlflow_env):
    with serve(tmp_path, env=mlflow_env) as served:
        update_to_v2(served)
        # every worker shows the update, refuses a second one, and answers with version 1 meanwhile
        during = served.spread(10, lambda c: (c.get("/api/2.0/serving-endpoints/shout").json(),
                                              c.put("/api/2.0/serving-endpoints/shout/config", json=V1).status_code, shout(c, "one")))
        assert len({pid for pid, _ in during}) == 2
        for _, (got, again, text) in during:
            assert got["state"]["config_update"] == "IN_PROGRESS" and got["pending_config"]["config_version"] == 2
            assert again == 409 and text == "ONE"
        # once ready, every worker serves version 2 (each loads it, the old one serving until then)
        assert wait_until(lambda: all(text == "TWO!" for _, text in served.spread(10, lambda c: shout(c, "two"))), timeout=60)
        final = served.spread(10, lambda c: c.get("/api/2.0/serving-endpoints/shout").json())
        assert all(g["state"]["config_update"] == "NOT_UPDATING" and g["config"]["config_version"] == 2 for _, g in final)


def test_an_update_whose_worker_dies_fails_and_can_be_sent_again(tmp_path, mlflow_env):
    with serve(tmp_path, env=mlflow_env) as served:
        owner = update_to_v2(served)
        os.kill(owner, signal.SIGKILL)  # the worker deploying version 2 dies before it is ready
        assert wait_until(lambda: not alive(owner))
        after = served.spread(10, lambda c: c.get("/api/2.0/serving-endpoints/shout").json())
        assert owner not in {pid for pid, _ in after}
        for _, got in after:
            assert got["state"]["config_update"] == "UPDATE_FAILED" and "exited before it was ready" in got["state"]["config_update_message"]
            assert got["config"]["config_version"] == 1 and "pending_config" not in got
        with httpx.Client(base_url=served.url, headers=AUTH, timeout=60) as admin:
            again = admin.put("/api/2.0/serving-endpoints/shout/config", json=V2)
            assert again.status_code == 200 and again.json()["state"]["config_update"] == "IN_PROGRESS", again.text


def test_usage_rows_of_every_worker_reach_the_one_delta_table(sim, tmp_path):
    from deltalake import DeltaTable

    usage = tmp_path / "usage"
    with serve(tmp_path, "--usage-table", str(usage)) as served:
        with httpx.Client(base_url=served.url, headers=AUTH) as admin:
            assert admin.post("/api/2.0/serving-endpoints", json=chat_endpoint(sim, "counted")).status_code == 200
        answers = served.spread(30, lambda c: c.post("/serving-endpoints/counted/invocations", json=ASK,
                                                     headers={"X-Client-Request-Id": "workers-usage"}))
        assert len({pid for pid, _ in answers}) == 2 and all(r.status_code == 200 for _, r in answers)
    # stopped: every worker flushed its rows on the way out
    rows = [r for r in DeltaTable(str(usage)).to_pyarrow_table().to_pylist() if r["client_request_id"] == "workers-usage"]
    assert len(rows) == 30 and {r["endpoint_name"] for r in rows} == {"counted"}


def test_a_killed_worker_is_started_again(tmp_path):
    with serve(tmp_path) as served:
        before = served.worker_pids()
        assert len(before) == 2
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: not alive(victim))
        assert wait_until(lambda: len(served.worker_pids(20) - before) == 1), "a new worker should answer"
        after = served.worker_pids()
        assert len(after) == 2 and victim not in after and served.proc.poll() is None


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_no_worker_outlives_the_supervisor(tmp_path, how):
    with serve(tmp_path) as served:
        pids = served.worker_pids()
        assert len(pids) == 2 and all(alive(p) for p in pids)
        served.proc.send_signal(getattr(signal, how))
        code = served.proc.wait(timeout=60)
    if how != "SIGKILL":
        assert code == 0  # a clean stop
    # SIGTERM / Ctrl-C: the supervisor stops its workers; SIGKILL: the kernel tells them (PR_SET_PDEATHSIG)
    assert wait_until(lambda: not any(alive(p) for p in pids)), f"orphan workers: {[p for p in pids if alive(p)]}"


def test_a_second_server_cannot_join_the_port_of_a_running_one(tmp_path):
    with serve(tmp_path) as served:
        port = served.url.rsplit(":", 1)[1]
        env = {**os.environ, "AIQ_SERVING_TOKEN": TOKEN}
        done = subprocess.run([sys.executable, "-m", "ai_query.serving", "--port", port, "--workers", "2",
                               "--state-dir", str(tmp_path / "other"), "--log-level", "warning"],
                              capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode != 0 and "Address already in use" in done.stderr
        assert len(served.worker_pids()) == 2  # the running server still has its port to itself


def test_a_worker_that_cannot_start_stops_the_server_with_a_clear_status(tmp_path):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "endpoints.json").write_text("{not json")
    env = {**os.environ, "AIQ_SERVING_TOKEN": TOKEN}
    done = subprocess.run([sys.executable, "-m", "ai_query.serving", "--port", "0", "--workers", "2",
                           "--state-dir", str(tmp_path / "state"), "--log-level", "warning"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode != 0
    assert "cannot read the serving state" in done.stderr and "serving on" not in done.stdout
