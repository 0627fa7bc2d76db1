"""ai_query from Spark SQL against a real HTTP provider simulator on 127.0.0.1."""

from __future__ import annotations

import pytest

import spark_udfs
from ai_query import ArgumentError, EndpointRegistry, UnknownEndpointError
from ai_query.testing import ProviderSimulator


@pytest.fixture(scope="module")
def sim():
    with ProviderSimulator(api_key="sk-sim") as simulator:
        yield simulator


def sim_endpoint(sim, name, task, **client):
    """An endpoint of the simulator ``sim`` (its key from the secret sim/key); ``client``: client_config."""
    return {
        "name": name,
        "config": {"served_entities": [{"name": "sim", "external_model": {
            "name": "sim-model", "provider": "openai", "task": task,
            "openai_config": {"openai_api_key": "{{secrets/sim/key}}", "openai_api_base": sim.base_url}}}]},
        "client_config": {"max_attempts": 3, **client},
    }


@pytest.fixture(scope="module")
def registry(sim):
    return EndpointRegistry.builtin().with_endpoints(
        EndpointRegistry.from_data([
            sim_endpoint(sim, "sim-chat", "llm/v1/chat"),
            sim_endpoint(sim, "sim-complete", "llm/v1/completions"),
            sim_endpoint(sim, "sim-embed", "llm/v1/embeddings"),
        ])
    )


@pytest.fixture(scope="module")
def aispark(spark, registry):
    import os

    os.environ["AIQ_SECRET_SIM_KEY"] = "sk-sim"
    spark_udfs.register(spark, registry)
    spark.createDataFrame([(i, f"review number {i}") for i in range(40)], "id INT, text STRING").createOrReplaceTempView("reviews")
    yield spark


@pytest.fixture(autouse=True)
def fresh_counts(sim):
    sim.reset()


def test_string_results_in_order_with_model_parameters(aispark, sim):
    rows = aispark.sql("""
        SELECT id, ai_query('sim-chat', CONCAT('Classify: ', text),
                            modelParameters => named_struct('max_tokens', 64, 'temperature', 0.0)) AS r
        FROM reviews
    """).collect()
    rows.sort(key=lambda r: r.id)  # not ORDER BY: a sort samples its input, which evaluates the UDF twice
    assert [r.r for r in rows] == [f"echo: Classify: review number {i}" for i in range(40)]
    assert sim.stats.requests == 40


def test_fail_on_error_false_returns_struct_with_per_row_errors(aispark, sim):
    df = aispark.sql("""
        SELECT id, ai_query('sim-chat', CASE WHEN id % 10 = 3 THEN '[[status:400]] bad' ELSE text END,
                            failOnError => false) AS r
        FROM reviews
    """)
    assert df.schema["r"].dataType.simpleString() == "struct<response:string,errorMessage:string>"
    rows = {r.id: r.r for r in df.collect()}
    assert len(rows) == 40
    bad = [i for i, r in rows.items() if r.errorMessage is not None]
    assert sorted(bad) == [3, 13, 23, 33]
    assert all(rows[i].response is None and "HTTP 400" in rows[i].errorMessage for i in bad)
    assert rows[0].response == "echo: review number 0"


def test_fail_on_error_true_fails_the_query_naming_endpoint_and_cause(aispark):
    with pytest.raises(Exception) as info:
        aispark.sql("SELECT ai_query('sim-chat', '[[status:400]] nope') AS r").collect()
    message = str(info.value)
    assert "ai_query('sim-chat') failed" in message and "HTTP 400" in message and "failOnError => false" in message


def test_unknown_endpoint_fails_before_any_task_runs(aispark, sim):
    with pytest.raises(UnknownEndpointError) as info:
        aispark.sql("SELECT ai_query('no-such-endpoint', 'x')")
    assert "'no-such-endpoint'" in str(info.value) and "'sim-chat'" in str(info.value)
    assert sim.stats.requests == 0


@pytest.mark.parametrize(
    "call, message",
    [
        ("ai_query('sim-chat', text, foo => 1)", "unknown named argument 'foo'"),
        ("ai_query('sim-chat', text, returnType => 'NOT_A_TYPE<')", "is not a valid Spark SQL type"),
        ("ai_query('sim-chat', text, modelParameters => named_struct('max_tokenz', 3))", "unknown parameter 'max_tokenz'"),
        ("ai_query('sim-chat', text, modelParameters => named_struct('temperature', 9.0))", "between 0.0 and 2.0"),
        ("ai_query('sim-chat', text, failOnError => 'yes')", "failOnError must be true or false"),
        ("ai_query('sim-embed', text, responseFormat => 'STRUCT<a: INT>')", "not embeddings"),
        ("ai_query('sim-chat', text, responseFormat => '{not json')", "not valid JSON"),
    ],
)
def test_bad_arguments_are_refused_on_the_driver(aispark, sim, call, message):
    with pytest.raises(ArgumentError, match=message.replace("(", r"\(").replace(")", r"\)")):
        aispark.sql(f"SELECT {call} FROM reviews")
    assert sim.stats.requests == 0


