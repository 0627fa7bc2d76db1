"""Argument and row errors of the AI functions carry a Spark error condition and SQLSTATE.

Argument errors reach the ``spark.sql`` caller (and ``selectExpr``, ``spark_udfs.ai_query``) as
``AnalysisException``s that are still the ai-query errors they were; a failed row (``failOnError``
true) reaches the caller inside Spark's ``PythonException``, whose text holds the condition, read
back by ``spark_udfs.condition_of``. Every case runs against a real provider simulator and
asserts that an argument error sent nothing.
"""

from __future__ import annotations

import os
import re

import pytest
from pyspark.errors import AnalysisException, PySparkException, PythonException

import spark_udfs
from ai_query import ArgumentError, EndpointRegistry, RowFailedError, UnknownEndpointError
from tests.spark.test_databricks_forms import _endpoint, sim  # noqa: F401 - sim: the provider simulator fixture


@pytest.fixture(scope="module")
def espark(spark, sim):
    os.environ["AIQ_SECRET_SIM_KEY"] = "sk-sim"
    registry = EndpointRegistry.builtin().with_endpoints(EndpointRegistry.from_data([_endpoint(sim, "qa_bot", "llm/v1/chat")]))
    spark_udfs.register(spark, registry, task_endpoints={name: "qa_bot" for name in ("ai_classify", "ai_summarize", "ai_translate")})
    yield spark


def assert_condition(error: BaseException, condition: str, sqlstate: str, message: str) -> None:
    assert isinstance(error, PySparkException) and isinstance(error, AnalysisException)
    assert (error.getCondition(), error.getSqlState()) == (condition, sqlstate)
    text = str(error)
    assert text.startswith(f"[{condition}] ") and text.endswith(f" SQLSTATE: {sqlstate}")
    assert re.search(message, error.getMessageParameters()["message"])  # the message of before, kept whole


# mutation: ``raise ValueError(...)`` instead of ``argument_error(...)`` at any of these sites (or
# ``as_spark_error`` returning the error unchanged) -> not a PySparkException, no condition
ARGUMENT_ERRORS = [
    ("ai_query('qa_bot', 'x', returnType => 'NOT A TYPE')", "AI_FUNCTION_UNSUPPORTED_RETURN_TYPE", "0A000",
     "returnType 'NOT A TYPE' is not a valid Spark SQL type"),
    ("ai_query('qa_bot', 'x', failOnError => 'yes')", "AI_QUERY_INVALID_ARGUMENT", "22023", "failOnError must be true or false"),
    ("ai_query('qa_bot', 'x', 'returnType', 'STRING', 'failOnError')", "AI_QUERY_WRONG_ARGUMENTS", "4274K", "come in pairs"),
    ("ai_query('qa_bot')", "AI_QUERY_WRONG_ARGUMENTS", "4274K", "missing required argument"),
    ("ai_query('qa_bot', 'x', temperature => 0.5)", "AI_QUERY_WRONG_ARGUMENTS", "4274K", "unknown named argument 'temperature'"),
    ("ai_query('qa_bot', 'x', modelParameters => named_struct('temperature', 'hot'))", "AI_FUNCTION_INVALID_MODEL_PARAMETERS",
     "22023", "modelParameters.temperature must be"),
    ("ai_query('qa_bot', 'x', modelParameters => 5)", "AI_FUNCTION_INVALID_MODEL_PARAMETERS", "22023",
     "modelParameters must be named_struct"),
    ("ai_query('qa_bot', 'x', responseFormat => 'ARRAY<INT>')", "AI_FUNCTION_UNSUPPORTED_RESPONSE_FORMAT", "0A000",
     "must be a STRUCT<...> type or a JSON schema"),
    ("ai_summarize('x', -1)", "AI_FUNCTION_INVALID_MAX_WORDS", "22032", "max_words must be a non-negative integer"),
    ("ai_translate('hello', 'klingon')", "AI_QUERY_INVALID_ARGUMENT", "22023", "to_lang must name a language"),
    ("ai_classify('x', array('only'))", "AI_QUERY_INVALID_ARGUMENT", "22023", "2 to 20 labels"),
    ("ai_query('qa_bot', 'x)", "AI_QUERY_SQL_SYNTAX", "42601", "unterminated ' quote"),
]


@pytest.mark.parametrize("call, condition, sqlstate, message", ARGUMENT_ERRORS, ids=[c[1] + ":" + c[0][:30] for c in ARGUMENT_ERRORS])
def test_argument_errors_carry_their_condition_and_stay_argument_errors(espark, sim, call, condition, sqlstate, message):
    sim.reset()
    with pytest.raises(ArgumentError) as caught:  # the except clauses written for ArgumentError still catch it
        espark.sql(f"SELECT {call} AS r")
    assert_condition(caught.value, condition, sqlstate, message)
    assert sim.stats.requests == 0


