"""A catalogue of bad inputs to ``ai_query`` and the task functions, each with its exact outcome.

Real Spark, a real HTTP provider simulator on 127.0.0.1 (directives in a prompt make it answer a
status, a reply or a broken body), and for the one case that needs a real context window, the
embedded model. Four kinds of outcome:

- refused on the driver, before any request is sent, with a message that names the value and the fix;
- with ``failOnError => false``, a per-row ``errorMessage`` naming the cause, the other rows intact;
- with ``failOnError`` left true, the query fails naming the endpoint, the row and the cause;
- systemic failures (401 / 403 / 404) stop the query whatever ``failOnError`` says.
"""

from __future__ import annotations

import os

import pytest

import spark_udfs
from ai_query import ArgumentError, EndpointRegistry, UnknownEndpointError
from ai_query.testing import ProviderSimulator

CONTEXT_TOKENS = 2048
"""The context window the ``sim-ctx`` endpoint enforces (the simulator refuses a request whose
prompt + max_tokens exceeds its tokens-per-window quota with a 400, as a model server does for
its context length)."""


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
    def endpoint(name, task, base_url):
        return {
            "name": name,
            "config": {"served_entities": [{"name": "sim", "external_model": {
                "name": "sim-model", "provider": "openai", "task": task,
                "openai_config": {"openai_api_key": "{{secrets/sim/key}}", "openai_api_base": base_url}}}]},
            # Fast failures: two attempts, short backoff, half a second of 429s at most.
            "client_config": {"max_attempts": 2, "retry_backoff_s": 0.01, "rate_limit_wait_s": 0.5},
        }

    os.environ["AIQ_SECRET_SIM_KEY"] = "sk-sim"
    registry = EndpointRegistry.builtin().with_endpoints(EndpointRegistry.from_data([
        endpoint("sim-chat", "llm/v1/chat", sim.base_url),
        endpoint("sim-embed", "llm/v1/embeddings", sim.base_url),
        endpoint("sim-ctx", "llm/v1/chat", ctx_sim.base_url),
    ]))
    # The task functions on the simulator too: these cases are about arguments, not answers.
    tasks = {name: "sim-chat" for name in ("ai_analyze_sentiment", "ai_classify", "ai_extract", "ai_fix_grammar",
                                          "ai_gen", "ai_mask", "ai_summarize", "ai_translate")}
    spark_udfs.register(spark, registry, task_endpoints={**tasks, "ai_similarity": "sim-embed"})
    spark.createDataFrame([(1, "first"), (2, "second")], "id INT, text STRING").createOrReplaceTempView("t")
    yield spark
    spark.catalog.dropTempView("t")
    spark_udfs.register(spark)


@pytest.fixture(autouse=True)
def fresh_counts(sim):
    sim.reset()


def assert_all_in(message: str, fragments: tuple[str, ...]) -> None:
    missing = [f for f in fragments if f not in message]
    assert not missing, f"{missing} not in: {message}"


# -- 1. refused on the driver --------------------------------------------------------------------

def case(case_id: str, call: str, error: type, fragments: tuple[str, ...], bug: str | None = None):
    """One bad call, the error it must raise and the fragments its message must hold; ``bug`` marks a known bug."""
    marks = [pytest.mark.xfail(strict=True, reason=f"bug: {bug}")] if bug else []
    return pytest.param(call, error, fragments, id=case_id, marks=marks)


