"""ai_query from Spark SQL on the embedded local models (vLLM on CPU, the embeddings server)."""

from __future__ import annotations

import math

import pytest

import spark_udfs

pytestmark = pytest.mark.integration

PROMPTS = "VALUES (1, 'What is the capital of France? Answer in one word.'), (2, 'Name one primary color.'), (3, 'Say hello.') AS t(id, prompt)"


@pytest.fixture(scope="module")
def local_spark(spark):
    spark_udfs.register(spark)
    return spark


def run_chat(spark):
    df = spark_udfs.sql(spark, f"""
        SELECT id, ai_query('local-chat', prompt,
                            modelParameters => named_struct('max_tokens', 24, 'temperature', 0.0)) AS r
        FROM {PROMPTS}""", audit=True)
    return {row.id: row.r for row in df.collect()}


def test_local_chat_is_repeatable_at_temperature_zero_with_real_usage(local_spark):
    first, second = run_chat(local_spark), run_chat(local_spark)
    assert set(first) == {1, 2, 3}
    for i in first:
        assert first[i].aiq_status == "ok" and first[i].response
        assert first[i].response == second[i].response
        assert first[i].aiq_prompt_tokens > 0 and first[i].aiq_completion_tokens > 0
        assert first[i].aiq_total_tokens == first[i].aiq_prompt_tokens + first[i].aiq_completion_tokens
        assert first[i].aiq_model == "smollm2-135m-instruct"
    assert "paris" in first[1].response.lower()


def test_local_chat_structured_output(local_spark):
    row = local_spark.sql("""
        SELECT ai_query('local-chat', 'Which city is the capital of France, and in which country is it? Reply in JSON.',
                        responseFormat => 'STRUCT<city: STRING, country: STRING>',
                        modelParameters => named_struct('max_tokens', 40, 'temperature', 0.0)) AS r
    """).collect()[0]
    assert row.r.city and row.r.country
    assert "paris" in row.r.city.lower()


def test_local_embed_returns_384_floats_that_rank_by_meaning(local_spark):
    rows = local_spark.sql("""
        SELECT id, ai_query('local-embed', text) AS v
        FROM VALUES (1, 'a cat sits on the mat'), (2, 'a kitten is resting on a rug'), (3, 'stock markets fell sharply today') AS t(id, text)
    """).collect()
    v = {r.id: r.v for r in rows}
    assert all(len(x) == 384 for x in v.values())

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    assert cos(v[1], v[2]) > cos(v[1], v[3]) + 0.2