def test_an_unknown_endpoint_is_endpoint_not_found(espark):
    # mutation: drop the UnknownEndpointError branch of ``as_spark_error`` -> a generic configuration error
    with pytest.raises(UnknownEndpointError) as caught:
        espark.sql("SELECT ai_query('no-such-bot', 'x') AS r")
    assert_condition(caught.value, "AI_QUERY_ENDPOINT_NOT_FOUND", "42704", "unknown endpoint 'no-such-bot'")
    assert caught.value.name == "no-such-bot" and "qa_bot" in caught.value.known


def test_create_function_over_ai_query_names_temporary_functions(espark):
    with pytest.raises(ArgumentError) as caught:
        espark.sql("CREATE FUNCTION answer(q STRING) RETURNS STRING RETURN ai_query('qa_bot', q)")
    assert_condition(caught.value, "AI_QUERY_TEMPORARY_FUNCTION_REQUIRED", "42K0F", "use CREATE TEMPORARY FUNCTION")


def test_the_dataframe_paths_raise_the_same_conditions(espark):
    # mutation: drop ``@raises_conditions`` on ``ai_query`` -> the column function raises a plain ArgumentError
    df = espark.createDataFrame([("x",)], "q STRING")
    with pytest.raises(ArgumentError) as caught:
        df.selectExpr("ai_query('qa_bot', q, failOnError => 'yes')")
    assert_condition(caught.value, "AI_QUERY_INVALID_ARGUMENT", "22023", "failOnError must be true or false")
    with pytest.raises(ArgumentError) as caught:
        spark_udfs.ai_query("qa_bot", "q", failOnError="yes")  # type: ignore[arg-type]
    assert_condition(caught.value, "AI_QUERY_INVALID_ARGUMENT", "22023", "failOnError must be True or False")
    with pytest.raises(UnknownEndpointError) as caught:
        spark_udfs.ai_query("no-such-bot", "q")
    assert caught.value.getCondition() == "AI_QUERY_ENDPOINT_NOT_FOUND"


ROW_ERRORS = [
    # mutation: ``AIQueryRowException(...)`` back to ``RowFailedError(...)`` in ``finish_batch`` -> no condition in the text
    ("ai_query('qa_bot', '[[status:400]] x')", "AI_FUNCTION_HTTP_REQUEST_ERROR", "08000", "HTTP 400"),
    # mutation: the ``unreadable`` choice dropped -> a cast failure reads as a request error
    ("ai_query('qa_bot', '[[reply:abc]] x', returnType => 'INT')", "AI_FUNCTION_HTTP_PARSE_CAST_ERROR", "2203G",
     "could not read the response as INT"),
    ("ai_translate('hello', lang) FROM VALUES ('klingon') AS t(lang)", "AI_QUERY_INVALID_ARGUMENT", "22023",
     "to_lang must name a language"),
]


@pytest.mark.parametrize("call, condition, sqlstate, message", ROW_ERRORS, ids=[c[1] for c in ROW_ERRORS])
def test_a_failed_row_carries_its_condition_inside_sparks_python_exception(espark, call, condition, sqlstate, message):
    with pytest.raises(PythonException) as caught:
        espark.sql(f"SELECT {call}").collect()
    assert caught.value.getCondition() == "PYTHON_EXCEPTION"  # Spark's own wrapping, SQLSTATE 38000
    assert re.search(rf"\[{condition}\] .*{message}.* SQLSTATE: {sqlstate}", str(caught.value))
    row = spark_udfs.condition_of(caught.value)
    assert isinstance(row, RowFailedError) and isinstance(row, PySparkException)
    assert (row.getCondition(), row.getSqlState()) == (condition, sqlstate)
    assert re.search(message, str(row.args[0])) and not str(row.args[0]).startswith("[")


def test_condition_of_finds_nothing_in_a_failure_that_is_not_ours(espark):
    with pytest.raises(PySparkException) as caught:
        espark.sql("SELECT no_such_function(1)")
    assert spark_udfs.condition_of(caught.value) is None


def test_other_ai_query_errors_keep_their_type_and_pickle_with_their_condition():
    # mutation: ``AIQueryDriverException.__reduce__`` removed -> pickling fails (the twin class is made per type)
    import pickle

    from ai_query import ConfigError, SystemicEndpointError
    from spark_udfs._conditions import as_spark_error

    for error, condition, sqlstate in [(ConfigError("bad endpoints file"), "AI_QUERY_INVALID_CONFIGURATION", "42000"),
                                       (SystemicEndpointError("HTTP 401", status_code=401), "AI_FUNCTION_HTTP_REQUEST_ERROR", "08000")]:
        twin = pickle.loads(pickle.dumps(as_spark_error(error)))
        assert isinstance(twin, type(error)) and isinstance(twin, PySparkException)
        assert (twin.getCondition(), twin.getSqlState()) == (condition, sqlstate)
        assert str(twin) == f"[{condition}] {error} SQLSTATE: {sqlstate}" and twin.__dict__.get("status_code") == error.__dict__.get("status_code")