DRIVER_CASES = [
    # endpoint
    case("unknown_endpoint", "ai_query('sim-chatt', text)", UnknownEndpointError,
     ("unknown endpoint 'sim-chatt'", "'sim-chat'", "fix the name")),
    case("endpoint_not_a_string", "ai_query(42, text)", ArgumentError, ("the endpoint must be a string, got 42",)),
    case("endpoint_null", "ai_query(NULL, text)", ArgumentError, ("the endpoint must be a string, got NULL",)),
    # arity and argument names
    case("request_missing", "ai_query('sim-chat')", ArgumentError, ("missing required argument(s) request",)),
    case("too_many_arguments", "ai_query('sim-chat', text, 'STRING', true, named_struct('max_tokens', 3), "
                           "'STRUCT<a: INT>', 'x', 'y')", ArgumentError, ("ai_query takes at most", "got 8")),
    case("unknown_named_argument_snake_case", "ai_query('sim-chat', text, return_type => 'STRING')", ArgumentError,
     ("unknown named argument 'return_type'", "returnType")),
    case("named_argument_twice", "ai_query('sim-chat', text, returnType => 'STRING', returnType => 'INT')", ArgumentError,
     ("argument 'returnType' is given twice",)),
    case("positional_after_named", "ai_query('sim-chat', returnType => 'STRING', text)", ArgumentError,
     ("follows a named one; name it too",)),
    # returnType
    case("return_type_bad_ddl", "ai_query('sim-chat', text, returnType => 'STRUCT<a INT')", ArgumentError,
     ("returnType 'STRUCT<a INT' is not a valid Spark SQL type", "use e.g. 'STRING'")),
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
    # modelParameters
    case("model_parameters_a_string", "ai_query('sim-chat', text, modelParameters => 'max_tokens=3')", ArgumentError,
     ("modelParameters must be named_struct('max_tokens', 64, ...), got 'max_tokens=3'",)),
    case("model_parameters_a_map", "ai_query('sim-chat', text, modelParameters => map('max_tokens', 3))", ArgumentError,
     ("modelParameters must be named_struct('max_tokens', 64, ...), got map('max_tokens', 3)",)),
    case("max_tokens_negative", "ai_query('sim-chat', text, modelParameters => named_struct('max_tokens', -1))", ArgumentError,
     ("modelParameters.max_tokens must be between 1 and 1000000, got -1",)),
    case("max_tokens_a_string", "ai_query('sim-chat', text, modelParameters => named_struct('max_tokens', 'ten'))", ArgumentError,
     ("modelParameters.max_tokens must be int, got str 'ten'",)),
    case("top_p_out_of_range", "ai_query('sim-chat', text, modelParameters => named_struct('top_p', 1.5))", ArgumentError,
     ("modelParameters.top_p must be between 0.0 and 1.0, got 1.5",)),
    case("stop_a_number", "ai_query('sim-chat', text, modelParameters => named_struct('stop', 5))", ArgumentError,
     ("modelParameters.stop must be str or list or tuple, got int 5",)),
    case("parameter_given_twice", "ai_query('sim-chat', text, modelParameters => named_struct('temperature', 0.0, 'temperature', 1.0))",
     ArgumentError, ("the field 'temperature' is given twice",)),
    case("unknown_parameter_after_a_comment",
     "ai_query('sim-chat', text, modelParameters => named_struct('max_token', 3) -- typo\n)", ArgumentError,
     ("unknown parameter 'max_token'", "max_tokens")),
    # responseFormat
    case("response_format_not_a_struct", "ai_query('sim-chat', text, responseFormat => 'STRING')", ArgumentError,
     ("responseFormat 'STRING' must be a STRUCT<...> type or a JSON schema",)),
    case("response_format_empty", "ai_query('sim-chat', text, responseFormat => '')", ArgumentError,
     ("responseFormat must be a string literal: a JSON schema or a STRUCT<...> type",)),
    case("response_format_bad_struct_ddl", "ai_query('sim-chat', text, responseFormat => 'STRUCT<a: NOPE>')",
                 ArgumentError, ("responseFormat 'STRUCT<a: NOPE>'",)),
    case("response_format_json_array", "ai_query('sim-chat', text, responseFormat => '[1, 2]')",
                 ArgumentError, ("responseFormat", "JSON object")),
    case("response_format_bad_json_schema", "ai_query('sim-chat', text, responseFormat => '{\"type\": \"objectt\"}')",
                 ArgumentError, ("responseFormat", "objectt")),
    # SQL text the scanner cannot read
    case("unterminated_quote", "ai_query('sim-chat', 'x) FROM t --", ArgumentError, ("unterminated ' quote in SQL",)),
    case("unbalanced_parentheses", "ai_query('sim-chat', concat('x', text)", ArgumentError, ("unbalanced parentheses in SQL",)),
    # task functions
    case("classify_labels_not_an_array", "ai_classify(text, 'urgent,not urgent')", ArgumentError,
     ("ai_classify: labels must be a non-empty array of strings", "array('a', 'b')")),
    case("classify_unknown_named_argument", "ai_classify(content => text, lables => array('a', 'b'))", ArgumentError,
     ("ai_classify: unknown named argument 'lables'", "labels")),
    case("classify_one_label", "ai_classify(text, array('urgent'))", ArgumentError, ("ai_classify", "at least 2")),
    case("extract_empty_label", "ai_extract(text, array('person', ''))", ArgumentError,
     ("ai_extract: labels must be a non-empty array of strings",)),
    case("summarize_max_words_a_string", "ai_summarize(text, 'ten')", ArgumentError,
     ("ai_summarize: max_words must be a non-negative integer, got 'ten'",)),
    case("translate_without_language", "ai_translate(text)", ArgumentError, ("ai_translate: missing required argument(s) to_lang",)),
    case("gen_with_two_arguments", "ai_gen(text, 'more')", ArgumentError, ("ai_gen takes at most 1 arguments",)),
    case("similarity_with_one_argument", "ai_similarity(text)", ArgumentError, ("ai_similarity: missing required argument(s) expr2",)),
]


