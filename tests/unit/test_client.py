import asyncio
import json
from urllib.parse import urlsplit

import pytest

from ai_query import AIQueryClient, SystemicEndpointError, SecretNotFoundError
from ai_query.transport import MockTransport, Request, Response, TransportTimeoutError

from .fakes import FakeClock, chat_body, json_response, registry, transport


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("AIQ_SECRET_TEST_KEY", "sk-test")


def make_client(handler, clock=None, **reg):
    clock = clock or FakeClock()
    return AIQueryClient(registry(**reg), transport=transport(handler), clock=clock, sleep=clock.sleep), clock


def run(coro):
    return asyncio.run(coro)


def test_rows_come_back_in_order_with_usage_and_the_request_is_well_formed():
    seen = []

    def handler(request: Request) -> Response:
        body = json.loads(request.content)
        seen.append((urlsplit(request.url).path, request.headers["authorization"], body))
        return json_response(200, chat_body(body["messages"][0]["content"].upper()), {"x-request-id": "req-" + body["messages"][0]["content"]})

    client, _ = make_client(handler)
    results = run(client.amap("fake", ["a", "b", "c"], {"max_tokens": 8, "temperature": 0.0}))
    assert [r.value for r in results] == ["A", "B", "C"]
    assert [r.request_id for r in results] == ["req-a", "req-b", "req-c"]
    assert all(r.status == "ok" and r.total_tokens == 8 and r.attempts == 1 for r in results)
    path, auth, body = seen[0]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test"
    assert body["max_tokens"] == 8 and body["temperature"] == 0.0 and body["model"] == "fake-model"


def test_429_waits_for_retry_after_and_then_succeeds():
    calls = {"n": 0}

    def handler(request):
        calls["n"] += 1
        if calls["n"] <= 3:
            return json_response(429, {"error": {"message": "slow down"}}, {"retry-after": "7"})
        return json_response(200, chat_body("ok"))

    client, clock = make_client(handler, max_attempts=2)
    [result] = run(client.amap("fake", ["x"]))
    # more 429s than max_attempts: a rate-limited row waits, it is not failed
    assert result.status == "ok" and result.attempts == 4
    assert clock.sleeps == [7.0, 7.0, 7.0]


def test_rate_limited_row_fails_only_after_the_wait_budget():
    def handler(request):
        return json_response(429, {"error": {"message": "quota"}}, {"retry-after": "30"})

    client, clock = make_client(handler, rate_limit_wait_s=100)
    [result] = run(client.amap("fake", ["x"]))
    assert result.status == "error"
    assert "HTTP 429" in result.error and "quota" in result.error and "5 attempts" in result.error
    assert sum(clock.sleeps) >= 90


def test_rate_limit_wait_counts_from_the_first_attempt():
    # The first attempt runs before the retry policy exists (fast path); a slow first attempt
    # still counts towards rate_limit_wait_s: attempts at 0 (taking 60 s), 90, 120 -> stop.
    clock = FakeClock()
    calls = {"n": 0}

    def handler(request):
        calls["n"] += 1
        if calls["n"] == 1:
            clock.now += 60.0
        return json_response(429, {"error": {"message": "quota"}}, {"retry-after": "30"})

    client, _ = make_client(handler, clock=clock, rate_limit_wait_s=100)
    [result] = run(client.amap("fake", ["x"]))
    assert result.status == "error" and result.attempts == 3 and "3 attempts" in result.error
    assert clock.sleeps == [30.0, 30.0]


def test_5xx_and_malformed_bodies_are_retried_then_become_a_row_error():
    statuses = iter([500, 503, 200])

    def handler(request):
        status = next(statuses, 502)
        if status == 200:
            return Response(200, content=b"{not json")
        return json_response(status, {"error": "boom"})

    client, clock = make_client(handler, max_attempts=4)
    [result] = run(client.amap("fake", ["x"]))
    assert result.status == "error" and result.attempts == 4
    assert "HTTP 502" in result.error and "gave up after 4 attempts" in result.error
    # a random fault's first retry goes at once; the next ones back off
    assert len(clock.sleeps) == 3 and clock.sleeps[0] == 0 and all(0 < s <= 60 for s in clock.sleeps[1:])


def test_a_row_faulting_again_on_a_healthy_endpoint_retries_at_once():
    faults = {"unlucky": 3}

    def handler(request):
        prompt = json.loads(request.content)["messages"][0]["content"]
        if faults.get(prompt, 0) > 0:
            faults[prompt] -= 1
            return json_response(503, {"error": "boom"}) if faults[prompt] % 2 else Response(200, content=b"{oops")
        return json_response(200, chat_body("ok"))

    client, clock = make_client(handler, max_attempts=5)
    assert all(r.ok for r in run(client.amap("fake", [f"row {i}" for i in range(20)])))
    [result] = run(client.amap("fake", ["unlucky"]))
    # 3 faults among 23 attempts: a plausible streak at that share (0.13 ** 3 > 1e-4): no waits
    assert result.status == "ok" and result.attempts == 4 and clock.sleeps == [0, 0, 0]
    assert client.endpoint("fake").recent_faults.share == pytest.approx(3 / 24)


