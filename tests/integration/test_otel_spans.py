"""OpenTelemetry spans per endpoint request, over real HTTP against the provider simulator, collected
by the SDK's in-memory exporter (a provider of the test's own, passed in: no global is touched)."""

from __future__ import annotations

import json

import pytest

from ai_query import AIQueryClient, EndpointRegistry
from ai_query.testing import ProviderSimulator

pytestmark = pytest.mark.integration
sdk = pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

KEY = "sk-otel-test-key-0123456789abcdef"


def registry(sim: ProviderSimulator) -> EndpointRegistry:
    return EndpointRegistry.from_data({"name": "ep", "config": {"served_entities": [{"name": "primary", "external_model": {
        "name": "sim-model", "provider": "openai", "task": "llm/v1/chat",
        "openai_config": {"openai_api_key_plaintext": KEY, "openai_api_base": sim.base_url}}}]},
        "client_config": {"request_timeout_s": 5.0, "max_attempts": 3, "retry_backoff_s": 0.01}})


@pytest.fixture
def traced():
    exporter = InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def test_one_span_per_request_with_genai_attributes_retries_as_events_and_the_callers_parent(traced):
    provider, exporter = traced
    prompts = [f"row {i} asks the simulator" for i in range(12)]
    prompts[3] = "[[ratelimit:2]] row 3 is throttled twice"
    prompts[5] = "[[flaky:1]] row 5 meets a 503 once"
    prompts[8] = "[[status:400]] row 8 is refused"
    with ProviderSimulator(api_key=KEY) as sim:
        client = AIQueryClient(registry(sim), tracer_provider=provider)
        try:
            with provider.get_tracer("the-caller").start_as_current_span("caller's job") as parent:
                results = client.map("ep", prompts, {"max_tokens": 4})
        finally:
            client.close()
        sent = sim.stats.requests
    spans = [s for s in exporter.get_finished_spans() if s.name != "caller's job"]
    assert len(spans) == len(prompts) and sent == len(prompts) + 3  # one span per request, its retries inside it
    by_prompt = {r.index: r for r in results}
    for span in spans:
        assert span.name == "chat sim-model" and span.kind == SpanKind.CLIENT
        assert span.parent is not None and span.parent.span_id == parent.get_span_context().span_id
        assert span.context.trace_id == parent.get_span_context().trace_id
        a = span.attributes
        assert (a["gen_ai.operation.name"], a["gen_ai.provider.name"], a["gen_ai.request.model"], a["aiq.endpoint"],
                a["aiq.served_entity"]) == ("chat", "openai", "sim-model", "ep", "primary")
    ok = [s for s in spans if s.attributes["aiq.status"] == "ok"]
    assert sorted(s.attributes["gen_ai.usage.input_tokens"] for s in ok) == sorted(
        r.prompt_tokens for r in by_prompt.values() if r.ok)
    assert sum(s.attributes["gen_ai.usage.output_tokens"] for s in ok) == sum(r.completion_tokens for r in results)
    attempts = sorted(s.attributes["aiq.attempts"] for s in spans)
    assert attempts == [1] * 10 + [2, 3]
    retried = {s.attributes["aiq.attempts"]: s for s in spans if s.attributes["aiq.attempts"] > 1}
    throttled = [dict(e.attributes) for e in retried[3].events]
    assert [(e["aiq.attempt"], e["http.response.status_code"], e["error.type"]) for e in throttled] == [
        (1, 429, "RateLimitedError"), (2, 429, "RateLimitedError")]
    assert [e.name for e in retried[2].events] == ["aiq.retry"]
    (failed,) = [s for s in spans if s.attributes["aiq.status"] == "error"]
    assert (failed.attributes["http.response.status_code"], failed.attributes["error.type"]) == (400, "400")
    assert failed.status.status_code == StatusCode.ERROR
    everything = json.dumps([[dict(s.attributes), [dict(e.attributes) for e in s.events], s.status.description]
                             for s in spans], default=str)
    assert KEY not in everything and "Bearer" not in everything


def test_without_a_configured_provider_the_client_keeps_its_plain_call():
    # the API's default provider (this test process configures no global one): no tracer, no wrapper
    with ProviderSimulator(api_key=KEY) as sim:
        client = AIQueryClient(registry(sim))
        try:
            endpoint = client.endpoint("ep")
            assert endpoint.spans is None and "call" not in vars(endpoint)  # the class's method: nothing per request
            assert client.map("ep", ["hello"], {"max_tokens": 4})[0].ok
        finally:
            client.close()