@pytest.mark.parametrize("call, error, fragments", DRIVER_CASES)
def test_refused_on_the_driver(bspark, sim, call, error, fragments):
    with pytest.raises(error) as info:
        bspark.sql(f"SELECT {call} FROM t")  # no action: the refusal comes before any task
    assert_all_in(str(info.value), fragments)
    assert sim.stats.requests == 0


# -- 2. per-row errors with failOnError => false ---------------------------------------------------

# (id, request SQL, extra arguments, expected response, fragments of the row's errorMessage or None);
# typed cases name in GOOD_ROWS a request whose answer their type can read, for the rows around the bad one.
ROW_CASES = [
    ("null_request", "CAST(NULL AS STRING)", "", None, ("the request is NULL: nothing to send",)),
    ("empty_prompt_is_sent_as_is", "''", "", "echo: ", None),
    ("empty_text_to_embed", "''", "", None, ("HTTP 400", "'input' cannot contain an empty string", "gave up after 1 attempt")),
    ("huge_prompt_within_context", "repeat('word ', 50000)", ", modelParameters => named_struct('max_tokens', 3)",
     "echo: word word", None),
    ("prompt_over_the_context_window", "repeat('word ', 3000)", "", None,
     ("HTTP 400", "Request too large", "prompt 3000", "shorten the prompt", "gave up after 1 attempt")),
    ("non_json_for_a_struct_return_type", "'[[reply:Paris, France]] capital?'", ", returnType => 'STRUCT<city: STRING>'", None,
     ("could not read the response as STRUCT<CITY:STRING>", "the response is not JSON", "'Paris, France'")),
    ("non_json_for_a_struct_response_format", "'[[reply:Paris, France]] capital?'",
     ", responseFormat => 'STRUCT<city: STRING, country: STRING>'", None,
     ("could not read the response as STRUCT<CITY:STRING,COUNTRY:STRING>", "the response is not JSON")),
    ("json_array_for_a_struct", "'[[reply:[\"Paris\"] ]] q'", ", returnType => 'STRUCT<city: STRING>'", None,
     ("could not read the response as STRUCT<CITY:STRING>", "expected a JSON object, got list")),
    ("wrong_field_type_in_json", "'[[reply:{\"n\": \"three\"}]] q'", ", returnType => 'STRUCT<n: INT>'", None,
     ("could not read the response as STRUCT<N:INT>", "could not convert string to float: 'three'")),
    ("prose_for_a_float", "'[[reply:about 0.7]] q'", ", returnType => 'FLOAT'", None,
     ("could not read the response as FLOAT", "'about 0.7'")),
    ("fraction_for_an_int", "'[[reply:2.5]] q'", ", returnType => 'INT'", None,
     ("could not read the response as INT", "expected an integer, got '2.5'")),
    ("maybe_for_a_boolean", "'[[reply:maybe]] q'", ", returnType => 'BOOLEAN'", None,
     ("could not read the response as BOOLEAN", "expected a boolean, got 'maybe'")),
    ("object_for_an_array", "'[[reply:{\"a\": 1}]] q'", ", returnType => 'ARRAY<INT>'", None,
     ("could not read the response as ARRAY<INT>", "expected a JSON array, got dict")),
    ("words_for_a_date", "'[[reply:tomorrow]] q'", ", returnType => 'DATE'", None,
     ("could not read the response as DATE", "'tomorrow'")),
    ("http_400", "'[[status:400]] q'", "", None, ("HTTP 400 from served entity 'sim'", "injected status 400", "gave up after 1 attempt")),
    ("http_500_retried_then_given_up", "'[[status:500]] q'", "", None,
     ("HTTP 500 from served entity 'sim'", "gave up after 2 attempts")),
    ("http_429_until_the_wait_is_spent", "'[[status:429]] q'", "", None, ("HTTP 429 from served entity 'sim'", "gave up after")),
    ("malformed_json_body", "'[[malformed:5]] q'", "", None,
     ("HTTP 200 from served entity 'sim' with a body that is not a valid llm/v1/chat response", "gave up after 2 attempts")),
    ("connection_reset", "'[[reset:5]] q'", "", None, ("connection lost calling 'sim-chat'", "gave up after 2 attempts")),
]
GOOD_ROWS = {
    "non_json_for_a_struct_return_type": """'[[reply:{"city": "Oslo"}]] ok'""",
    "non_json_for_a_struct_response_format": """'[[reply:{"city": "Oslo", "country": "Norway"}]] ok'""",
    "json_array_for_a_struct": """'[[reply:{"city": "Oslo"}]] ok'""",
    "wrong_field_type_in_json": """'[[reply:{"n": 3}]] ok'""",
    "prose_for_a_float": "'[[reply:0.5]] ok'",
    "fraction_for_an_int": "'[[reply:3]] ok'",
    "maybe_for_a_boolean": "'[[reply:true]] ok'",
    "object_for_an_array": "'[[reply:[1, 2] ]] ok'",
    "words_for_a_date": "'[[reply:2024-01-02]] ok'",
}
EMBED_CASES = {"empty_text_to_embed"}
CONTEXT_CASES = {"prompt_over_the_context_window"}


