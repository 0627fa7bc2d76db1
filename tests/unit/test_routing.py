import asyncio
import json
from collections import Counter
from urllib.parse import urlsplit

import pytest

from ai_query import AIQueryClient, ConfigError, EndpointRegistry
from ai_query.transport import MockTransport

from .fakes import chat_body, json_response


def entity(name, base):
    return {"name": name, "external_model": {"name": f"model-{name}", "provider": "openai", "task": "llm/v1/chat",
            "openai_config": {"openai_api_key_plaintext": "k", "openai_api_base": base}}}


def registry(routes=None, fallback=False):
    data = {"name": "split", "config": {"served_entities": [entity("a", "http://a.test/v1"), entity("b", "http://b.test/v1")]},
            "client_config": {"max_attempts": 2}}
    if routes:
        data["config"]["traffic_config"] = {"routes": [{"served_model_name": n, "traffic_percentage": p} for n, p in routes]}
    if fallback:
        data["ai_gateway"] = {"fallback_config": {"enabled": True}}
    return EndpointRegistry.from_data(data)


def test_traffic_split_follows_percentages_and_is_stable_per_request():
    hosts = Counter()

    def handler(request):
        hosts[urlsplit(request.url).hostname] += 1
        return json_response(200, chat_body(urlsplit(request.url).hostname))

    client = AIQueryClient(registry([("a", 80), ("b", 20)]), transport=MockTransport(handler))
    prompts = [f"row {i}" for i in range(1000)]
    first = asyncio.run(client.amap("split", prompts))
    assert 720 <= hosts["a.test"] <= 880 and hosts["a.test"] + hosts["b.test"] == 1000
    again = asyncio.run(client.amap("split", prompts))
    assert [r.value for r in first] == [r.value for r in again]  # the same row goes to the same entity
    assert {r.model for r in first} == {"fake-model"}


def test_fallback_to_the_next_entity_after_retries():
    def handler(request):
        if urlsplit(request.url).hostname == "a.test":
            return json_response(500, {"error": "overloaded"})  # an answer: 503s would be an outage (below)
        return json_response(200, chat_body("from b"))

    client = AIQueryClient(registry([("a", 100), ("b", 0)], fallback=True), transport=MockTransport(handler))
    [r] = asyncio.run(client.amap("split", ["x"]))
    assert r.ok and r.value == "from b" and r.attempts == 3  # 2 on a, then 1 on b
    assert client.endpoint("split").fallbacks == 1


def test_an_entity_that_is_down_falls_back_without_waiting_out_the_outage():
    # mutation caught: the first entity's outage waited out (outage_wait_s, 300 s) instead of falling back:
    # `give_up = deadline` for every position in EndpointClient.call -> this test outlives its timeout
    def handler(request):
        if urlsplit(request.url).hostname == "a.test":
            return json_response(503, {"error": "no healthy upstream"})  # a gateway whose backend is gone
        return json_response(200, chat_body("from b"))

    client = AIQueryClient(registry([("a", 100), ("b", 0)], fallback=True), transport=MockTransport(handler))
    results = asyncio.run(asyncio.wait_for(client.amap("split", [f"row {i}" for i in range(20)]), 60))
    assert all(r.ok and r.value == "from b" for r in results)
    assert client.endpoint("split").routes[0].breaker.opened == 1


def test_no_fallback_on_a_bad_request_or_when_disabled():
    def handler(request):
        return json_response(400 if urlsplit(request.url).hostname == "a.test" else 200, chat_body("b") if urlsplit(request.url).hostname == "b.test" else {"error": "bad"})

    client = AIQueryClient(registry([("a", 100), ("b", 0)], fallback=True), transport=MockTransport(handler))
    [r] = asyncio.run(client.amap("split", ["x"]))
    assert not r.ok and "HTTP 400" in r.error
    client = AIQueryClient(registry([("a", 100), ("b", 0)]), transport=MockTransport(lambda req: json_response(500, {})))
    [r] = asyncio.run(client.amap("split", ["x"]))
    assert not r.ok and r.attempts == 2


@pytest.mark.parametrize("routes, message", [([("a", 50), ("b", 40)], "add up to 90"), ([("a", 100), ("c", 0)], "'c'")])
def test_bad_routes(routes, message):
    with pytest.raises(ConfigError, match=message):
        registry(routes)


def test_two_external_entities_need_a_split_or_fallback():
    with pytest.raises(ConfigError, match="exactly one served entity"):
        registry()


def test_anthropic_and_serving_endpoint_wire_formats():
    seen = {}

    def handler(request):
        body = json.loads(request.content)
        seen[urlsplit(request.url).path] = (dict(request.headers), body)
        if urlsplit(request.url).path == "/v1/messages":
            return json_response(200, {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
                                       "content": [{"type": "text", "text": "hi"}], "stop_reason": "max_tokens",
                                       "usage": {"input_tokens": 7, "output_tokens": 2}})
        return json_response(200, chat_body("served", 4, 1))

    reg = EndpointRegistry.from_data([
        {"name": "claude", "config": {"served_entities": [{"name": "c", "external_model": {
            "name": "claude-x", "provider": "anthropic", "task": "llm/v1/chat",
            "anthropic_config": {"anthropic_api_key_plaintext": "ak", "anthropic_api_base": "http://anthropic.test"}}}]}},
        {"name": "ws", "config": {"served_entities": [{"name": "w", "external_model": {
            "name": "my-endpoint", "provider": "databricks-model-serving", "task": "llm/v1/chat",
            "databricks_model_serving_config": {"databricks_api_token_plaintext": "dt", "databricks_workspace_url": "http://ws.test"}}}]}},
    ])
    client = AIQueryClient(reg, transport=MockTransport(handler))
    [a] = asyncio.run(client.amap("claude", ["hello"], {"max_tokens": 2, "stop": ["\n"], "temperature": 0.0}))
    assert a.ok and a.value == "hi" and (a.prompt_tokens, a.completion_tokens) == (7, 2) and a.finish_reason == "length"
    headers, body = seen["/v1/messages"]
    assert headers["x-api-key"] == "ak" and headers["anthropic-version"] == "2023-06-01"
    assert body == {"model": "claude-x", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2,
                    "stop_sequences": ["\n"], "temperature": 0.0}
    [w] = asyncio.run(client.amap("ws", ["hello"]))
    assert w.ok and w.value == "served" and w.total_tokens == 5
    headers, body = seen["/serving-endpoints/my-endpoint/invocations"]
    assert headers["authorization"] == "Bearer dt" and "model" not in body
