"""The conformance file: Databricks' documented ``ai_query`` / AI-function forms, run as written
against real HTTP servers on 127.0.0.1 (a provider simulator; a saved MLflow model), each checked
for the result type Databricks documents. One test per form:

| form | test here | behaviour in depth |
| --- | --- | --- |
| legacy key/value ``ai_query(ep, req, 'returnType', 'INT', ...)`` | ``test_legacy_key_value_form_...`` | |
| named arguments ``ai_query(ep, req, returnType => ..., failOnError => false)`` | ``test_named_form_...`` | ``test_ai_query_sql.py`` |
| v2 ``ai_classify(content, labels, options)`` (VARIANT) | ``test_v2_classify_...`` | |
| v2 ``ai_extract(content, schema)`` (VARIANT) | ``test_v2_extract_...`` | |
| ``ai_parse_document(content)`` on a generated PDF (VARIANT) | ``test_parse_document_form_...`` | ``test_parse_document.py`` |
| custom model, ``named_struct`` request (the signature's type) | ``test_custom_model_struct_form_...`` | ``test_custom_models.py`` |
| DataFrame ``selectExpr`` / ``F.expr`` | ``test_dataframe_select_expr_...`` | |

Error conditions / SQLSTATEs of refused forms: ``test_error_conditions.py``; the table of forms
and how each differs: ``docs/pages/databricks-parity.md``.

The simulator echoes the prompt (``echo: ...``) or answers ``[[reply:TEXT]]``; it cuts an answer
at the request's ``max_tokens``, which is how ``default_max_tokens`` is observed on the wire.
"""

from __future__ import annotations

import json
import os

import pytest

import spark_udfs
from ai_query import ArgumentError, EndpointRegistry
from ai_query.testing import ProviderSimulator
from tests.custom_models import custom_endpoints, save_custom_models
from tests.pdfgen import pdf


@pytest.fixture(scope="module")
def sim():
    with ProviderSimulator(api_key="sk-sim") as simulator:
        yield simulator


def _endpoint(sim, name, task, **client):
    return {
        "name": name,
        "config": {"served_entities": [{"name": "sim", "external_model": {
            "name": "sim-model", "provider": "openai", "task": task,
            "openai_config": {"openai_api_key": "{{secrets/sim/key}}", "openai_api_base": sim.base_url}}}]},
        "client_config": {"max_attempts": 2, **client},
    }


@pytest.fixture(scope="module")
def aispark(spark, sim, tmp_path_factory):
    os.environ["AIQ_SECRET_SIM_KEY"] = "sk-sim"
    models = save_custom_models(tmp_path_factory.mktemp("custom-models"))
    registry = EndpointRegistry.builtin().with_endpoints(EndpointRegistry.from_data([
        _endpoint(sim, "qa_bot", "llm/v1/chat"),
        _endpoint(sim, "short-bot", "llm/v1/chat", default_max_tokens=3),
        *custom_endpoints(models),
    ]))
    spark_udfs.register(spark, registry, task_endpoints={"ai_classify": "qa_bot", "ai_extract": "qa_bot", "ai_translate": "qa_bot"})
    yield spark


def test_legacy_key_value_form_maps_onto_named_arguments(aispark):
    # mutation: drop ``rewrite_legacy_calls`` in ``rewrite`` -> "failOnError must be true or false, got 'STRING'"
    df = aispark.sql("""
        SELECT ai_query('qa_bot', '[[reply:42]] how many?', 'returnType', 'INT', 'failOnError', false,
                        'modelParameters', named_struct('max_tokens', 8)) AS r
    """)
    assert df.schema["r"].dataType.simpleString() == "struct<response:int,errorMessage:string>"
    assert df.collect()[0].r.response == 42
    plain = aispark.sql("SELECT ai_query('qa_bot', 'hello', 'returnType', 'STRING') AS r")
    assert plain.schema["r"].dataType.simpleString() == "string" and plain.collect()[0].r == "echo: hello"


def test_named_form_and_unaliased_column_named_as_written(aispark):
    # mutation: ``named_as_written`` returning df unchanged -> the column is ai_query__<hash>(...)
    df = aispark.sql("SELECT ai_query('qa_bot', 'hi', returnType => 'STRING', failOnError => false)")
    assert df.columns == ["ai_query(qa_bot, hi, false)"]  # as Spark names the call it was given
    assert df.schema[0].dataType.simpleString() == "struct<response:string,errorMessage:string>"
    assert df.collect()[0][0].response == "echo: hi"


def test_default_max_tokens_applies_when_the_call_sets_none(aispark):
    # mutation: ``with_default_max_tokens`` returning params unchanged -> the whole echo comes back
    row = aispark.sql("""
        SELECT ai_query('short-bot', 'one two three four five six seven eight') AS d,
               ai_query('short-bot', 'one two three four five six seven eight',
                        modelParameters => named_struct('max_tokens', 50)) AS m
    """).collect()[0]
    assert len(row.d.split()) <= 3 < len(row.m.split())
    assert row.m == "echo: one two three four five six seven eight"