@pytest.mark.parametrize("request_sql, extra, response, fragments", [c[1:] for c in ROW_CASES], ids=[c[0] for c in ROW_CASES])
def test_per_row_error_with_fail_on_error_false(bspark, request, request_sql, extra, response, fragments):
    case = request.node.callspec.id
    endpoint = "sim-embed" if case in EMBED_CASES else "sim-ctx" if case in CONTEXT_CASES else "sim-chat"
    # The bad row sits between two good ones: it must not take them down, nor get lost.
    df = bspark.sql(f"""
        SELECT id, ai_query('{endpoint}', CASE WHEN id = 2 THEN {request_sql} ELSE {GOOD_ROWS.get(case, "'fine'")} END{extra},
                            failOnError => false) AS r
        FROM VALUES (1), (2), (3) AS v(id)
    """)
    assert df.schema["r"].dataType.fieldNames() == ["response", "errorMessage"]
    rows = {r.id: r.r for r in df.collect()}
    assert sorted(rows) == [1, 2, 3]
    assert rows[1].errorMessage is None and rows[3].errorMessage is None and rows[1].response is not None
    bad = rows[2]
    if fragments is None:
        assert bad.errorMessage is None and bad.response == response
    else:
        assert bad.response is None
        assert_all_in(bad.errorMessage, fragments)


