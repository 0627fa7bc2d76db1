"""Shared setup of the SQL / DataFrame / task-function catalogue: one Spark session (the suite's),
one provider simulator on 127.0.0.1 counting every request it receives, and the endpoints:

- ``sim-chat`` / ``sim-embed``: chat and embeddings on the simulator;
- ``sim-ctx``: a simulator enforcing a 2048-token window (a 400 for longer prompts, as a model
  server does for its context length);
- ``sim-short``: ``client_config.max_prompt_chars`` 200: a longer prompt is a row error, not sent.

The task functions point at the simulator too: these cases are about arguments, not answers.
"""

from __future__ import annotations

import os

import pytest

import spark_udfs
from ai_query import EndpointRegistry
from ai_query.testing import ProviderSimulator

CONTEXT_TOKENS = 2048
MAX_PROMPT_CHARS = 200


def assert_all_in(message: str, fragments: tuple[str, ...]) -> None:
    missing = [f for f in fragments if f not in message]
    assert not missing, f"{missing} not in: {message}"


@pytest.fixture(scope="module")
def sim():
    with ProviderSimulator(api_key="sk-sim") as simulator:
        yield simulator


@pytest.fixture(scope="module")
def ctx_sim():
    with ProviderSimulator(api_key="sk-sim", tpm_limit=CONTEXT_TOKENS, window_s=0.05) as simulator:
        yield simulator


@pytest.fixture(scope="module")
def bspark(spark, sim, ctx_sim):
    def endpoint(name, task, base_url, **client):
        return {
            "name": name,
            "config": {"served_entities": [{"name": "sim", "external_model": {
                "name": "sim-model", "provider": "openai", "task": task,
                "openai_config": {"openai_api_key": "{{secrets/sim/key}}", "openai_api_base": base_url}}}]},
            # Fast failures: two attempts, short backoff, half a second of 429s at most.
            "client_config": {"max_attempts": 2, "retry_backoff_s": 0.01, "rate_limit_wait_s": 0.5, **client},
        }

    os.environ["AIQ_SECRET_SIM_KEY"] = "sk-sim"
    registry = EndpointRegistry.builtin().with_endpoints(EndpointRegistry.from_data([
        endpoint("sim-chat", "llm/v1/chat", sim.base_url),
        endpoint("sim-embed", "llm/v1/embeddings", sim.base_url),
        endpoint("sim-ctx", "llm/v1/chat", ctx_sim.base_url),
        endpoint("sim-short", "llm/v1/chat", sim.base_url, max_prompt_chars=MAX_PROMPT_CHARS),
    ]))
    tasks = {name: "sim-chat" for name in ("ai_analyze_sentiment", "ai_classify", "ai_extract", "ai_fix_grammar",
                                          "ai_gen", "ai_mask", "ai_summarize", "ai_translate")}
    spark_udfs.register(spark, registry, task_endpoints={**tasks, "ai_similarity": "sim-embed"})
    spark.createDataFrame([(1, "first", b"\x89PNG\r\n\x1a\nxx"), (2, "second", b"\x89PNG\r\n\x1a\nyy")],
                          "id INT, text STRING, img BINARY").createOrReplaceTempView("t")
    yield spark
    spark.catalog.dropTempView("t")
    spark_udfs.register(spark)


@pytest.fixture(autouse=True)
def fresh_counts(sim, ctx_sim):
    sim.reset()
    ctx_sim.reset()