def test_a_row_faulting_again_on_an_endpoint_that_rarely_fails_backs_off():
    # A restart: the endpoint answered 100 requests well, then fails one row 3 times in a row.
    faults = {"unlucky": 3}

    def handler(request):
        prompt = json.loads(request.content)["messages"][0]["content"]
        if faults.get(prompt, 0) > 0:
            faults[prompt] -= 1
            return json_response(502, {"error": "restarting"})
        return json_response(200, chat_body("ok"))

    client, clock = make_client(handler, max_attempts=5)
    assert all(r.ok for r in run(client.amap("fake", [f"row {i}" for i in range(100)])))
    [result] = run(client.amap("fake", ["unlucky"]))
    # two retries at once; 3 faults in a row at a 3 % share is no longer bad luck (2.7e-5 < 1e-4)
    assert result.status == "ok" and result.attempts == 4
    assert clock.sleeps[:2] == [0, 0] and len(clock.sleeps) == 3 and clock.sleeps[2] > 0



def test_when_most_attempts_fail_later_retries_back_off():
    # 500s: the endpoint answers, badly (a 503 would be an outage sign: see the breaker tests)
    client, clock = make_client(lambda r: json_response(500, {"error": "down"}), max_attempts=3)
    results = run(client.amap("fake", [f"row {i}" for i in range(8)]))
    assert all(r.status == "error" for r in results)
    assert client.endpoint("fake").recent_faults.share == 1.0 and not client.endpoint("fake").recent_faults.bad_luck(2)
    # each row: the first retry at once, the second (while the retry budget lasts) after a backoff
    waits = sorted(clock.sleeps)
    assert waits[:8] == [0] * 8 and len(waits) > 8 and all(w > 0 for w in waits[8:])


@pytest.mark.parametrize("first", ["timeout", "429 without Retry-After"])
def test_signs_of_load_back_off_from_the_first_retry(first):
    calls = {"n": 0}

    def handler(request):
        calls["n"] += 1
        if calls["n"] == 1:
            if first == "timeout":
                raise TransportTimeoutError("no answer within 30 s")
            return json_response(429, {"error": {"message": "slow down"}})
        return json_response(200, chat_body("ok"))

    client, clock = make_client(handler)
    [result] = run(client.amap("fake", ["x"]))
    assert result.status == "ok" and result.attempts == 2
    assert len(clock.sleeps) == 1 and clock.sleeps[0] > 0


def test_malformed_200_then_good_body_recovers():
    bodies = iter([b"<html>oops</html>", json.dumps(chat_body("fine")).encode()])
    client, _ = make_client(lambda r: Response(200, content=next(bodies)))
    [result] = run(client.amap("fake", ["x"]))
    assert result.status == "ok" and result.value == "fine" and result.attempts == 2


def test_400_is_not_retried_and_is_a_row_error_while_other_rows_succeed():
    def handler(request):
        body = json.loads(request.content)
        if body["messages"][0]["content"] == "bad":
            return json_response(400, {"error": {"message": "prompt too long"}})
        return json_response(200, chat_body("ok"))

    client, clock = make_client(handler)
    results = run(client.amap("fake", ["good", "bad", None, "good"]))
    assert [r.status for r in results] == ["ok", "error", "error", "ok"]
    assert results[1].attempts == 1 and "prompt too long" in results[1].error
    assert "NULL" in results[2].error
    assert clock.sleeps == []


@pytest.mark.parametrize("status", [401, 403, 404])
def test_systemic_failures_stop_the_batch(status):
    client, _ = make_client(lambda r: json_response(status, {"error": {"message": "nope"}}))
    with pytest.raises(SystemicEndpointError, match=f"HTTP {status}"):
        run(client.amap("fake", ["a"] * 20))


def test_missing_secret_stops_the_batch_and_names_the_variable(monkeypatch):
    monkeypatch.delenv("AIQ_SECRET_TEST_KEY")
    client, _ = make_client(lambda r: json_response(200, chat_body("x")))
    with pytest.raises(SecretNotFoundError, match="AIQ_SECRET_TEST_KEY"):
        run(client.amap("fake", ["a"]))


def test_usage_is_estimated_and_marked_when_the_endpoint_sends_none():
    client, _ = make_client(lambda r: json_response(200, chat_body("abcdefg", usage=False)))
    [result] = run(client.amap("fake", ["abc"]))
    assert result.usage_estimated
    assert (result.prompt_tokens, result.completion_tokens) == ((3 + 1) // 4, (7 + 1) // 4)


def test_embeddings_task():
    def handler(request):
        assert urlsplit(request.url).path == "/v1/embeddings"
        return json_response(200, {"data": [{"embedding": [0.5, 0.25], "index": 0}], "model": "e",
                                   "usage": {"prompt_tokens": 2, "total_tokens": 2}})

    client, _ = make_client(handler, task="llm/v1/embeddings")
    [result] = run(client.amap("fake", ["hi"]))
    assert result.value == [0.5, 0.25] and result.prompt_tokens == 2 and result.completion_tokens == 0


def test_concurrency_never_exceeds_the_limiter():
    state = {"in_flight": 0, "peak": 0}

    async def handler(request):
        state["in_flight"] += 1
        state["peak"] = max(state["peak"], state["in_flight"])
        await asyncio.sleep(0.001)
        state["in_flight"] -= 1
        return json_response(200, chat_body("ok"))

    client = AIQueryClient(registry(initial=3, maximum=3), transport=MockTransport(handler))
    results = run(client.amap("fake", ["x"] * 50))
    assert all(r.ok for r in results)
    assert 1 < state["peak"] <= 3


def test_sync_map_from_a_plain_thread():
    client = AIQueryClient(registry(), transport=transport(lambda r: json_response(200, chat_body("sync"))))
    try:
        results = client.map("fake", ["a", "b"])
        assert [r.value for r in results] == ["sync", "sync"]
    finally:
        client.close()
