"""Custom MLflow models from Spark SQL: a ``named_struct`` request is one record of input features,
typed by the model's signature; the result takes the signature's output type; ``modelParameters``
go to the model's declared params and are refused on the driver where it declares none."""

from __future__ import annotations

import datetime as dt

import pytest

import spark_udfs
from ai_query import ArgumentError, EndpointRegistry
from tests.custom_models import custom_endpoints, save_custom_models

pytestmark = pytest.mark.spark


@pytest.fixture(scope="module")
def cspark(spark, tmp_path_factory):
    paths = save_custom_models(tmp_path_factory.mktemp("custom-models"))
    spark_udfs.register(spark, EndpointRegistry.builtin().with_endpoints(EndpointRegistry.from_data(custom_endpoints(paths))))
    rows = [(1, dt.datetime(2026, 3, 1, 9, 30), "ann", "hi"),
            (2, dt.datetime(2026, 3, 1, 17, 5), "bob", "a message of well over twenty characters")]
    spark.createDataFrame(rows, "id INT, ts TIMESTAMP, sender STRING, text STRING").createOrReplaceTempView("msgs")
    yield spark


REQUEST = "named_struct('timestamp', ts, 'sender', sender, 'text', text)"


def test_a_struct_request_is_one_typed_record_and_the_result_has_the_signature_type(cspark):
    df = cspark.sql(f"SELECT id, ai_query('triage', {REQUEST}) AS r FROM msgs ORDER BY id")
    assert df.schema["r"].dataType.simpleString() == "struct<label:string,score:double,hour:bigint>"
    rows = [row.r.asDict() for row in df.collect()]
    hours = [cspark.sql("SELECT hour(ts) AS h FROM msgs ORDER BY id").collect()[i].h for i in range(2)]
    assert rows == [{"label": "short", "score": 2 / 40, "hour": hours[0]},
                    {"label": "long", "score": 1.0, "hour": hours[1]}]


def test_model_parameters_reach_the_declared_params(cspark):
    df = cspark.sql(f"SELECT id, ai_query('triage', {REQUEST}, modelParameters => named_struct('threshold', 0.01)) AS r "
                    "FROM msgs ORDER BY id")
    assert [row.r.label for row in df.collect()] == ["long", "long"]  # 0.05 >= 0.01: the threshold arrived


@pytest.mark.parametrize("model", ["plain", "column"])  # a list, a one-column DataFrame
def test_a_one_column_output_is_that_columns_type(cspark, model):
    # mutation: ``_record_response`` keeping the record as the value -> a DOUBLE cannot be read from {"length": 5.0}
    df = cspark.sql(f"SELECT id, ai_query('{model}', {REQUEST}) AS r FROM msgs ORDER BY id")
    assert df.schema["r"].dataType.simpleString() == "double"
    assert [row.r for row in df.collect()] == [5.0, 43.0]


@pytest.mark.parametrize("endpoint, params, message", [
    ("plain", "named_struct('temperature', 0.5)", "its signature declares no params"),
    ("triage", "named_struct('treshold', 0.5)", "it declares threshold"),
])
def test_undeclared_model_parameters_are_refused_on_the_driver(cspark, endpoint, params, message):
    with pytest.raises(ArgumentError, match=message):
        cspark.sql(f"SELECT ai_query('{endpoint}', {REQUEST}, modelParameters => {params}) FROM msgs")


def test_a_databricks_model_serving_endpoint_gets_the_record_as_dataframe_records(spark, tmp_path_factory, monkeypatch):
    """Spark -> a ``databricks-model-serving`` endpoint over HTTP -> ``ai-query serve`` -> the MLflow model:
    the struct goes as ``dataframe_records`` with ``params``, ``predictions[0]`` comes back typed by returnType."""
    import json

    from ai_query.serving import ServingServer

    root = tmp_path_factory.mktemp("custom-remote")
    paths = save_custom_models(root)
    (root / "endpoints.json").write_text(json.dumps(custom_endpoints(paths)))
    monkeypatch.setenv("AIQ_SERVING_TOKEN", "tok-remote-0001")
    with ServingServer(endpoints=root / "endpoints.json", state_dir=root / "state", include_registry=False) as server:
        remote = {"name": "remote-triage", "config": {"served_entities": [{"name": "triage", "external_model": {
            "name": "triage", "provider": "databricks-model-serving", "task": "llm/v1/completions",
            "databricks_model_serving_config": {"databricks_workspace_url": server.url,
                                                "databricks_api_token_plaintext": "tok-remote-0001"}}}]}}
        spark_udfs.register(spark, EndpointRegistry.builtin().with_endpoints(EndpointRegistry.from_data([remote])))
        rows = [(1, dt.datetime(2026, 3, 1, 9, 30), "ann", "hi"),
                (2, dt.datetime(2026, 3, 1, 17, 5), "bob", "a message of well over twenty characters")]
        spark.createDataFrame(rows, "id INT, ts TIMESTAMP, sender STRING, text STRING").createOrReplaceTempView("remote_msgs")
        df = spark.sql(f"SELECT id, ai_query('remote-triage', {REQUEST}, returnType => 'STRUCT<label: STRING, score: DOUBLE>', "
                       "modelParameters => named_struct('threshold', 0.01)) AS r FROM remote_msgs ORDER BY id")
        assert [row.r.asDict() for row in df.collect()] == [{"label": "long", "score": 2 / 40}, {"label": "long", "score": 1.0}]