def test_v2_classify_with_described_labels_and_options_returns_variant(aispark):
    # mutation: ``is_v2`` returning False -> the options argument is refused / a STRING comes back
    df = aispark.sql("""
        SELECT ai_classify('[[reply:{"labels": ["billing", "urgent"]}]] my card was charged twice',
                           '{"billing": "payments and invoices", "urgent": "needs action today", "other": "anything else"}',
                           map('version', '2.0', 'multilabel', 'true')) AS multi,
               ai_classify('[[reply:{"labels": ["spam"]}]] win money', '["spam", "ham"]') AS single,
               ai_classify('[[reply:{"labels": ["nothing"]}]] x', array('spam', 'ham'), map('version', '2.0')) AS bad
    """)
    assert [f.dataType.simpleString() for f in df.schema] == ["variant", "variant", "variant"]
    row = df.collect()[0]
    assert json.loads(row.multi.toJson()) == {"response": ["billing", "urgent"], "error_message": None}
    assert json.loads(row.single.toJson()) == {"response": ["spam"], "error_message": None}
    bad = json.loads(row.bad.toJson())
    assert bad["response"] is None and "names none of the labels" in bad["error_message"]


def test_v1_classify_stays_a_string(aispark):
    df = aispark.sql("SELECT ai_classify('[[reply:{\"label\": \"ham\"}]] hi', array('spam', 'ham')) AS c")
    assert df.schema["c"].dataType.simpleString() == "string" and df.collect()[0].c == "ham"


def test_v2_extract_with_json_schema_returns_variant_and_constrains_the_answer(aispark):
    schema = json.dumps({"type": "object", "properties": {
        "invoice_id": {"type": "string", "description": "the invoice number"}, "total": {"type": "number"}}})
    df = aispark.sql(f"""
        SELECT ai_extract('[[reply:{{"invoice_id": "INV-7", "total": 12.5, "extra": 1}}]] invoice INV-7 of 12.50 EUR',
                          '{schema}') AS e,
               ai_extract('[[reply:{{"name": "Ada"}}]] Ada lives in London', '["name", "city"]') AS f
    """)
    assert [f.dataType.simpleString() for f in df.schema] == ["variant", "variant"]
    row = df.collect()[0]
    assert json.loads(row.e.toJson()) == {"response": {"invoice_id": "INV-7", "total": 12.5}, "error_message": None}
    assert json.loads(row.f.toJson()) == {"response": {"name": "Ada", "city": None}, "error_message": None}


def test_parse_document_form_returns_a_variant_in_the_documented_shape(aispark, tmp_path):
    # mutation: drop ``register_parse_document`` in ``register`` -> UNRESOLVED_ROUTINE ai_parse_document
    (tmp_path / "memo.pdf").write_bytes(pdf([[(72, 720, 20, "Memo"), (72, 690, 12, "Ship on Friday.")]]))
    aispark.read.format("binaryFile").load(str(tmp_path)).createOrReplaceTempView("memo_files")
    df = aispark.sql("SELECT ai_parse_document(content) AS parsed FROM memo_files")
    assert df.schema["parsed"].dataType.simpleString() == "variant"
    doc = json.loads(df.collect()[0].parsed.toJson())
    assert set(doc) == {"document", "error_status", "metadata"} and doc["error_status"] == []
    assert [(e["type"], e["content"]) for e in doc["document"]["elements"]] == [("title", "Memo"), ("text", "Ship on Friday.")]
    assert len(doc["document"]["pages"]) == 1 and doc["metadata"]["version"]


def test_custom_model_struct_form_is_one_record_typed_by_the_signature(aispark):
    # mutation: ``_custom_model`` not taking the signature's output type -> the result is STRING (JSON)
    df = aispark.sql("SELECT ai_query('triage', named_struct('timestamp', TIMESTAMP'2026-03-01 09:30:00', 'sender', 'ann', "
                     "'text', 'hi')) AS r")
    assert df.schema["r"].dataType.simpleString() == "struct<label:string,score:double,hour:bigint>"
    assert df.collect()[0].r.asDict() == {"label": "short", "score": 2 / 40, "hour": 9}


def test_dataframe_select_expr_and_expr_are_typed(aispark):
    # mutation: drop ``install_expression_hooks`` in ``register`` -> selectExpr answers free text (the INT check fails)
    from pyspark.sql import functions as F

    df = aispark.createDataFrame([("[[reply:7]] a",), ("[[status:400]] b",)], "q STRING")
    typed = df.selectExpr("q", "ai_query('qa_bot', q, returnType => 'INT', failOnError => false)")
    assert typed.columns == ["q", "ai_query(qa_bot, q, false)"]
    assert typed.schema[1].dataType.simpleString() == "struct<response:int,errorMessage:string>"
    rows = {r.q: r[1] for r in typed.collect()}
    assert rows["[[reply:7]] a"].response == 7 and "HTTP 400" in rows["[[status:400]] b"].errorMessage
    legacy = df.limit(1).select(F.expr("ai_query('qa_bot', q, 'returnType', 'INT')"))
    assert legacy.columns == ["ai_query('qa_bot', q, 'returnType', 'INT')"]
    assert legacy.schema[0].dataType.simpleString() == "int" and legacy.collect()[0][0] == 7


