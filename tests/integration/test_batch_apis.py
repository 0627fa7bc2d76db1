"""The simulator's batch APIs through the core batch client (``ai_query.backends.ProviderBatches``),
over real HTTP: both providers, per-line errors, splitting, cancel, expiry, the enqueued-token quota.
Time is steered by the simulator's lazy clock (lines finish evenly over ``delay_s``), never asserted."""

from __future__ import annotations

import time

import pytest

from ai_query import EndpointRegistry, PermanentEndpointError, RetryableEndpointError
from ai_query.backends import ProviderBatches
from ai_query.testing import ProviderSimulator
from tests.integration.test_endpoint_kinds import KEY, external

PROVIDERS = ["openai", "anthropic"]


def _client(sim, provider, **kw):
    return ProviderBatches(EndpointRegistry.from_data(external("ep", provider, "llm/v1/chat", sim)).get("ep").entity, **kw)


def _wait(client, batch_id):
    for _ in range(400):
        state = client.poll(batch_id)
        if state.ended:
            return state
        time.sleep(0.02)
    raise AssertionError(f"batch {batch_id} never ended")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_answers_equal_the_online_path_and_errors_stay_per_line(provider):
    """Mutation caught: parsing batch lines other than through the online backend (values or usage differ)."""
    prompts = [f"row {i} says hi" for i in range(7)] + ["bad row [[status:400]]", "down [[status:503]]"]
    with ProviderSimulator(api_key=KEY, batch_api={"delay_s": 0.2}) as sim:
        client = _client(sim, provider, max_requests=4)
        lines = client.lines("llm/v1/chat", prompts, [{"max_tokens": 3}] * len(prompts), prompts)
        parts = client.split(lines)
        assert [len(p) for p in parts] == [4, 4, 1]
        ids = [client.submit(p) for p in parts]
        by_id = {ln.custom_id: ln for ln in lines}
        results = {}
        for batch_id in ids:
            assert _wait(client, batch_id).status in ("completed", "ended")
            results.update(client.results(batch_id, by_id))
        online = AIQueryClientMap(sim, provider, prompts[:7])
        for line, (value, usage) in zip(lines[:7], online):
            got = results[line.custom_id]
            assert (got.value, (got.usage.prompt_tokens, got.usage.completion_tokens)) == (value, usage)
        assert isinstance(results[lines[7].custom_id], PermanentEndpointError)
        assert "HTTP 400" in str(results[lines[7].custom_id]) and "injected status 400" in str(results[lines[7].custom_id])
        assert isinstance(results[lines[8].custom_id], RetryableEndpointError)
        snap = sim.snapshot()
        assert snap["batches_created"] == 3 and snap["batch_lines"] == 9 and snap["batch_lines_ok"] == 7


def AIQueryClientMap(sim, provider, prompts):
    from ai_query import AIQueryClient

    client = AIQueryClient(EndpointRegistry.from_data(external("ep", provider, "llm/v1/chat", sim)))
    try:
        return [(r.value, (r.prompt_tokens, r.completion_tokens)) for r in client.map("ep", prompts, {"max_tokens": 3})]
    finally:
        client.close()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_cancel_keeps_the_finished_lines_only(provider):
    """Mutation caught: a cancelled batch reporting every line (lines it never ran would be answered)."""
    with ProviderSimulator(api_key=KEY, batch_api={"delay_s": 1000.0}) as sim:
        client = _client(sim, provider)
        lines = client.lines("llm/v1/chat", ["a b c"] * 5, [None] * 5, ["a b c"] * 5)
        batch_id = client.submit(lines)
        batch = sim.batches.batches[batch_id]
        batch.created -= 1000.0 * 2 / 5  # two of five lines are done by now
        client.cancel(batch_id)
        assert _wait(client, batch_id).ended
        done = client.results(batch_id, {ln.custom_id: ln for ln in lines})
        assert sorted(done) == sorted(ln.custom_id for ln in lines[:2])
        assert sim.snapshot()["batches_cancelled"] == 1


def test_expired_batch_and_enqueued_token_quota():
    """Mutations caught: expiry ignored (the batch completes); the quota not counting enqueued batches."""
    with ProviderSimulator(api_key=KEY, batch_api={"delay_s": 10.0, "expire_s": 0.2, "enqueued_token_limit": 40}) as sim:
        client = _client(sim, "openai")
        lines = client.lines("llm/v1/chat", ["one two"] * 3, [{"max_tokens": 5}] * 3, ["one two"] * 3)  # 3 x (2 + 5) = 21 tokens
        first = client.submit(lines)
        second = client.submit(client.lines("llm/v1/chat", ["one two"] * 3, [{"max_tokens": 5}] * 3, ["one two"] * 3))
        refused = client.poll(second)
        assert refused.status == "failed" and "Enqueued token limit" in (refused.errors or "")
        state = _wait(client, first)
        assert state.status == "expired"
        assert client.results(first, {ln.custom_id: ln for ln in lines}) == {}
        third = client.submit(client.lines("llm/v1/chat", ["x"], [{"max_tokens": 5}], ["x"]))  # expired: no longer enqueued
        assert client.poll(third).status != "failed"


def test_a_poll_hit_by_a_rate_limit_is_tried_again():
    """Mutation caught: no retry in the batch client (the 429 reaches the job)."""
    with ProviderSimulator(api_key=KEY, batch_api={"delay_s": 0.0, "busy_polls": 2}) as sim:
        client = _client(sim, "openai")
        batch_id = client.submit(client.lines("llm/v1/chat", ["hi"], [None], ["hi"]))
        assert client.poll(batch_id).ended
        assert sim.snapshot()["busy_polls_refused"] == 2
