"""Bad inputs refused on the driver, before any request: SQL ``ai_query``, the task functions and
the DataFrame API (``spark_udfs.ai_query``).

Each case is one call, the error it must raise and fragments its message must hold: the value
at fault and the fix. Every case also asserts that the provider simulator received nothing. The
per-row outcomes are in ``test_sql_rows_catalogue.py``.
"""

from __future__ import annotations

import threading

import pytest

import spark_udfs
from ai_query import ArgumentError, UnknownEndpointError

from ._sql_setup import assert_all_in, bspark, ctx_sim, fresh_counts, sim  # noqa: F401 - fixtures


def case(case_id: str, call: str, error: type, fragments: tuple[str, ...]):
    return pytest.param(call, error, fragments, id=case_id)


SQL_CASES = [
    # endpoint
    case("unknown_endpoint", "ai_query('sim-chatt', text)", UnknownEndpointError,
         ("unknown endpoint 'sim-chatt'", "'sim-chat'", "fix the name")),
    case("endpoint_not_a_string", "ai_query(42, text)", ArgumentError, ("the endpoint must be a string, got 42", "ai_query('my-endpoint'")),
    case("endpoint_null", "ai_query(NULL, text)", ArgumentError, ("the endpoint must be a string, got NULL", "ai_query('my-endpoint'")),
    case("endpoint_boolean", "ai_query(true, text)", ArgumentError, ("the endpoint must be a string, got true",)),
    case("endpoint_empty", "ai_query('', text)", UnknownEndpointError, ("unknown endpoint ''", "'sim-chat'")),
    case("endpoint_double_quoted_unknown", 'ai_query("sim-chatt", text)', UnknownEndpointError, ("unknown endpoint 'sim-chatt'",)),
    # arity and argument names
    case("request_missing", "ai_query('sim-chat')", ArgumentError, ("missing required argument(s) request", "the arguments are")),
    case("no_arguments", "ai_query()", ArgumentError, ("missing required argument(s) endpoint, request",)),
    case("too_many_arguments", "ai_query('sim-chat', text, 'STRING', true, named_struct('max_tokens', 3), "
         "'STRUCT<a: INT>', 'x', 'y')", ArgumentError, ("ai_query takes at most 7 arguments", "got 8")),
    case("unknown_named_argument_snake_case", "ai_query('sim-chat', text, return_type => 'STRING')", ArgumentError,
         ("unknown named argument 'return_type'", "returnType")),
    case("unknown_named_argument_typo", "ai_query('sim-chat', text, failOnEror => false)", ArgumentError,
         ("unknown named argument 'failOnEror'", "failOnError")),
    case("named_argument_twice", "ai_query('sim-chat', text, returnType => 'STRING', returnType => 'INT')", ArgumentError,
         ("argument 'returnType' is given twice", "give it once")),
    case("positional_and_named_same_argument", "ai_query('sim-chat', text, 'STRING', returnType => 'INT')", ArgumentError,
         ("argument 'returnType' is given twice",)),
    case("named_request_twice", "ai_query('sim-chat', text, request => text)", ArgumentError, ("argument 'request' is given twice",)),
    case("positional_after_named", "ai_query('sim-chat', returnType => 'STRING', text)", ArgumentError,
         ("follows a named one; name it too",)),
    # returnType
    case("return_type_bad_ddl", "ai_query('sim-chat', text, returnType => 'STRUCT<a INT')", ArgumentError,
         ("returnType 'STRUCT<a INT' is not a valid Spark SQL type", "use e.g. 'STRING'")),
    case("return_type_unknown_type", "ai_query('sim-chat', text, returnType => 'STRNG')", ArgumentError,
         ("returnType 'STRNG' is not a valid Spark SQL type", "use e.g. 'STRING'")),
    case("return_type_not_a_string", "ai_query('sim-chat', text, returnType => 42)", ArgumentError,
         ("returnType must be a non-empty DDL type string", "got 42")),
    case("return_type_empty", "ai_query('sim-chat', text, returnType => '')", ArgumentError,
         ("returnType must be a non-empty DDL type string", "got ''")),
    case("return_type_a_column", "ai_query('sim-chat', text, returnType => text)", ArgumentError,
         ("returnType must be a string literal like 'STRING', got text",)),
    # failOnError
    case("fail_on_error_integer", "ai_query('sim-chat', text, failOnError => 1)", ArgumentError,
         ("failOnError must be true or false, got 1",)),
    case("fail_on_error_string", "ai_query('sim-chat', text, 'STRING', 'false')", ArgumentError,
         ("failOnError must be true or false, got 'false'",)),
    case("fail_on_error_null", "ai_query('sim-chat', text, failOnError => NULL)", ArgumentError,
         ("failOnError must be true or false, got NULL",)),
    case("fail_on_error_a_column", "ai_query('sim-chat', text, failOnError => id > 1)", ArgumentError,
         ("failOnError must be true or false, got id > 1",)),
    # modelParameters
    case("model_parameters_a_string", "ai_query('sim-chat', text, modelParameters => 'max_tokens=3')", ArgumentError,
         ("modelParameters must be named_struct('max_tokens', 64, ...), got 'max_tokens=3'",)),
    case("model_parameters_a_map", "ai_query('sim-chat', text, modelParameters => map('max_tokens', 3))", ArgumentError,
         ("modelParameters must be named_struct('max_tokens', 64, ...), got map('max_tokens', 3)",)),
    case("model_parameters_a_number", "ai_query('sim-chat', text, modelParameters => 64)", ArgumentError,
         ("modelParameters must be named_struct('max_tokens', 64, ...), got 64",)),
    case("max_tokens_negative", "ai_query('sim-chat', text, modelParameters => named_struct('max_tokens', -1))", ArgumentError,
         ("modelParameters.max_tokens must be between 1 and 1000000, got -1",)),
    case("max_tokens_zero", "ai_query('sim-chat', text, modelParameters => named_struct('max_tokens', 0))", ArgumentError,
         ("modelParameters.max_tokens must be between 1 and 1000000, got 0",)),
    case("max_tokens_a_string", "ai_query('sim-chat', text, modelParameters => named_struct('max_tokens', 'ten'))", ArgumentError,
         ("modelParameters.max_tokens must be int, got str 'ten'",)),
    case("max_tokens_a_fraction", "ai_query('sim-chat', text, modelParameters => named_struct('max_tokens', 2.5))", ArgumentError,
         ("modelParameters.max_tokens must be int, got float 2.5",)),
    case("temperature_too_high", "ai_query('sim-chat', text, modelParameters => named_struct('temperature', 3.0))", ArgumentError,
         ("modelParameters.temperature must be between 0.0 and 2.0, got 3.0",)),
    case("temperature_a_boolean", "ai_query('sim-chat', text, modelParameters => named_struct('temperature', true))", ArgumentError,
         ("modelParameters.temperature must be a number, got True",)),
    case("top_p_out_of_range", "ai_query('sim-chat', text, modelParameters => named_struct('top_p', 1.5))", ArgumentError,
         ("modelParameters.top_p must be between 0.0 and 1.0, got 1.5",)),
    case("stop_a_number", "ai_query('sim-chat', text, modelParameters => named_struct('stop', 5))", ArgumentError,
         ("modelParameters.stop must be str or list or tuple, got int 5",)),
    case("stop_a_list_of_numbers", "ai_query('sim-chat', text, modelParameters => named_struct('stop', array(1, 2)))", ArgumentError,
         ("modelParameters.stop must be a string or a list of strings, got [1, 2]",)),
    case("top_logprobs_too_many", "ai_query('sim-chat', text, modelParameters => named_struct('top_logprobs', 50))", ArgumentError,
         ("modelParameters.top_logprobs must be between 0 and 20, got 50",)),
    case("parameter_given_twice", "ai_query('sim-chat', text, modelParameters => named_struct('temperature', 0.0, 'temperature', 1.0))",
         ArgumentError, ("the field 'temperature' is given twice", "give each field once")),
    case("unknown_parameter", "ai_query('sim-chat', text, modelParameters => named_struct('maxTokens', 3))", ArgumentError,
         ("unknown parameter 'maxTokens'", "max_tokens")),
    case("unknown_parameter_after_a_comment",
         "ai_query('sim-chat', text, modelParameters => named_struct('max_token', 3) -- typo\n)", ArgumentError,
         ("unknown parameter 'max_token'", "max_tokens")),
    # responseFormat
    case("response_format_not_a_struct", "ai_query('sim-chat', text, responseFormat => 'STRING')", ArgumentError,
         ("responseFormat 'STRING' must be a STRUCT<...> type or a JSON schema",)),
    case("response_format_empty", "ai_query('sim-chat', text, responseFormat => '')", ArgumentError,
         ("responseFormat must be a string literal: a JSON schema or a STRUCT<...> type",)),
    case("response_format_bad_struct_ddl", "ai_query('sim-chat', text, responseFormat => 'STRUCT<a: NOPE>')",
         ArgumentError, ("responseFormat 'STRUCT<a: NOPE>'", "STRUCT<...>")),
    case("response_format_malformed_json", "ai_query('sim-chat', text, responseFormat => '{\"type\": \"object\",}')",
         ArgumentError, ("responseFormat is not valid JSON", "give a JSON schema or a STRUCT<...> type")),
    case("response_format_json_array", "ai_query('sim-chat', text, responseFormat => '[1, 2]')",
         ArgumentError, ("responseFormat must be a JSON object", "got a JSON list")),
    case("response_format_bad_json_schema_type", "ai_query('sim-chat', text, responseFormat => '{\"type\": \"objectt\"}')",
         ArgumentError, ("responseFormat's JSON schema has type 'objectt' at $", "JSON schema types are object")),
    case("response_format_bad_nested_type",
         "ai_query('sim-chat', text, responseFormat => '{\"type\": \"object\", \"properties\": {\"a\": {\"type\": \"int\"}}}')",
         ArgumentError, ("type 'int' at $.properties.a", "integer")),
    case("response_format_properties_a_list",
         "ai_query('sim-chat', text, responseFormat => '{\"type\": \"object\", \"properties\": [1]}')",
         ArgumentError, ("'properties' at $ must be an object of schemas",)),
    case("response_format_required_not_names",
         "ai_query('sim-chat', text, responseFormat => '{\"type\": \"object\", \"required\": [1]}')",
         ArgumentError, ("'required' at $ must be a list of property names",)),
    case("response_format_a_column", "ai_query('sim-chat', text, responseFormat => text)", ArgumentError,
         ("responseFormat must be a string literal", "JSON schema or a STRUCT<...> type")),
    case("response_format_on_embeddings", "ai_query('sim-embed', text, responseFormat => 'STRUCT<a: STRING>')", ArgumentError,
         ("responseFormat applies to chat and completions endpoints, not embeddings",)),
    # files
    case("files_a_string_column", "ai_query('sim-chat', text, files => text)", ArgumentError,
         ("files => takes a BINARY or ARRAY<BINARY> column", "got STRING", "binaryFile", "nothing was sent")),
    case("files_an_integer_column", "ai_query('sim-chat', text, files => id)", ArgumentError,
         ("files => takes a BINARY or ARRAY<BINARY> column", "got INT")),
    case("files_an_array_of_strings", "ai_query('sim-chat', text, files => array(text))", ArgumentError,
         ("files => takes a BINARY or ARRAY<BINARY> column", "got ARRAY<STRING>")),
    case("files_a_string_positionally", "ai_query('sim-chat', text, 'STRING', true, named_struct('max_tokens', 3), NULL, text)",
         ArgumentError, ("files => takes a BINARY or ARRAY<BINARY> column", "got STRING")),
    case("files_a_string_in_a_statement_of_two_calls",
         "ai_query('sim-chat', text), ai_query('sim-chat', text, files => text, failOnError => false)",
         ArgumentError, ("files => takes a BINARY or ARRAY<BINARY> column", "got STRING")),
    case("files_on_an_embeddings_endpoint", "ai_query('sim-embed', text, files => img)", ArgumentError,
         ("sim-embed", "files")),
    case("files_on_an_embedded_model", "ai_query('local-chat', text, files => img)", ArgumentError,
         ("local-chat", "files")),
    # SQL text the scanner cannot read
    case("unterminated_quote", "ai_query('sim-chat', 'x) FROM t --", ArgumentError, ("unterminated ' quote in SQL",)),
    case("unbalanced_parentheses", "ai_query('sim-chat', concat('x', text)", ArgumentError, ("unbalanced parentheses in SQL",)),
    # task functions
    case("classify_labels_not_an_array", "ai_classify(text, 'urgent,not urgent')", ArgumentError,
         ("ai_classify: labels must be a non-empty array of strings", "array('a', 'b')", "'urgent,not urgent'")),
    case("classify_unknown_named_argument", "ai_classify(content => text, lables => array('a', 'b'))", ArgumentError,
         ("ai_classify: unknown named argument 'lables'", "labels")),
    case("classify_one_label", "ai_classify(text, array('urgent'))", ArgumentError, ("ai_classify", "at least 2", "got 1")),
    case("classify_21_labels", "ai_classify(text, array(" + ", ".join(f"'l{i}'" for i in range(21)) + "))", ArgumentError,
         ("ai_classify: labels must hold 2 to 20 labels", "got 21")),
    case("classify_empty_labels", "ai_classify(text, array())", ArgumentError, ("ai_classify: labels must be a non-empty array",)),
    case("classify_labels_numbers", "ai_classify(text, array(1, 2))", ArgumentError,
         ("ai_classify: labels must be a non-empty array of strings", "array(1, 2)")),
    case("classify_without_labels", "ai_classify(text)", ArgumentError, ("ai_classify: missing required argument(s) labels",)),
    case("classify_labels_null", "ai_classify(text, NULL)", ArgumentError, ("ai_classify: labels must be a non-empty array", "got NULL")),
    case("extract_empty_label", "ai_extract(text, array('person', ''))", ArgumentError,
         ("ai_extract: labels must be a non-empty array of strings",)),
    case("extract_labels_a_column", "ai_extract(text, array(text))", ArgumentError,
         ("ai_extract: labels must be a literal array('name', 'place', ...)",)),
    case("extract_options_not_a_map", "ai_extract(text, array('a'), 'x')", ArgumentError, ("ai_extract: options must be a map", "map('version', '2.0')")),
    case("extract_too_many_arguments", "ai_extract(text, array('a'), map('version', '2.0'), 'x')", ArgumentError,
         ("ai_extract takes at most 3 arguments",)),
    case("mask_empty_labels", "ai_mask(text, array())", ArgumentError, ("ai_mask: labels must be a non-empty array of strings",)),
    case("mask_without_labels", "ai_mask(text)", ArgumentError, ("ai_mask: missing required argument(s) labels",)),
    case("summarize_max_words_a_string", "ai_summarize(text, 'ten')", ArgumentError,
         ("ai_summarize: max_words must be a non-negative integer, got 'ten'",)),
    case("summarize_max_words_negative", "ai_summarize(text, -5)", ArgumentError,
         ("ai_summarize: max_words must be a non-negative integer, got -5",)),
    case("summarize_max_words_fraction", "ai_summarize(text, 2.5)", ArgumentError,
         ("ai_summarize: max_words must be a non-negative integer, got 2.5",)),
    case("translate_without_language", "ai_translate(text)", ArgumentError, ("ai_translate: missing required argument(s) to_lang",)),
    case("translate_unknown_named_argument", "ai_translate(text, lang => 'es')", ArgumentError,
         ("ai_translate: unknown named argument 'lang'", "to_lang")),
    case("gen_with_two_arguments", "ai_gen(text, 'more')", ArgumentError, ("ai_gen takes at most 1 arguments",)),
    case("gen_without_arguments", "ai_gen()", ArgumentError, ("ai_gen: missing required argument(s) prompt",)),
    case("similarity_with_one_argument", "ai_similarity(text)", ArgumentError, ("ai_similarity: missing required argument(s) expr2",)),
    case("similarity_with_three_arguments", "ai_similarity(text, text, text)", ArgumentError, ("ai_similarity takes at most 2 arguments",)),
    case("sentiment_with_two_arguments", "ai_analyze_sentiment(text, 'en')", ArgumentError,
         ("ai_analyze_sentiment takes at most 1 arguments",)),
    case("fix_grammar_with_two_arguments", "ai_fix_grammar(text, 'en')", ArgumentError, ("ai_fix_grammar takes at most 1 arguments",)),
    case("fix_grammar_named_argument", "ai_fix_grammar(text => text)", ArgumentError,
         ("ai_fix_grammar: unknown named argument 'text'", "content")),
]