def test_embeddings_return_array_of_float(aispark):
    df = aispark.sql("SELECT id, ai_query('sim-embed', text) AS v FROM reviews WHERE id < 5")
    assert df.schema["v"].dataType.simpleString() == "array<float>"
    vectors = [r.v for r in df.collect()]
    assert len(vectors) == 5 and all(len(v) == 8 for v in vectors)
    assert vectors[0] != vectors[1]


def test_return_type_parses_the_answer(aispark):
    df = aispark.sql("""
        SELECT ai_query('sim-chat', '[[reply:0.75]] score', returnType => 'FLOAT') AS f,
               ai_query('sim-chat', '[[reply:{"city": "Paris", "n": 3}]] q', returnType => 'STRUCT<city: STRING, n: INT>',
                        failOnError => false) AS s,
               ai_query('sim-chat', '[[reply:not json]] q', returnType => 'STRUCT<city: STRING>', failOnError => false) AS bad
    """)
    row = df.collect()[0]
    assert row.f == pytest.approx(0.75)
    assert row.s.response.city == "Paris" and row.s.response.n == 3 and row.s.errorMessage is None
    assert row.bad.response is None and "could not read the response as STRUCT" in row.bad.errorMessage


def test_transient_failures_are_retried_and_counted(aispark, sim):
    df = spark_udfs.sql(aispark, """
        SELECT id, ai_query('sim-chat', CONCAT(CASE WHEN id % 4 = 0 THEN '[[flaky:2]] ' WHEN id % 4 = 1 THEN '[[malformed:1]] '
                                                     ELSE '' END, text)) AS r
        FROM reviews
    """, audit=True)
    rows = df.select("id", "r.*").collect()
    assert len(rows) == 40 and all(r.aiq_status == "ok" for r in rows)
    attempts = {r.id: r.aiq_attempts for r in rows}
    assert all(attempts[i] == 3 for i in range(0, 40, 4)) and all(attempts[i] == 2 for i in range(1, 40, 4))
    assert sum(r.aiq_prompt_tokens for r in rows) == sim.stats.prompt_tokens
    assert sum(r.aiq_completion_tokens for r in rows) == sim.stats.completion_tokens
    assert all(r.aiq_request_id and r.aiq_request_id.startswith("req-") for r in rows)


def test_bad_key_stops_the_query_early(aispark, sim, monkeypatch):
    registry = EndpointRegistry.from_data({
        "name": "sim-badkey",
        "config": {"served_entities": [{"name": "sim", "external_model": {
            "name": "sim-model", "provider": "openai", "task": "llm/v1/chat",
            "openai_config": {"openai_api_key_plaintext": "sk-wrong", "openai_api_base": sim.base_url}}}]},
    })
    spark_udfs.register(aispark, EndpointRegistry.builtin().with_endpoints(registry))
    try:
        with pytest.raises(Exception) as info:
            aispark.sql("SELECT ai_query('sim-badkey', text, failOnError => false) FROM reviews").collect()
        assert "HTTP 401" in str(info.value) and "Check the API key" in str(info.value)
        assert "sk-wrong" not in str(info.value)
        assert sim.stats.requests < 40  # stopped early, not one 401 per row
    finally:
        spark_udfs.register(aispark, EndpointRegistry.builtin())


def test_dataframe_column_api(aispark, sim, registry):
    from spark_udfs import ai_query

    spark_udfs.register(aispark, registry)
    df = aispark.table("reviews").where("id < 6")
    out = df.select(
        "id",
        ai_query("sim-chat", "text", modelParameters={"max_tokens": 3, "temperature": 0.0}).alias("short"),
        ai_query("sim-chat", "text", failOnError=False).alias("safe"),
        ai_query("sim-embed", "text").alias("vec"),
        ai_query("sim-chat", "text", modelParameters={"max_tokens": 50}, audit=True).alias("audited"),
    )
    assert out.schema["safe"].dataType.simpleString() == "struct<response:string,errorMessage:string>"
    rows = {r.id: r for r in out.collect()}
    assert rows[2].short == "echo: review number"  # cut at max_tokens words
    assert rows[2].safe.response == "echo: review number 2" and rows[2].safe.errorMessage is None
    assert len(rows[2].vec) == 8
    assert rows[2].audited.aiq_status == "ok" and rows[2].audited.aiq_total_tokens > 0
    with pytest.raises(UnknownEndpointError):
        ai_query("nope", "text")
    with pytest.raises(ArgumentError, match="unknown parameter 'max_tokenz'"):
        ai_query("sim-chat", "text", modelParameters={"max_tokenz": 3})


def test_identical_requests_are_sent_once_and_their_tokens_counted_once(aispark, sim, registry):
    spark_udfs.register(aispark, registry)
    rows = spark_udfs.sql(aispark, """
        SELECT id, ai_query('sim-chat', CONCAT('same question ', id % 3)) AS r FROM reviews
    """, audit=True).select("id", "r.*").collect()
    assert len(rows) == 40 and all(r.aiq_status == "ok" for r in rows)
    assert {r.response for r in rows} == {"echo: same question 0", "echo: same question 1", "echo: same question 2"}
    partitions = aispark.table("reviews").rdd.getNumPartitions()
    assert sim.stats.requests <= 3 * partitions  # at most once per distinct request and Arrow batch
    assert sum(r.aiq_total_tokens for r in rows) == sim.stats.total_tokens
