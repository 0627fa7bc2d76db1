"""Real-time parity: the same rows through ``ai_query`` in Spark and through the serving endpoint
(the official ``openai`` client and plain HTTP to ``/invocations``) give identical answers and
usage at temperature 0 on the embedded local model (SmolLM2-135M-Instruct, float32)."""

from __future__ import annotations

import httpx
import pytest

import spark_udfs
from ai_query.serving import ServingServer

pytestmark = pytest.mark.integration

PROMPTS = [
    "What is the capital of France? Answer in one word.",
    "Name one primary color.",
    "Say hello.",
    "Is the sentiment of 'I love this phone' positive or negative?",
    "Write the number after seven.",
]
PARAMS = {"max_tokens": 24, "temperature": 0.0}


@pytest.fixture(scope="module")
def batch_rows(spark):
    spark_udfs.register(spark)
    values = ", ".join(f"({i}, '{p.replace(chr(39), chr(39) * 2)}')" for i, p in enumerate(PROMPTS))
    df = spark_udfs.sql(spark, f"""
        SELECT id, ai_query('local-chat', prompt,
                            modelParameters => named_struct('max_tokens', 24, 'temperature', 0.0)) AS r
        FROM VALUES {values} AS t(id, prompt)""", audit=True)
    return {row.id: row.r for row in df.collect()}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServingServer(state_dir=tmp_path_factory.mktemp("parity-state")) as s:
        yield s


def test_spark_openai_client_and_invocations_give_identical_answers(batch_rows, server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    with httpx.Client(base_url=server.url, timeout=300) as http:
        for i, prompt in enumerate(PROMPTS):
            batch = batch_rows[i]
            assert batch.aiq_status == "ok", batch.aiq_error
            messages = [{"role": "user", "content": prompt}]
            online = client.chat.completions.create(model="local-chat", messages=messages, **PARAMS)
            invoked = http.post("/serving-endpoints/local-chat/invocations", json={"messages": messages, **PARAMS})
            assert invoked.status_code == 200, invoked.text
            body = invoked.json()
            assert online.choices[0].message.content == body["choices"][0]["message"]["content"] == batch.response
            assert (online.usage.prompt_tokens, online.usage.completion_tokens) == (batch.aiq_prompt_tokens, batch.aiq_completion_tokens)
            assert (body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"]) == (batch.aiq_prompt_tokens, batch.aiq_completion_tokens)
            assert online.model == body["model"] == batch.aiq_model == "smollm2-135m-instruct"
    assert "paris" in batch_rows[0].response.lower()


def test_the_aiohttp_backend_transport_gives_the_same_answers(batch_rows, tmp_path):
    """The server's default transport to backends is httptools; with --http-client aiohttp it is the
    batch tasks' own. Both answer every row exactly as the batch did (through aiohttp)."""
    with ServingServer(state_dir=tmp_path / "state", http_client="aiohttp") as s, httpx.Client(base_url=s.url, timeout=300) as http:
        for i, prompt in enumerate(PROMPTS):
            body = http.post("/serving-endpoints/local-chat/invocations",
                             json={"messages": [{"role": "user", "content": prompt}], **PARAMS}).json()
            assert body["choices"][0]["message"]["content"] == batch_rows[i].response


def test_logprobs_come_back_where_the_backend_gives_them(server):
    with httpx.Client(base_url=server.url, timeout=300) as http:
        body = http.post("/serving-endpoints/local-chat/invocations", json={
            "messages": [{"role": "user", "content": PROMPTS[2]}], "logprobs": True, "top_logprobs": 2, **PARAMS}).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"]
    assert "".join(t["token"] for t in content) == body["choices"][0]["message"]["content"]
    assert all(t["logprob"] <= 0 and len(t["top_logprobs"]) == 2 for t in content)
