"""``ai-query serve`` as users run it (a subprocess, two workers) in front of the provider simulator:
its Prometheus ``/metrics`` after answers, the server's own 429s, a provider's 429 storm and
errors; and its log: throttled INFO lines for the storm, never a key.

Mutations caught (each checked by hand):
- ``metrics.finished`` not called (``_app._serve_query``): the request counters are missing;
- the supervisor not giving its workers one ``PROMETHEUS_MULTIPROC_DIR`` (``_workers.Supervisor._spawn``):
  a scrape reaches one worker and the counts fall short of what was sent;
- ``metrics.rate_limited`` not called: ``aiq_serving_rate_limited_total`` is missing;
- ``Throttled.info`` without its throttle (``last is not None and ...`` -> ``False``): one INFO line
  per 429 wait, as many lines as the simulator's refusals.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from ai_query.testing import ProviderSimulator

pytestmark = pytest.mark.integration

KEY = "sk-metrics-secret-0123456789abcdef"
WRONG_KEY = "sk-wrong-secret-fedcba9876543210"
ADMIN = "tok-metrics-admin-0001"
CHAT = {"messages": [{"role": "user", "content": "hello there"}]}


def entity(base_url: str, key_ref: str) -> dict:
    return {"name": "m", "external_model": {"name": "sim-model", "provider": "openai", "task": "llm/v1/chat",
                                           "openai_config": {"openai_api_key": key_ref, "openai_api_base": base_url}}}


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """``{labels: value}`` of the metric ``name`` in a Prometheus exposition."""
    out = {}
    for line in text.splitlines():
        m = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
        if m:
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', m.group(1))))
            out[labels] = out.get(labels, 0.0) + float(m.group(2))
    return out


def value(text: str, name: str, **labels: str) -> float:
    return sum(v for k, v in samples(text, name).items() if all((n, labels[n]) in k for n in labels))


@pytest.fixture
def serve(tmp_path):
    good = ProviderSimulator(api_key=KEY, echo_key=True, endpoint_names=["*"]).start()
    storm = ProviderSimulator(api_key=KEY, echo_key=True, endpoint_names=["*"], rpm_limit=1, window_s=1.0).start()
    endpoints = [
        {"name": "chat", "config": {"served_entities": [entity(good.base_url, "{{secrets/sim/key}}")]}},
        {"name": "storm", "config": {"served_entities": [entity(storm.base_url, "{{secrets/sim/key}}")]},
         "client_config": {"rate_limit_wait_s": 2.0, "retry_backoff_s": 0.01}},
        {"name": "wrong-key", "config": {"served_entities": [entity(good.base_url, "{{secrets/sim/wrong}}")]}},
    ]
    (tmp_path / "endpoints.json").write_text(json.dumps(endpoints))
    env = {**os.environ, "AIQ_SERVING_TOKEN": ADMIN, "AIQ_SECRET_SIM_KEY": KEY, "AIQ_SECRET_SIM_WRONG": WRONG_KEY}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen([sys.executable, "-m", "batch_runner.cli", "serve", "--port", "0", "--workers", "2",
                             "--state-dir", str(tmp_path / "state"), "--endpoints", str(tmp_path / "endpoints.json"),
                             "--log-level", "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        line = proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:\d+", line)
        assert match, f"ai-query serve did not start: {line!r}"
        yield match.group(0), good, storm, stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        reader.join(timeout=10)
        good.stop()
        storm.stop()


def test_metrics_count_answers_refusals_429s_and_errors_and_the_log_throttles_429s_without_keys(serve):
    url, good, storm, stderr = serve
    auth = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=url, headers=auth, timeout=60) as c:
        created = c.post("/api/2.0/serving-endpoints", json={
            "name": "limited", "config": {"served_entities": [entity(good.base_url, "{{secrets/sim/key}}")]},
            "rate_limits": [{"calls": 1, "key": "endpoint", "renewal_period": "minute"}]})
        assert created.status_code == 200, created.text
        ok = [c.post("/serving-endpoints/chat/invocations", json=CHAT) for _ in range(5)]
        limited = [c.post("/serving-endpoints/limited/invocations", json=CHAT) for _ in range(4)]
        wrong = [c.post("/serving-endpoints/wrong-key/invocations", json=CHAT) for _ in range(2)]
        unknown = c.post("/serving-endpoints/nobody/invocations", json=CHAT)
        with ThreadPoolExecutor(8) as pool:
            stormed = list(pool.map(lambda _: c.post("/serving-endpoints/storm/invocations", json=CHAT), range(8)))
        tokens = sum(r.json()["usage"]["total_tokens"] for r in ok)
        scrapes = [c.get("/metrics") for _ in range(4)]  # either worker answers: each sums both
    assert [r.status_code for r in ok] == [200] * 5
    assert sorted(r.status_code for r in limited) == [200, 429, 429, 429]
    assert [r.status_code for r in wrong] == [502, 502] and unknown.status_code == 404
    storm_codes = [r.status_code for r in stormed]
    assert 429 in storm_codes and 200 in storm_codes
    assert all(s.status_code == 200 and s.headers["content-type"].startswith("text/plain") for s in scrapes)

    for text in (s.text for s in scrapes):
        assert value(text, "aiq_serving_requests_total", endpoint="chat", status="200") == 5
        assert value(text, "aiq_serving_requests_total", endpoint="chat", entity="sim-model") == 5
        assert value(text, "aiq_serving_requests_total", endpoint="limited", status="429") == 3
        assert value(text, "aiq_serving_rate_limited_total", endpoint="limited") == 3
        assert value(text, "aiq_serving_requests_total", endpoint="wrong-key", status="502") == 2
        assert value(text, "aiq_serving_requests_total", endpoint="", status="404") == 1
        assert value(text, "aiq_serving_requests_total", endpoint="storm", status="429") == storm_codes.count(429)
        assert value(text, "aiq_serving_requests_total", endpoint="storm", status="200") == storm_codes.count(200)
        assert value(text, "aiq_serving_request_seconds_count", endpoint="chat") == 5
        assert value(text, "aiq_serving_tokens_total", endpoint="chat") == tokens
        assert value(text, "aiq_serving_tokens_total", endpoint="chat", kind="completion") > 0
        assert value(text, "aiq_serving_in_flight", endpoint="chat") == 0

    refusals = httpx.get(storm.stats_url).json()["rate_limited"]
    deadline = time.monotonic() + 30
    while not any("throttles" in line for line in stderr) and time.monotonic() < deadline:
        time.sleep(0.05)  # the reader thread may lag behind the server's stderr
    log = "".join(stderr)
    throttled = [line for line in log.splitlines() if " INFO " in line and "'storm' throttles (HTTP 429)" in line]
    assert throttled, log[-3000:]
    # each worker logs the storm at most once per 10 s: far fewer lines than the provider's refusals
    assert refusals >= 6 and len(throttled) <= 4 < refusals
    assert KEY not in log and WRONG_KEY not in log
    assert "[REDACTED]" in log  # the providers echoed the keys, into lines that were logged