def test_an_expression_spark_does_not_hand_over_is_refused_not_answered_as_text(aispark):
    # mutation: ``check_not_rewritten`` returning at once -> the filter compares free text and returns rows
    df = aispark.createDataFrame([("[[reply:7]] a",)], "q STRING")
    with pytest.raises(Exception, match=r"spark_udfs\.ai_query\(endpoint, col, returnType="):
        df.filter("ai_query('qa_bot', q, returnType => 'INT') = 7").collect()


def test_column_api_takes_data_types_struct_types_pydantic_models_and_schema_dicts(aispark):
    # mutation: ``_response_format_text`` returning fmt unchanged -> a StructType is refused as not a string
    from pydantic import BaseModel
    from pyspark.sql.types import IntegerType, StructField, StringType, StructType

    class City(BaseModel):
        city: str

    df = aispark.createDataFrame([('[[reply:{"city": "Oslo"}]] 3',)], "q STRING")
    out = df.select(
        spark_udfs.ai_query("qa_bot", F_col("q"), returnType="STRUCT<city: STRING>").alias("ddl"),
        spark_udfs.ai_query("qa_bot", F_col("q"), responseFormat=StructType([StructField("city", StringType())])).alias("struct"),
        spark_udfs.ai_query("qa_bot", F_col("q"), responseFormat=City).alias("pydantic"),
        spark_udfs.ai_query("qa_bot", F_col("q"), responseFormat={"type": "object", "properties": {"city": {"type": "string"}}}).alias("d"),
    )
    assert [f.dataType.simpleString() for f in out.schema] == ["struct<city:string>", "struct<city:string>", "string", "string"]
    row = out.collect()[0]
    assert row.ddl.city == "Oslo" and row.struct.city == "Oslo" and json.loads(row.pydantic) == {"city": "Oslo"}
    number = aispark.createDataFrame([("[[reply:12]] n",)], "q STRING").select(
        spark_udfs.ai_query("qa_bot", "q", returnType=IntegerType()).alias("n"))
    assert number.schema["n"].dataType == IntegerType() and number.collect()[0].n == 12


def F_col(name):  # noqa: N802
    from pyspark.sql import functions as F

    return F.col(name)


def test_sentiment_asks_four_labels_except_on_the_embedded_small_model():
    # mutation: ``sentiment_task`` always returning the two-way task -> the enum has 2 labels
    from spark_udfs._tasks import sentiment_task

    _, fmt, _ = sentiment_task("sim-model").prompt("I love it but it broke")
    assert fmt["json_schema"]["schema"]["properties"]["label"]["enum"] == ["positive", "negative", "neutral", "mixed"]
    _, small, _ = sentiment_task("smollm2-135m-instruct").prompt("x")
    assert small["json_schema"]["schema"]["properties"]["label"]["enum"] == ["positive", "negative"]


@pytest.mark.parametrize("call, message", [
    # the legacy form, validated like the named form
    ("ai_query('qa_bot', 'x', 'returnType')", "come in pairs"),
    ("ai_query('qa_bot', 'x', 'returnType', 'STRING', 'failOnError')", "come in pairs"),
    ("ai_query('qa_bot', 'x', 'returnType', 'STRING', 'temperature', 0.5)", "is not an option name"),
    ("ai_query('qa_bot', 'x', 'failOnError', 'STRING')", "failOnError must be true or false"),
    ("ai_query('qa_bot', 'x', 'returnType', 'STRING', 'returnType', 'INT')", "given twice"),
    # the v2 task functions
    ("ai_classify('x', '[\"only\"]')", "2 to 20 labels"),
    ("ai_classify('x', array('a', 'b'), map('version', '3.0'))", "version must be one of"),
    ("ai_classify('x', array('a', 'b'), map('colour', 'red'))", "unknown option 'colour'"),
    ("ai_classify('x', array('a', 'b'), map('version', '1.0', 'multilabel', 'true'))", "multilabel needs version 2.0"),
    ("ai_extract('x', 'not json')", "which is not JSON"),
    # mutation: drop the to_lang check in ``_rewrite_task_call`` -> the query runs and asks the endpoint
    ("ai_translate('hello', 'klingon')", "to_lang must name a language"),
])
def test_bad_forms_are_refused_on_the_driver(aispark, sim, call, message):
    sim.reset()
    with pytest.raises(ArgumentError, match=message):
        aispark.sql(f"SELECT {call} AS r")
    assert sim.stats.requests == 0


def test_create_function_over_ai_query_points_at_temporary_functions(aispark):
    # mutation: drop the ``_PERSISTENT_FUNCTION`` check -> Spark's INVALID_TEMP_OBJ_REFERENCE without the hint
    with pytest.raises(ArgumentError, match="use CREATE TEMPORARY FUNCTION"):
        aispark.sql("CREATE OR REPLACE FUNCTION answer(q STRING) RETURNS STRING RETURN ai_query('qa_bot', q)")
    assert aispark.sql("SELECT ai_translate('[[reply:hola]] hello', 'cn') AS t").collect()[0].t == "hola"