@pytest.mark.parametrize("call, error, fragments", SQL_CASES)
def test_sql_refused_on_the_driver(bspark, sim, call, error, fragments):
    with pytest.raises(error) as info:
        bspark.sql(f"SELECT {call} FROM t")  # no action: the refusal comes before any task
    assert_all_in(str(info.value), fragments)
    assert sim.stats.requests == 0


def test_files_type_is_checked_before_a_ctas_runs(bspark, sim, tmp_path):
    """A CTAS runs inside spark.sql: the files check must come before it, not on the DataFrame."""
    with pytest.raises(ArgumentError, match="got STRING"):
        bspark.sql("CREATE TEMPORARY VIEW files_view AS SELECT ai_query('sim-chat', text, files => text) AS r FROM t")
    with pytest.raises(ArgumentError, match="got STRING"):
        bspark.sql(f"CREATE TABLE files_ctas USING parquet LOCATION '{tmp_path}' AS "
                   "SELECT ai_query('sim-chat', text, files => text) AS r FROM t")
    assert sim.stats.requests == 0
    assert not any(p.suffix == ".parquet" for p in tmp_path.iterdir())


def test_files_type_of_a_parameter_marker_is_refused_before_any_request(bspark, sim):
    """A ``:marker`` is bound when Spark runs the statement, after the rewrite: the UDF refuses the
    column's type itself, before its first request."""
    df = bspark.sql("SELECT ai_query('sim-chat', text, files => :f, failOnError => false) AS r FROM t", args={"f": "not bytes"})
    with pytest.raises(Exception) as info:
        df.collect()
    assert_all_in(str(info.value), ("files => takes a BINARY or ARRAY<BINARY> column", "string"))
    assert sim.stats.requests == 0


