"""A statement with one ai_query call runs as an iterator UDF: each Arrow batch starts while the
batch before it is still in flight, so the endpoint does not idle at every batch boundary."""

from __future__ import annotations

import pytest

import spark_udfs
from ai_query import EndpointRegistry
from ai_query.testing import ProviderSimulator

BATCH = 8


@pytest.fixture(scope="module")
def sim():
    # Slow answers (0.5 s): a batch's 8 requests are still in flight when the next batch can start.
    with ProviderSimulator(api_key="sk-sim", latency_s=0.5) as simulator:
        yield simulator


@pytest.fixture(scope="module")
def pspark(spark, sim):
    def endpoint(name, **client):
        return {"name": name, "config": {"served_entities": [{"name": "m", "external_model": {
            "name": "sim-model", "provider": "openai", "task": "llm/v1/chat",
            "openai_config": {"openai_api_key_plaintext": "sk-sim", "openai_api_base": sim.base_url}}}]},
            "client_config": {"max_concurrency": 64, "initial_concurrency": 64, **client}}

    def bad_key():
        return {"name": "pipe-badkey", "config": {"served_entities": [{"name": "m", "external_model": {
            "name": "sim-model", "provider": "openai", "task": "llm/v1/chat",
            "openai_config": {"openai_api_key_plaintext": "sk-wrong", "openai_api_base": sim.base_url}}}]}}

    spark_udfs.register(spark, EndpointRegistry.builtin().with_endpoints(EndpointRegistry.from_data([
        endpoint("pipe"), bad_key()])))
    # 48 rows in one partition, cut into 6 Arrow batches of 8 rows
    spark.createDataFrame([(i, f"question {i}") for i in range(48)], "id INT, q STRING").coalesce(1) \
        .createOrReplaceTempView("pipe_rows")
    previous = spark.conf.get("spark.sql.execution.arrow.maxRecordsPerBatch")
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(BATCH))
    yield spark
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", previous)


@pytest.fixture(autouse=True)
def fresh_counts(sim):
    sim.reset()


def test_one_call_is_written_positionally_for_the_pipelined_variant(pspark):
    one = spark_udfs.rewrite(pspark, "SELECT ai_query('pipe', q, modelParameters => named_struct('max_tokens', 5), "
                                     "failOnError => false) AS r FROM pipe_rows")
    assert "ai_query(" not in one and "=>" not in one
    assert one.startswith("SELECT ai_query__") and one.endswith("('pipe', q, false, named_struct('max_tokens', 5)) AS r FROM pipe_rows")
    two = spark_udfs.rewrite(pspark, "SELECT ai_query('pipe', q) AS a, ai_query('pipe', q, failOnError => false) AS b FROM pipe_rows")
    assert "failOnError => false" in two  # several calls: the plain variants, names kept


def test_the_next_batch_is_sent_while_the_last_is_in_flight(pspark, sim):
    rows = spark_udfs.sql(pspark, "SELECT id, ai_query('pipe', q) AS r FROM pipe_rows", audit=True) \
        .select("id", "r.response", "r.aiq_status").collect()
    assert [r.id for r in rows] == list(range(48))  # every row once, in order, with its own answer
    assert all(r.response == f"echo: question {r.id}" and r.aiq_status == "ok" for r in rows)
    assert sim.stats.requests == 48
    # Two batches in flight at once (one batch alone is 8 requests; the plain UDF never has more
    # in flight), and never more than two: memory stays bounded.
    assert sim.stats.peak_concurrency == 2 * BATCH


def test_the_dataframe_column_is_pipelined_too(pspark, sim):
    from spark_udfs import ai_query

    rows = pspark.table("pipe_rows").select("id", ai_query("pipe", "q", failOnError=False).alias("r")).collect()
    assert [r.id for r in rows] == list(range(48))
    assert all(r.r.response == f"echo: question {r.id}" and r.r.errorMessage is None for r in rows)
    assert sim.stats.peak_concurrency == 2 * BATCH


def test_a_limit_ends_the_query_with_the_rows_it_asked_for(pspark, sim):
    rows = spark_udfs.sql(pspark, "SELECT id, ai_query('pipe', q) AS r FROM pipe_rows LIMIT 5").collect()
    assert len(rows) == 5 and all(r.r == f"echo: question {r.id}" for r in rows)


def test_a_systemic_failure_stops_the_pipeline_and_the_next_query_runs(pspark, sim):
    with pytest.raises(Exception) as info:
        spark_udfs.sql(pspark, "SELECT ai_query('pipe-badkey', q, failOnError => false) AS r FROM pipe_rows").collect()
    assert "HTTP 401" in str(info.value)
    assert sim.stats.requests <= 2 * BATCH  # the batches already started, not one 401 per row
    sim.reset()
    rows = spark_udfs.sql(pspark, "SELECT id, ai_query('pipe', q) AS r FROM pipe_rows").collect()
    assert sorted(r.id for r in rows) == list(range(48)) and sim.stats.requests == 48


def test_parameter_markers_keep_their_arguments(pspark, sim):
    query = ("SELECT id, ai_query('pipe', modelParameters => named_struct('max_tokens', ?), "
             "request => concat('Q: ', q, ?)) AS r FROM pipe_rows WHERE id = 0")
    # writing this call by position would move the markers: it keeps the plain variant, names and all
    assert "modelParameters => named_struct('max_tokens', ?)" in spark_udfs.rewrite(pspark, query)
    [row] = spark_udfs.sql(pspark, query, args=[50, "!"]).collect()
    assert row.r == "echo: Q: question 0!"
    in_order = "SELECT ai_query('pipe', concat(q, ?), modelParameters => named_struct('max_tokens', ?)) AS r FROM pipe_rows"
    assert "=>" not in spark_udfs.rewrite(pspark, in_order)  # markers stay in their order: positional is fine
