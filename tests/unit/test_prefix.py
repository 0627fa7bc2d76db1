"""Prefix-aware ordering: prompts sharing a prefix are dispatched together; results stay in input order."""

from __future__ import annotations

import json

import pytest

from ai_query import AIQueryClient, EndpointRegistry
from ai_query.batch import mean_shared_prefix, prefix_order

from .fakes import chat_body, json_response, transport

DOCS = {d: f"Document {d}: " + f"{d} is a long text about topic {d}. " * 8 for d in "ABCD"}
ROWS = [f"{DOCS[d]}\nQuestion {q}: what is it about?" for q in range(3) for d in "ABCD"]  # interleaved


def test_sorted_order_groups_shared_prefixes():
    order = prefix_order(ROWS)
    assert order is not None
    grouped = [ROWS[i][len("Document ")] for i in order]
    assert grouped == sorted(grouped) == list("AAABBBCCCDDD")
    assert mean_shared_prefix(ROWS, order) > 2 * mean_shared_prefix(ROWS, range(len(ROWS)))


@pytest.mark.parametrize(
    "texts, mode, expected",
    [
        (["b short", "a short", "c short"], "auto", None),  # nothing shared worth a cache block
        (sorted(ROWS), "auto", None),  # already grouped: keep the input order
        (["b", "a", "c"], "on", [1, 0, 2]),
        (ROWS, "off", None),
        (ROWS[:2], "on", None),  # too few rows to reorder
    ],
)
def test_when_ordering_applies(texts, mode, expected):
    assert prefix_order(texts, mode) == expected


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="not one of"):
        prefix_order(ROWS, "sometimes")


def _registry(mode: str) -> EndpointRegistry:
    return EndpointRegistry.from_data({
        "name": "fake",
        "config": {"served_entities": [{"name": "m", "external_model": {
            "name": "fake-model", "provider": "openai", "task": "llm/v1/completions",
            "openai_config": {"openai_api_key_plaintext": "sk-test", "openai_api_base": "http://fake.test/v1"}}}]},
        "client_config": {"initial_concurrency": 1, "max_concurrency": 1, "prefix_ordering": mode},
    })


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_the_endpoint_sees_grouped_prompts_and_rows_return_in_input_order(mode):
    seen: list[str] = []

    def handler(request):
        prompt = json.loads(request.content)["prompt"]
        seen.append(prompt)
        return json_response(200, {"choices": [{"text": f"answer to {prompt[-30:]}", "finish_reason": "stop"}],
                                   "usage": chat_body("x")["usage"]})

    client = AIQueryClient(_registry(mode), transport=transport(handler))
    try:
        results = client.map("fake", ROWS)
    finally:
        client.close()
    assert [r.value for r in results] == [f"answer to {p[-30:]}" for p in ROWS]
    assert seen == (sorted(ROWS) if mode == "auto" else ROWS)