def test_a_statement_spark_cannot_parse_gets_sparks_own_error(bspark, sim):
    from pyspark.errors import ParseException

    with pytest.raises(ParseException):
        bspark.sql("SELECT ai_query('sim-chat', text, files => img) FROM t )")
    assert sim.stats.requests == 0


def df_case(case_id: str, kwargs: dict, error: type, fragments: tuple[str, ...]):
    return pytest.param(kwargs, error, fragments, id=case_id)


DATAFRAME_CASES = [
    df_case("unknown_endpoint", {"endpoint": "sim-chatt"}, UnknownEndpointError, ("unknown endpoint 'sim-chatt'", "'sim-chat'")),
    df_case("endpoint_not_a_string", {"endpoint": 42}, ArgumentError, ("the endpoint must be a string naming a registry endpoint", "42")),
    df_case("fail_on_error_a_string", {"failOnError": "false"}, ArgumentError, ("failOnError must be True or False, got 'false'",)),
    df_case("return_type_bad_ddl", {"returnType": "STRUCT<a INT"}, ArgumentError,
            ("returnType 'STRUCT<a INT' is not a valid Spark SQL type", "use e.g. 'STRING'")),
    df_case("max_tokens_negative", {"modelParameters": {"max_tokens": -1}}, ArgumentError,
            ("modelParameters.max_tokens must be between 1 and 1000000, got -1",)),
    df_case("unknown_parameter", {"modelParameters": {"maxTokens": 3}}, ArgumentError, ("unknown parameter 'maxTokens'", "max_tokens")),
    df_case("temperature_a_string", {"modelParameters": {"temperature": "hot"}}, ArgumentError,
            ("modelParameters.temperature must be int or float, got str 'hot'",)),
    df_case("response_format_malformed_json", {"responseFormat": '{"type": '}, ArgumentError,
            ("responseFormat is not valid JSON", "give a JSON schema or a STRUCT<...> type")),
    df_case("response_format_on_embeddings", {"endpoint": "sim-embed", "responseFormat": "STRUCT<a: STRING>"}, ArgumentError,
            ("responseFormat applies to chat and completions endpoints, not embeddings",)),
    df_case("files_on_an_embeddings_endpoint", {"endpoint": "sim-embed", "files": "img"}, ArgumentError, ("sim-embed", "files")),
]


