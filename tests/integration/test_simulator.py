"""The provider simulator over real HTTP, with plain httpx / aiohttp clients (not the project's client)."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import re
import signal
import struct
import subprocess
import sys
import time

import httpx
import pytest

from ai_query.testing import ProviderSimulator

pytestmark = pytest.mark.integration

KEY = "sk-sim"
OPENAI_AUTH = {"Authorization": f"Bearer {KEY}"}
ANTHROPIC_AUTH = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}


def chat(text: str, **params) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": text}], **params}


@pytest.fixture(scope="module")
def sim():
    with ProviderSimulator(api_key=KEY, endpoint_names=["my-llm", "my-embedder"]) as simulator:
        yield simulator


@pytest.fixture
def client(sim):
    sim.reset()
    with httpx.Client(timeout=10) as http:
        yield http


def sse_data(body: str) -> list[str]:
    return [line[len("data: "):] for line in body.splitlines() if line.startswith("data: ")]


# -- OpenAI ---------------------------------------------------------------------------------------
def test_openai_chat_round_trips_with_exact_usage(sim, client):
    r = client.post(f"{sim.base_url}/chat/completions", headers=OPENAI_AUTH, json={
        "model": "m", "max_tokens": 64, "temperature": 0.0,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Classify: the cat sat"}],
    })
    assert r.status_code == 200 and r.headers["x-request-id"].startswith("req-")
    data = r.json()
    assert data["object"] == "chat.completion" and data["model"] == "sim-model" and data["id"].startswith("chatcmpl-")
    choice = data["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "echo: Be brief.\nClassify: the cat sat"}
    assert choice["finish_reason"] == "stop"
    assert data["usage"] == {"prompt_tokens": 6, "completion_tokens": 7, "total_tokens": 13}
    assert (sim.stats.requests, sim.stats.ok, sim.stats.prompt_tokens, sim.stats.completion_tokens) == (1, 1, 6, 7)


def test_openai_chat_truncates_at_max_tokens_and_stops_at_stop_sequences(sim, client):
    r = client.post(f"{sim.base_url}/chat/completions", headers=OPENAI_AUTH, json=chat("one two three four", max_tokens=3))
    assert r.json()["choices"][0]["message"]["content"] == "echo: one two"
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 3
    r = client.post(f"{sim.base_url}/chat/completions", headers=OPENAI_AUTH, json=chat("one two. three four", stop=["."]))
    assert r.json()["choices"][0]["message"]["content"] == "echo: one two"
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    r = client.post(f"{sim.base_url}/chat/completions", headers=OPENAI_AUTH, json={
        "model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "parts"}, {"type": "text", "text": "work"}]}]})
    assert r.json()["choices"][0]["message"]["content"] == "echo: parts\nwork"


def test_openai_completions_one_choice_per_prompt(sim, client):
    r = client.post(f"{sim.base_url}/completions", headers=OPENAI_AUTH, json={"model": "m", "prompt": ["a b", "c d e"], "max_tokens": 16})
    data = r.json()
    assert data["object"] == "text_completion"
    assert [c["text"] for c in data["choices"]] == ["echo: a b", "echo: c d e"]
    assert data["usage"] == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    assert sim.stats.total_tokens == 12


def test_openai_embeddings_one_unit_vector_per_input(sim, client):
    url = f"{sim.base_url}/embeddings"
    one = client.post(url, headers=OPENAI_AUTH, json={"model": "m", "input": "hello world"}).json()
    many = client.post(url, headers=OPENAI_AUTH, json={"model": "m", "input": ["hello world", "other text here"]}).json()
    assert one["object"] == "list" and one["usage"] == {"prompt_tokens": 2, "total_tokens": 2}
    assert many["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    vectors = [d["embedding"] for d in many["data"]]
    assert [d["index"] for d in many["data"]] == [0, 1] and all(len(v) == 8 for v in vectors)
    assert vectors[0] == one["data"][0]["embedding"] and vectors[0] != vectors[1]
    assert math.isclose(sum(x * x for x in vectors[0]), 1.0, abs_tol=1e-4)
    wide = client.post(url, headers=OPENAI_AUTH, json={"model": "m", "input": "x", "dimensions": 32, "encoding_format": "base64"}).json()
    decoded = struct.unpack("<32f", base64.b64decode(wide["data"][0]["embedding"]))
    assert len(decoded) == 32
    assert sim.stats.prompt_tokens == 2 + 5 + 1 and sim.stats.completion_tokens == 0


def test_openai_models_lists_the_served_model(sim, client):
    assert client.get(f"{sim.base_url}/models", headers=OPENAI_AUTH).json()["data"][0]["id"] == "sim-model"


def test_openai_bad_requests_are_400_in_openai_shape(sim, client):
    r = client.post(f"{sim.base_url}/chat/completions", headers=OPENAI_AUTH, json={"model": "m"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error" and "messages" in r.json()["error"]["message"]
    r = client.post(f"{sim.base_url}/chat/completions", headers=OPENAI_AUTH, content=b"{not json")
    assert r.status_code == 400
    r = client.post(f"{sim.base_url}/chat/completions", headers=OPENAI_AUTH, json=chat("x", temperature=7))
    assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]


# -- Anthropic ------------------------------------------------------------------------------------
def test_anthropic_messages_round_trip(sim, client):
    r = client.post(f"{sim.url}/v1/messages", headers=ANTHROPIC_AUTH, json={
        "model": "claude", "max_tokens": 100, "system": "You classify.",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "is this good"}]}],
    })
    assert r.status_code == 200 and r.headers["request-id"].startswith("req_")
    data = r.json()
    assert data["id"].startswith("msg_") and data["type"] == "message" and data["role"] == "assistant"
    assert data["content"] == [{"type": "text", "text": "echo: You classify.\nis this good"}]
    assert (data["stop_reason"], data["stop_sequence"]) == ("end_turn", None)
    assert data["usage"] == {"input_tokens": 5, "output_tokens": 6}
    assert sim.stats.prompt_tokens == 5 and sim.stats.completion_tokens == 6


def test_anthropic_also_takes_the_key_as_a_bearer_token(sim, client):
    # anthropic-python 2.x sends 'Authorization: Bearer <api_key>' instead of x-api-key.
    r = client.post(f"{sim.url}/v1/messages", headers={"Authorization": f"Bearer {KEY}", "anthropic-version": "2023-06-01"},
                    json={"model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200


def test_anthropic_max_tokens_and_stop_sequences(sim, client):
    url = f"{sim.url}/v1/messages"
    short = client.post(url, headers=ANTHROPIC_AUTH, json={"model": "c", "max_tokens": 2, "messages": [{"role": "user", "content": "a b c"}]}).json()
    assert short["content"][0]["text"] == "echo: a" and short["stop_reason"] == "max_tokens" and short["usage"]["output_tokens"] == 2
    stopped = client.post(url, headers=ANTHROPIC_AUTH, json={
        "model": "c", "max_tokens": 50, "stop_sequences": ["STOP"], "messages": [{"role": "user", "content": "a STOP b"}]}).json()
    assert stopped["content"][0]["text"] == "echo: a " and (stopped["stop_reason"], stopped["stop_sequence"]) == ("stop_sequence", "STOP")


def test_anthropic_requires_version_header_and_max_tokens(sim, client):
    body = {"model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    r = client.post(f"{sim.url}/v1/messages", headers={"x-api-key": KEY}, json=body)
    assert r.status_code == 400 and r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"
    assert "anthropic-version" in r.json()["error"]["message"]
    r = client.post(f"{sim.url}/v1/messages", headers=ANTHROPIC_AUTH, json={"model": "c", "messages": body["messages"]})
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]


# -- serving endpoints ----------------------------------------------------------------------------
def test_serving_endpoint_picks_the_schema_from_the_body(sim, client):
    url = sim.invocations_url("my-llm")
    assert url.endswith("/serving-endpoints/my-llm/invocations")
    r = client.post(url, headers=OPENAI_AUTH, json={"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 10})
    data = r.json()
    assert data["object"] == "chat.completion" and data["choices"][0]["message"]["content"] == "echo: hi there"
    assert data["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    r = client.post(url, headers=OPENAI_AUTH, json={"prompt": "abc", "max_tokens": 10})
    assert r.json()["choices"][0]["text"] == "echo: abc" and r.json()["usage"]["total_tokens"] == 3
    r = client.post(sim.invocations_url("my-embedder"), headers=OPENAI_AUTH, json={"input": ["a", "b c"]})
    data = r.json()
    assert data["object"] == "list" and [d["object"] for d in data["data"]] == ["embedding"] * 2 and data["usage"]["prompt_tokens"] == 3
    r = client.post(url, headers=OPENAI_AUTH, json={"dataframe_records": [{"x": 1}]})
    assert r.status_code == 400 and r.json()["error_code"] == "BAD_REQUEST"
    assert sim.stats.ok == 3 and sim.stats.total_tokens == 5 + 3 + 3


def test_unknown_serving_endpoint_is_404_resource_does_not_exist(sim, client):
    r = client.post(f"{sim.url}/serving-endpoints/nope/invocations", headers=OPENAI_AUTH, json={"prompt": "x"})
    assert r.status_code == 404
    assert r.json()["error_code"] == "RESOURCE_DOES_NOT_EXIST" and "'nope'" in r.json()["message"]


@pytest.mark.parametrize("fmt", ["openai", "anthropic", "serving"])
def test_a_bad_key_is_401_in_each_format(sim, client, fmt):
    if fmt == "openai":
        r = client.post(f"{sim.base_url}/chat/completions", headers={"Authorization": "Bearer wrong"}, json=chat("x"))
        assert r.json()["error"]["code"] == "invalid_api_key"
    elif fmt == "anthropic":
        r = client.post(f"{sim.url}/v1/messages", headers={"x-api-key": "wrong", "anthropic-version": "2023-06-01"},
                        json={"model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]})
        assert r.json() == {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}
    else:
        r = client.post(sim.invocations_url("my-llm"), json={"prompt": "x"})  # no token at all
        assert r.json()["error_code"] == "UNAUTHENTICATED"
    assert r.status_code == 401
    assert sim.stats.requests == 1 and sim.stats.by_status[401] == 1 and sim.stats.ok == 0


# -- quotas ---------------------------------------------------------------------------------------
def test_rpm_limit_answers_429_until_the_next_window_with_headers():
    with ProviderSimulator(rpm_limit=3, window_s=2.0) as sim, httpx.Client() as http:
        url = f"{sim.base_url}/chat/completions"
        remaining = []
        for _ in range(3):
            r = http.post(url, json=chat("hi"))
            assert r.status_code == 200 and r.headers["x-ratelimit-limit-requests"] == "3"
            remaining.append(int(r.headers["x-ratelimit-remaining-requests"]))
        assert remaining == [2, 1, 0]
        r = http.post(url, json=chat("hi"))
        assert r.status_code == 429
        assert r.json()["error"]["type"] == "requests" and r.json()["error"]["code"] == "rate_limit_exceeded"
        retry_after = float(r.headers["retry-after"])
        assert 0 < retry_after <= 2.0
        assert abs(int(r.headers["retry-after-ms"]) / 1000 - retry_after) < 0.002
        reset = r.headers["x-ratelimit-reset-requests"]  # OpenAI's spelling: "250ms", "1.5s", "1m0s"
        assert re.fullmatch(r"\d+ms|[12](\.\d+)?s", reset), reset
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
        assert http.post(url, json=chat("hi")).status_code == 429
        assert sim.stats.quota_violations == 2 and sim.stats.rpm_rejections == 2 and sim.stats.rate_limited == 2
        time.sleep(retry_after)
        r = http.post(url, json=chat("hi"))
        assert r.status_code == 200 and r.headers["x-ratelimit-remaining-requests"] == "2"
        assert sim.stats.admitted_by_window == {0: 3, 1: 1} and sim.stats.ok == 4


def test_tpm_limit_charges_prompt_plus_max_tokens_at_admission():
    with ProviderSimulator(tpm_limit=50, window_s=5.0) as sim, httpx.Client() as http:
        url = f"{sim.base_url}/chat/completions"
        first = http.post(url, json=chat("two words", max_tokens=20))  # charged 2 + 20
        assert first.status_code == 200 and first.headers["x-ratelimit-remaining-tokens"] == "28"
        assert first.json()["usage"]["total_tokens"] == 2 + 3  # served far fewer than charged
        assert http.post(url, json=chat("two words", max_tokens=20)).headers["x-ratelimit-remaining-tokens"] == "6"
        r = http.post(url, json=chat("two words", max_tokens=20))
        assert r.status_code == 429 and r.json()["error"]["type"] == "tokens"
        assert 0 < float(r.headers["retry-after"]) <= 5.0 and r.headers["x-ratelimit-limit-tokens"] == "50"
        assert http.post(url, json=chat("x", max_tokens=4)).status_code == 200  # 5 tokens still fit
        too_big = http.post(url, json=chat("x", max_tokens=100))
        assert too_big.status_code == 400 and "Request too large" in too_big.json()["error"]["message"]
        assert sim.stats.tpm_rejections == 1 and sim.stats.quota_violations == 1
        assert sim.stats.admitted_tokens == 22 + 22 + 5 and sim.stats.total_tokens == 5 + 5 + 3


def test_tpm_refund_unused_gives_back_what_the_answer_did_not_use():
    with ProviderSimulator(tpm_limit=50, window_s=5.0, tpm_refund_unused=True) as sim, httpx.Client() as http:
        url = f"{sim.base_url}/chat/completions"
        for _ in range(5):
            assert http.post(url, json=chat("two words", max_tokens=20)).status_code == 200  # nets 5 tokens each
        assert sim.stats.admitted_tokens == 25


def test_anthropic_rate_limit_headers_and_429_shape():
    with ProviderSimulator(rpm_limit=1, tpm_limit=1000, window_s=5.0) as sim, httpx.Client() as http:
        body = {"model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
        ok = http.post(f"{sim.url}/v1/messages", headers={"anthropic-version": "2023-06-01"}, json=body)
        assert ok.headers["anthropic-ratelimit-requests-limit"] == "1" and ok.headers["anthropic-ratelimit-requests-remaining"] == "0"
        assert ok.headers["anthropic-ratelimit-tokens-remaining"] == str(1000 - 6)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ok.headers["anthropic-ratelimit-requests-reset"])
        r = http.post(f"{sim.url}/v1/messages", headers={"anthropic-version": "2023-06-01"}, json=body)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error" and float(r.headers["retry-after"]) <= 5.0
        assert sim.stats.quota_violations == 1


# -- concurrency cap ------------------------------------------------------------------------------
async def _concurrent_statuses(url: str, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=n)) as http:
        return await asyncio.gather(*[http.post(url, json=chat(f"row {i}")) for i in range(n)])


def test_max_concurrency_gives_429_only_above_the_cap():
    with ProviderSimulator(max_concurrency=4, latency_s=0.6) as sim:
        url = f"{sim.base_url}/chat/completions"
        at_cap = asyncio.run(_concurrent_statuses(url, 4))
        assert [r.status_code for r in at_cap] == [200] * 4
        sim.reset()
        above = asyncio.run(_concurrent_statuses(url, 10))
        statuses = sorted(r.status_code for r in above)
        assert statuses == [200] * 4 + [429] * 6
        assert all(r.headers["retry-after"] == "0.05" for r in above if r.status_code == 429)
        assert sim.stats.concurrency_rejections == 6 and sim.stats.peak_concurrency == 4 and sim.stats.quota_violations == 0


# -- faults ---------------------------------------------------------------------------------------
def _statuses(sim: ProviderSimulator, n: int) -> list[int]:
    with httpx.Client() as http:
        return [http.post(f"{sim.base_url}/chat/completions", json=chat(f"row {i}")).status_code for i in range(n)]


def test_error_rates_give_that_share_and_the_same_sequence_for_the_same_seed():
    with ProviderSimulator(error_rates={"500": 0.3}, seed=11) as a, ProviderSimulator(error_rates={"500": 0.3}, seed=11) as b:
        first = _statuses(a, 500)
        assert 0.24 <= first.count(500) / 500 <= 0.36
        assert _statuses(b, 500) == first
        a.reset()  # re-seeds: the sequence starts over
        assert _statuses(a, 100) == first[:100]
        assert a.stats.faults["500"] == first[:100].count(500) and a.stats.by_status[500] == first[:100].count(500)
    with ProviderSimulator(error_rates={"500": 0.3}, seed=12) as c:
        assert _statuses(c, 500) != first


def test_mixed_error_rates_are_counted_by_kind():
    with ProviderSimulator(error_rates={"500": 0.1, "503": 0.1, "malformed": 0.1}, seed=3) as sim, httpx.Client() as http:
        seen = {"500": 0, "503": 0, "malformed": 0, "ok": 0}
        for i in range(300):
            r = http.post(f"{sim.base_url}/chat/completions", json=chat(f"row {i}"))
            if r.status_code != 200:
                seen[str(r.status_code)] += 1
                continue
            try:
                r.json()
                seen["ok"] += 1
            except json.JSONDecodeError:
                seen["malformed"] += 1
        assert {k: sim.stats.faults[k] for k in ("500", "503", "malformed")} == {k: seen[k] for k in ("500", "503", "malformed")}
        assert sim.stats.ok == seen["ok"] and sim.stats.by_status[200] == seen["ok"] + seen["malformed"]
        assert all(20 <= seen[k] <= 45 for k in ("500", "503", "malformed"))


def test_reset_fault_drops_the_connection_without_a_response():
    with ProviderSimulator(error_rates={"reset": 1.0}) as sim:
        with httpx.Client() as http, pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            http.post(f"{sim.base_url}/chat/completions", json=chat("x"))

        async def with_aiohttp():
            import aiohttp

            async with aiohttp.ClientSession() as session:
                async with session.post(f"{sim.base_url}/chat/completions", json=chat("x")) as r:
                    await r.read()

        import aiohttp

        with pytest.raises(aiohttp.ClientError):
            asyncio.run(with_aiohttp())
        assert sim.stats.faults["reset"] == 2 and sim.stats.by_status == {} and sim.stats.ok == 0


def test_timeout_fault_holds_the_request():
    with ProviderSimulator(error_rates={"timeout": 1.0}, hang_s=5.0) as sim:
        start = time.monotonic()
        with httpx.Client(timeout=0.3) as http, pytest.raises(httpx.ReadTimeout):
            http.post(f"{sim.base_url}/chat/completions", json=chat("x"))
        assert time.monotonic() - start >= 0.3
        deadline = time.monotonic() + 2
        while sim.snapshot()["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sim.snapshot()["in_flight"] == 0  # the abandoned request let go of its slot
        assert sim.stats.faults["timeout"] == 1 and sim.stats.ok == 0
    with ProviderSimulator(error_rates={"timeout": 1.0}, hang_s=0.3) as sim, httpx.Client(timeout=5) as http:
        start = time.monotonic()
        r = http.post(f"{sim.base_url}/chat/completions", json=chat("x"))
        assert r.status_code == 200 and time.monotonic() - start >= 0.3 and sim.stats.ok == 1


def test_malformed_fault_is_an_unparseable_200():
    with ProviderSimulator(error_rates={"malformed": 1.0}) as sim, httpx.Client() as http:
        for path, body in [("/chat/completions", chat("x")), ("/embeddings", {"model": "m", "input": "x"})]:
            r = http.post(sim.base_url + path, json=body)
            assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
            with pytest.raises(json.JSONDecodeError):
                json.loads(r.content)
        assert sim.stats.by_status[200] == 2 and sim.stats.ok == 0 and sim.stats.total_tokens == 0


def test_prompt_directives_still_inject_per_row_failures(sim, client):
    url = f"{sim.base_url}/chat/completions"
    assert client.post(url, headers=OPENAI_AUTH, json=chat("[[status:418]] x")).status_code == 418
    assert [client.post(url, headers=OPENAI_AUTH, json=chat("[[flaky:2]] y")).status_code for _ in range(3)] == [503, 503, 200]
    r = client.post(url, headers=OPENAI_AUTH, json=chat("[[ratelimit:1]] z"))
    assert r.status_code == 429 and r.headers["retry-after"] == "0"
    assert client.post(url, headers=OPENAI_AUTH, json=chat("[[reply:fixed answer]] w")).json()["choices"][0]["message"]["content"] == "fixed answer"
    anthropic = client.post(f"{sim.url}/v1/messages", headers=ANTHROPIC_AUTH,
                            json={"model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": "[[flaky:1]] q"}]})
    assert anthropic.status_code == 529 and anthropic.json()["error"]["type"] == "overloaded_error"
    assert sim.stats.directives["flaky"] == 3 and sim.stats.directives["status"] == 1


# -- streaming ------------------------------------------------------------------------------------
def test_openai_chat_stream_with_usage_chunk(sim, client):
    body = chat("stream me please", max_tokens=50, stream=True, stream_options={"include_usage": True})
    with client.stream("POST", f"{sim.base_url}/chat/completions", headers=OPENAI_AUTH, json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    data = sse_data(text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert content == "echo: stream me please"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert sim.stats.ok == 1 and sim.stats.total_tokens == 7


def test_completions_and_anthropic_streams(sim, client):
    r = client.post(f"{sim.base_url}/completions", headers=OPENAI_AUTH, json={"model": "m", "prompt": "a b c", "max_tokens": 3, "stream": True})
    chunks = [json.loads(d) for d in sse_data(r.text)[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "echo: a b" and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "usage" not in chunks[-1]
    r = client.post(f"{sim.url}/v1/messages", headers=ANTHROPIC_AUTH,
                    json={"model": "c", "max_tokens": 9, "stream": True, "messages": [{"role": "user", "content": "hi you"}]})
    events = re.findall(r"^event: (\w+)$", r.text, re.M)
    assert events[0] == "message_start" and events[-2:] == ["message_delta", "message_stop"]
    payloads = [json.loads(d) for d in sse_data(r.text)]
    assert "".join(p["delta"]["text"] for p in payloads if p["type"] == "content_block_delta") == "echo: hi you"
    delta = next(p for p in payloads if p["type"] == "message_delta")
    assert delta["delta"]["stop_reason"] == "end_turn" and delta["usage"]["output_tokens"] == 3


def test_per_token_latency_paces_the_stream():
    with ProviderSimulator(per_token_latency_s=0.05) as sim, httpx.Client() as http:
        start = time.monotonic()
        http.post(f"{sim.base_url}/chat/completions", json=chat("a b c d", max_tokens=50))  # 5 tokens
        assert time.monotonic() - start >= 0.25
        arrivals = []
        with http.stream("POST", f"{sim.base_url}/chat/completions", json=chat("a b c d", stream=True)) as r:
            for _ in r.iter_raw():
                arrivals.append(time.monotonic())
        assert arrivals[-1] - arrivals[0] >= 0.2


def test_latency_distribution_is_seeded():
    from ai_query.testing import Latency

    with ProviderSimulator(latency=Latency.uniform(0.05, 0.15), seed=5) as sim, httpx.Client() as http:
        times = []
        for _ in range(5):
            start = time.monotonic()
            http.post(f"{sim.base_url}/chat/completions", json=chat("x"))
            times.append(time.monotonic() - start)
        assert all(0.05 <= t < 0.5 for t in times)


# -- the vendors' own SDKs accept the simulator --------------------------------------------------
def test_openai_and_anthropic_sdks_round_trip(sim):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=sim.base_url, api_key=KEY, max_retries=0)
    reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi there"}], max_tokens=5)
    assert reply.choices[0].message.content == "echo: hi there" and reply.usage.total_tokens == 5
    assert len(client.embeddings.create(model="m", input=["a", "b"]).data[1].embedding) == 8  # the SDK asks for base64
    stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "s t"}], stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: s t" and chunks[-1].usage.total_tokens == 5
    anthropic = pytest.importorskip("anthropic")
    message = anthropic.Anthropic(base_url=sim.url, api_key=KEY, max_retries=0).messages.create(
        model="claude", max_tokens=10, messages=[{"role": "user", "content": "hello"}])
    assert message.content[0].text == "echo: hello" and (message.usage.input_tokens, message.usage.output_tokens) == (1, 2)


# -- counters from another process, the CLI, throughput ------------------------------------------
def test_stats_endpoint_works_from_another_process(sim, client):
    client.post(f"{sim.base_url}/chat/completions", headers=OPENAI_AUTH, json=chat("a b"))
    client.post(f"{sim.base_url}/chat/completions", headers={"Authorization": "Bearer nope"}, json=chat("a b"))
    script = (
        "import json, sys, urllib.request\n"
        "stats = json.load(urllib.request.urlopen(sys.argv[1] + '/_sim/stats'))\n"
        "urllib.request.urlopen(urllib.request.Request(sys.argv[1] + '/_sim/reset', method='POST'))\n"
        "print(json.dumps(stats))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, sim.url], capture_output=True, text=True, check=True, timeout=30)
    stats = json.loads(out.stdout)
    assert stats["requests"] == 2 and stats["ok"] == 1 and stats["by_status"] == {"200": 1, "401": 1}
    assert stats["total_tokens"] == 2 + 3 and stats["quota_violations"] == 0 and stats["config"]["served_model"] == "sim-model"
    assert sim.stats.requests == 0  # the other process reset it


def _start_cli(*args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "ai_query.testing", "--port", "0", *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        match = re.search(r"(http://127\.0\.0\.1:\d+)/v1\b", line)
        if match:
            return proc, match.group(1)
    proc.kill()
    raise AssertionError("the simulator CLI printed no OpenAI URL")


def _stop_cli(proc: subprocess.Popen) -> dict:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0
    start = re.search(r"^\{$", out, re.M)  # the final counters, pretty-printed after the start-up lines
    assert start is not None, out
    return json.loads(out[start.start():])


def test_cli_help_names_every_knob():
    out = subprocess.run([sys.executable, "-m", "ai_query.testing", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for flag in ("--port", "--api-key", "--served-model", "--endpoint", "--embedding-dim", "--latency", "--per-token-latency",
                 "--max-concurrency", "--rpm", "--tpm", "--window", "--error-rate", "--hang", "--seed", "examples:"):
        assert flag in out.stdout, flag


def test_cli_serves_until_sigterm_then_prints_the_counters():
    proc, url = _start_cli("--api-key", "k", "--endpoint", "my-llm", "--rpm", "100", "--window", "5")
    try:
        with httpx.Client() as http:
            r = http.post(f"{url}/serving-endpoints/my-llm/invocations", headers={"Authorization": "Bearer k"}, json={"prompt": "x y"})
            assert r.status_code == 200 and r.headers["x-ratelimit-remaining-requests"] == "99"
    finally:
        final = _stop_cli(proc)
    assert final["requests"] == 1 and final["ok"] == 1 and final["total_tokens"] == 2 + 3
    assert final["config"]["rpm_limit"] == 100 and final["config"]["auth"] is True


def test_throughput_smoke_at_256_in_flight():
    """Printed, not asserted: requests/s the simulator (its own process) sustains with zero latency."""
    import aiohttp

    proc, url = _start_cli()

    def cpu_seconds(pid: int) -> float:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def drive(seconds: float) -> tuple[int, float]:
        body = chat("hello there how are you", max_tokens=16)
        done = 0
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as session:
            stop = time.perf_counter() + seconds

            async def worker() -> None:
                nonlocal done
                while time.perf_counter() < stop:
                    async with session.post(f"{url}/v1/chat/completions", json=body) as r:
                        await r.read()
                        assert r.status == 200
                    done += 1

            start = time.perf_counter()
            await asyncio.gather(*[worker() for _ in range(256)])
            return done, time.perf_counter() - start

    try:
        cpu0 = cpu_seconds(proc.pid)
        done, elapsed = asyncio.run(drive(2.0))
        server_cpu_us = 1e6 * (cpu_seconds(proc.pid) - cpu0) / max(done, 1)
    finally:
        final = _stop_cli(proc)
    print(f"\nsimulator throughput: {done / elapsed:.0f} req/s at 256 in flight (aiohttp client in this process), "
          f"server CPU {server_cpu_us:.0f} us/request (~{1e6 / max(server_cpu_us, 1):.0f} req/s per core)")
    assert final["ok"] == done


def test_served_log_names_each_answer_with_its_tokens_also_when_the_client_went_away():
    with ProviderSimulator(api_key=KEY, served_log=True, latency_s=0.3) as sim:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up before the answer
            httpx.post(f"{sim.base_url}/chat/completions", json=chat("gone", max_tokens=3), headers=OPENAI_AUTH, timeout=0.1)
        r = httpx.post(f"{sim.base_url}/chat/completions", json=chat("hello there", max_tokens=3), headers=OPENAI_AUTH)
        anthropic = httpx.post(f"{sim.base_url.removesuffix('/v1')}/v1/messages", headers=ANTHROPIC_AUTH,
                               json={"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
        log = sim.served_answers()
        ids = [a["request_id"] for a in log]
        assert r.headers["x-request-id"] in ids and anthropic.headers["request-id"] in ids
        mine = next(a for a in log if a["request_id"] == r.headers["x-request-id"])
        assert mine["prompt_tokens"] == r.json()["usage"]["prompt_tokens"]
        assert mine["completion_tokens"] == r.json()["usage"]["completion_tokens"]
        assert mine["received_at"] + 0.3 <= mine["at"]
        snap = sim.snapshot()
        assert len(log) == snap["ok"] and sum(a["prompt_tokens"] for a in log) == snap["prompt_tokens"]
    with ProviderSimulator() as sim, pytest.raises(RuntimeError, match="served_log=True"):
        sim.served_answers()
