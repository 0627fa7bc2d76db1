"""A served request meets its model's endpoint down: it waits in the endpoint's circuit breaker,
bounded by its own request timeout, and is answered once the endpoint is back, or 503 with a
message that says for how long the endpoint has been down.

Real servers: the serving endpoint (uvicorn) and the provider simulator, started on a port that
refused connections until then. Mutation caught: failures met while the breaker is open
counted as the row's attempts (`endpoints_fault = False` in ai_query/_client.py): the request
spends its attempts on the probes and gets 502 before the provider is up.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx

from ai_query.serving import ServingServer
from ai_query.testing import ProviderSimulator


def closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def endpoint(name: str, port: int, **client) -> dict:
    return {"name": name, "config": {"served_entities": [{"name": "m", "external_model": {
        "name": "m", "provider": "openai", "task": "llm/v1/chat",
        "openai_config": {"openai_api_key_plaintext": "k", "openai_api_base": f"http://127.0.0.1:{port}/v1"}}}]},
        "client_config": {"retry_backoff_s": 0.01, **client}}


def test_a_served_request_waits_out_an_outage_then_gets_its_answer_or_503_after_its_timeout(tmp_path):
    late, gone = closed_port(), closed_port()
    endpoints = [endpoint("late", late, request_timeout_s=120), endpoint("gone", gone, request_timeout_s=1)]
    (tmp_path / "e.json").write_text(json.dumps(endpoints))
    answers: dict = {}
    with ServingServer(endpoints=tmp_path / "e.json", state_dir=tmp_path / "state", include_registry=False) as s, \
            httpx.Client(base_url=s.url, timeout=120) as c:
        def ask():
            answers["late"] = c.post("/serving-endpoints/late/invocations", json={"messages": [{"role": "user", "content": "hi"}]})

        asker = threading.Thread(target=ask)
        asker.start()
        # 'gone' never comes back: its request waits its request_timeout_s (1 s), then 503
        down = c.post("/serving-endpoints/gone/invocations", json={"messages": [{"role": "user", "content": "hi"}]})
        # with retry_backoff_s 0.01 a request's 8 attempts are spent well within this wait
        time.sleep(3)
        assert asker.is_alive(), f"the request did not wait for the endpoint: {answers}"
        with ProviderSimulator(port=late) as sim:
            asker.join(timeout=60)
            served = sim.snapshot()["ok"]
    assert down.status_code == 503 and down.headers["retry-after"] == "1"
    message = down.json()["message"]
    assert message.startswith("serving endpoint 'gone': endpoint 'gone' has not answered for ")
    assert "the request waited as long as it may (its request timeout)" in message and "Connection refused" in message
    assert answers["late"].status_code == 200, answers["late"].text
    assert answers["late"].json()["choices"][0]["message"]["content"] == "echo: hi" and served == 1
