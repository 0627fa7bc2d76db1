"""Identical requests in a query are sent once: within an Arrow batch and across the batches of a stage."""

from __future__ import annotations

import pytest

import spark_udfs
from ai_query import EndpointRegistry
from ai_query.testing import ProviderSimulator


@pytest.fixture(scope="module")
def sim():
    with ProviderSimulator(api_key="sk-sim") as simulator:
        yield simulator


@pytest.fixture(scope="module")
def dspark(spark, sim):
    def endpoint(name, **client):
        return {"name": name, "config": {"served_entities": [{"name": "m", "external_model": {
            "name": "sim-model", "provider": "openai", "task": "llm/v1/chat",
            "openai_config": {"openai_api_key_plaintext": "sk-sim", "openai_api_base": sim.base_url}}}]},
            "client_config": client}

    spark_udfs.register(spark, EndpointRegistry.builtin().with_endpoints(EndpointRegistry.from_data([
        endpoint("dedup-on"), endpoint("dedup-off", deduplicate=False)])))
    # 60 rows, 6 distinct prompts, in one partition cut into Arrow batches of 8 rows
    spark.createDataFrame([(i, f"question {i % 6}") for i in range(60)], "id INT, q STRING").coalesce(1) \
        .createOrReplaceTempView("dup_rows")
    previous = spark.conf.get("spark.sql.execution.arrow.maxRecordsPerBatch")
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "8")
    yield spark
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", previous)


def test_each_distinct_request_is_sent_once_per_query(dspark, sim):
    sim.reset()
    rows = spark_udfs.sql(dspark, "SELECT id, ai_query('dedup-on', q) AS r FROM dup_rows", audit=True) \
        .select("id", "r.response", "r.aiq_deduplicated", "r.aiq_total_tokens").collect()
    assert sorted(r.id for r in rows) == list(range(60))
    assert all(r.response == f"echo: question {r.id % 6}" for r in rows)
    assert sim.stats.requests == 6
    assert sum(r.aiq_deduplicated for r in rows) == 54
    # the copies cost nothing, so the table's tokens equal what the endpoint served
    assert sum(r.aiq_total_tokens for r in rows) == sim.stats.prompt_tokens + sim.stats.completion_tokens


def test_a_new_query_sends_again_and_dedup_can_be_turned_off(dspark, sim):
    sim.reset()
    spark_udfs.sql(dspark, "SELECT ai_query('dedup-on', q) AS r FROM dup_rows").collect()
    assert sim.stats.requests == 6  # not answered from the previous query's stage
    sim.reset()
    rows = spark_udfs.sql(dspark, "SELECT ai_query('dedup-off', q) AS r FROM dup_rows", audit=True) \
        .select("r.aiq_deduplicated").collect()
    assert sim.stats.requests == 60 and not any(r.aiq_deduplicated for r in rows)


def test_two_calls_with_the_same_request_in_one_query_send_it_once(dspark, sim):
    sim.reset()
    rows = spark_udfs.sql(dspark, """
        SELECT id, ai_query('dedup-on', q, failOnError => false) AS a, ai_query('dedup-on', q, returnType => 'STRING') AS b
        FROM dup_rows WHERE id < 6
    """).collect()
    assert sim.stats.requests == 6
    assert all(r.a.response == r.b == f"echo: question {r.id}" for r in rows)