@pytest.mark.parametrize("request_sql, fragments", [
    pytest.param("X'00FF'", ("the request cannot be sent to a llm/v1/chat endpoint as JSON", "bytes", "CAST(col AS STRING)"),
                 id="binary_request"),
    pytest.param("42", ("HTTP 400", "'content' must be a string", "got int"), id="integer_request"),
])
def test_request_of_a_wrong_type_is_a_row_error(bspark, request_sql, fragments):
    [row] = bspark.sql(f"SELECT ai_query('sim-chat', {request_sql}, failOnError => false) AS r").collect()
    assert row.r.response is None
    assert_all_in(row.r.errorMessage, fragments)


def test_missing_json_fields_are_null_and_fenced_json_is_read(bspark):
    row = bspark.sql("""
        SELECT ai_query('sim-chat', '[[reply:{"city": "Oslo"}]] q', returnType => 'STRUCT<city: STRING, n: INT>',
                        failOnError => false) AS partial,
               ai_query('sim-chat', '[[reply:```json\\n{"city": "Oslo", "n": 7}\\n```]] q',
                        returnType => 'STRUCT<city: STRING, n: INT>') AS fenced
    """).collect()[0]
    assert row.partial.errorMessage is None and row.partial.response.city == "Oslo" and row.partial.response.n is None
    assert row.fenced.city == "Oslo" and row.fenced.n == 7


def test_unicode_round_trips_intact(bspark, sim):
    texts = [
        "emoji 😀👍🏽 family 👨‍👩‍👧",
        "RTL مرحبا بالعالم and עברית mixed",
        "CJK 中文 日本語 한국어",
        "NUL \x00 inside, tab \t and\nnewline",
        "combining e\u0301 vs é, zero-width \u200b joiner",
        "quotes ' \" ` and backslash \\ ",
    ]
    df = bspark.createDataFrame(list(enumerate(texts)), "id INT, text STRING")
    df.createOrReplaceTempView("unicode_texts")
    rows = {r.id: r.r for r in bspark.sql(
        "SELECT id, ai_query('sim-chat', text, failOnError => false) AS r FROM unicode_texts").collect()}
    bspark.catalog.dropTempView("unicode_texts")
    assert sorted(rows) == list(range(len(texts)))
    for i, text in enumerate(texts):
        assert rows[i].errorMessage is None
        assert rows[i].response == "echo: " + text.strip()  # the simulator echoes the prompt it received
    assert sim.stats.requests == len(texts)


def test_null_content_gives_null_from_task_functions_without_a_request(bspark, sim):
    row = bspark.sql("""
        SELECT ai_classify(CAST(NULL AS STRING), array('a', 'b')) AS c, ai_summarize(CAST(NULL AS STRING)) AS s,
               ai_extract(CAST(NULL AS STRING), array('person')) AS e, ai_similarity(CAST(NULL AS STRING), 'x') AS sim
    """).collect()[0]
    assert row.c is None and row.s is None and row.e is None and row.sim is None
    assert sim.stats.requests <= 1  # ai_similarity may still embed its non-NULL side; nothing else is sent


def test_an_endpoint_column_naming_no_endpoint(bspark, sim):
    # A literal endpoint is checked on the driver; a column's value can only be checked per row.
    df = bspark.sql("""
        SELECT ep, ai_query(ep, 'q', failOnError => false) AS r FROM VALUES ('sim-chat'), (CAST(NULL AS STRING)) AS v(ep)
    """)
    rows = {r.ep: r.r for r in df.collect()}
    assert rows["sim-chat"].response == "echo: q"
    assert rows[None].response is None and "the endpoint argument is NULL" in rows[None].errorMessage
    with pytest.raises(Exception) as info:
        bspark.sql("SELECT ai_query(ep, 'q', failOnError => false) FROM VALUES ('no-such-endpoint') AS v(ep)").collect()
    assert_all_in(str(info.value), ("unknown endpoint 'no-such-endpoint'", "'sim-chat'"))