@pytest.mark.parametrize("kwargs, error, fragments", DATAFRAME_CASES)
def test_dataframe_api_refused_on_the_driver(bspark, sim, kwargs, error, fragments):
    args = {"endpoint": "sim-chat", **kwargs}
    endpoint = args.pop("endpoint")
    with pytest.raises(error) as info:
        bspark.table("t").select(spark_udfs.ai_query(endpoint, "text", **args))
    assert_all_in(str(info.value), fragments)
    assert sim.stats.requests == 0


def test_dataframe_files_of_a_string_column_fail_the_query_before_any_request(bspark, sim):
    """The DataFrame API builds a Column before it meets a DataFrame: the type is checked by the
    UDF itself, on the whole column, before the batch's first request."""
    with pytest.raises(Exception) as info:
        bspark.table("t").select(spark_udfs.ai_query("sim-chat", "text", files="text", failOnError=False)).collect()
    assert_all_in(str(info.value), ("files => takes a BINARY or ARRAY<BINARY> column", "string", "binaryFile"))
    assert sim.stats.requests == 0


def test_dataframe_api_in_another_thread_than_register(bspark, sim):
    """``register(spark)`` holds for the session: a column built in another thread finds it."""
    out: dict[str, object] = {}

    def build_and_run() -> None:
        try:
            column = spark_udfs.ai_query("sim-chat", "text", failOnError=False)
            out["rows"] = sorted(r.r.response for r in bspark.table("t").select(column.alias("r")).collect())
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            out["error"] = exc

    thread = threading.Thread(target=build_and_run)
    thread.start()
    thread.join()
    assert "error" not in out, out.get("error")
    assert out["rows"] == ["echo: first", "echo: second"]
    assert sim.stats.requests == 2