# -- 3. failOnError left true: the query fails naming endpoint, row and cause -----------------------

FAIL_CASES = [
    ("null_request", "sim-chat", "CASE WHEN id = 2 THEN NULL ELSE text END", "", ("the request is NULL",)),
    ("non_json_for_a_struct", "sim-chat", "CASE WHEN id = 2 THEN '[[reply:not json]] q' ELSE '[[reply:{}]] q' END",
     ", returnType => 'STRUCT<a: INT>'", ("could not read the response as STRUCT<A:INT>", "'not json'")),
    ("http_500", "sim-chat", "CASE WHEN id = 2 THEN '[[status:500]] q' ELSE text END", "", ("HTTP 500", "gave up after 2 attempts")),
    ("over_the_context_window", "sim-ctx", "CASE WHEN id = 2 THEN repeat('word ', 3000) ELSE text END", "",
     ("HTTP 400", "Request too large")),
]


@pytest.mark.parametrize("endpoint, request_sql, extra, fragments", [c[1:] for c in FAIL_CASES], ids=[c[0] for c in FAIL_CASES])
def test_fail_on_error_true_names_endpoint_row_and_cause(bspark, endpoint, request_sql, extra, fragments):
    with pytest.raises(Exception) as info:
        bspark.sql(f"SELECT id, ai_query('{endpoint}', {request_sql}{extra}) FROM VALUES (1, 'a'), (2, 'b') AS v(id, text)").collect()
    message = str(info.value)
    assert_all_in(message, (f"ai_query('{endpoint}') failed for row ", "Use failOnError => false", *fragments))


def test_task_function_failure_names_function_endpoint_and_row(bspark):
    with pytest.raises(Exception) as info:
        bspark.sql("SELECT ai_gen(p) FROM VALUES ('fine'), ('[[status:400]] q') AS v(p)").collect()
    assert_all_in(str(info.value), ("ai_gen via 'sim-chat' failed for row ", "HTTP 400"))


# -- 4. systemic failures stop the query even with failOnError => false ------------------------------

@pytest.mark.parametrize("status, fragments", [
    (401, ("HTTP 401", "Check the API key")),
    (403, ("HTTP 403", "Check the API key")),
    (404, ("HTTP 404", "Check the base URL and the model name")),
])
def test_systemic_statuses_stop_the_query(bspark, status, fragments):
    with pytest.raises(Exception) as info:
        bspark.sql(f"SELECT ai_query('sim-chat', '[[status:{status}]] q', failOnError => false)").collect()
    assert_all_in(str(info.value), fragments)
    assert "sk-sim" not in str(info.value)


# -- 5. over the embedded model's real context window (vLLM answers 400) --------------------------

@pytest.mark.integration
def test_prompt_over_the_local_models_context_is_a_row_error(bspark):
    # SmolLM2 runs with max_model_len 2048; ~3000 tokens of prompt cannot fit.
    rows = {r.id: r.r for r in bspark.sql("""
        SELECT id, ai_query('local-chat', CASE WHEN id = 2 THEN repeat('hello ', 3000) ELSE 'Say hi.' END,
                            modelParameters => named_struct('max_tokens', 4, 'temperature', 0.0),
                            failOnError => false) AS r
        FROM VALUES (1), (2) AS v(id)
    """).collect()}
    assert sorted(rows) == [1, 2]
    assert rows[1].errorMessage is None and rows[1].response
    assert rows[2].response is None
    assert_all_in(rows[2].errorMessage, ("HTTP 400", "2048"))
