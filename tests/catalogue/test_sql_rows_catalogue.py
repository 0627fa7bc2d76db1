"""Bad inputs that are one row's fault: SQL ``ai_query``, the DataFrame API and task functions.

A row at fault is that row's ``errorMessage`` with ``failOnError => false`` (the rows around it
intact, none lost), or with ``failOnError`` left true a query error naming the endpoint, the row
and the cause. A row that must not be sent (NULL, empty or blank, not UTF-8, over the endpoint's
``max_prompt_chars``, its own bad ``modelParameters``, a file of an unsupported type) costs no
request: the simulator's count says so. Systemic failures (401 / 403 / 404) stop the query
whatever ``failOnError`` says.
"""

from __future__ import annotations

import pytest

import spark_udfs

from ._sql_setup import assert_all_in, bspark, ctx_sim, fresh_counts, sim  # noqa: F401 - fixtures

INVALID_UTF8 = "CAST(unhex('C328A0A1FF') AS STRING)"
UTF8_FIX = ("not valid UTF-8", "0xC3", "make_valid_utf8(col)", "is_valid_utf8(col)")
EMPTY_FIX = ("the request is an empty string", "nothing to send", "WHERE trim(col) <> ''")


def row(case_id, request_sql, extra, response, fragments, *, sent, endpoint="sim-chat", good="'fine'"):
    """A bad row between two good ones (``good``, identical: one request for both); ``sent``:
    whether the bad row reaches the provider."""
    return pytest.param(endpoint, request_sql, extra, response, fragments, sent, good, id=case_id)


ROW_CASES = [
    # not sent: the row's own fault, decided before any request
    row("null_request", "CAST(NULL AS STRING)", "", None, ("the request is NULL: nothing to send",), sent=False),
    row("empty_prompt", "''", "", None, EMPTY_FIX, sent=False),
    row("blank_prompt", "'   '", "", None, ("the request is only whitespace", "WHERE trim(col) <> ''"), sent=False),
    row("empty_text_to_embed", "''", "", None, EMPTY_FIX, sent=False, endpoint="sim-embed"),
    row("invalid_utf8_prompt", INVALID_UTF8, "", None, UTF8_FIX, sent=False),
    row("invalid_utf8_in_chat_messages", f"array(named_struct('role', 'user', 'content', {INVALID_UTF8}))", "", None,
        ("the request holds text that is not valid UTF-8", "make_valid_utf8(col)"), sent=False,
        good="array(named_struct('role', 'user', 'content', 'fine'))"),
    row("invalid_utf8_text_to_embed", INVALID_UTF8, "", None, UTF8_FIX, sent=False, endpoint="sim-embed"),
    row("max_tokens_negative_in_one_row", "'q'", ", modelParameters => named_struct('max_tokens', IF(id = 2, -1, 5))", None,
        ("modelParameters.max_tokens must be between 1 and 1000000, got -1", "not sent"), sent=False),
    row("temperature_out_of_range_in_one_row", "'q'", ", modelParameters => named_struct('temperature', IF(id = 2, 9.0, 0.0))", None,
        ("modelParameters.temperature must be between 0.0 and 2.0, got 9.0", "not sent"), sent=False),
    row("stop_not_strings_in_one_row", "'q'",
        ", modelParameters => named_struct('stop', IF(id = 2, array(''), array('x')), 'top_k', IF(id = 2, -5, 1))", None,
        ("modelParameters.top_k must be between -1 and 1000000, got -5",), sent=False),
    row("prompt_over_max_prompt_chars", "repeat('a', 201)", "", None,
        ("the prompt has 201 characters", "max_prompt_chars (200)", "shorten the prompt", "left(col, N)"),
        sent=False, endpoint="sim-short"),
    row("file_not_an_image", "'describe'", ", files => IF(id = 2, X'00010203', X'89504E470D0A1A0A00')", None,
        ("a file of 4 bytes starting 00 01 02 03", "PNG, JPEG, GIF, WEBP"), sent=False),
    row("one_of_the_files_not_an_image", "'describe'",
        ", files => array(X'89504E470D0A1A0A00', IF(id = 2, X'FFFF', X'89504E470D0A1A0A00'))", None,
        ("a file of 2 bytes starting ff ff", "PDFs"), sent=False),
    # sent and refused, or answered with what the return type cannot read
    row("text_within_max_prompt_chars", "repeat('a', 200)", "", "echo: " + "a" * 200, None, sent=True, endpoint="sim-short"),
    row("huge_prompt_within_context", "repeat('word ', 50000)", ", modelParameters => named_struct('max_tokens', 3)",
        "echo: word word", None, sent=True),
    row("prompt_over_the_context_window", "repeat('word ', 3000)", "", None,
        ("HTTP 400", "Request too large", "prompt 3000", "shorten the prompt", "gave up after 1 attempt"), sent=True, endpoint="sim-ctx"),
    row("non_json_for_a_struct_return_type", "'[[reply:Paris, France]] capital?'", ", returnType => 'STRUCT<city: STRING>'", None,
        ("could not read the response as STRUCT<CITY:STRING>", "the response is not JSON", "'Paris, France'"), sent=True,
        good="""'[[reply:{"city": "Oslo"}]] ok'"""),
    row("non_json_for_a_struct_response_format", "'[[reply:Paris, France]] capital?'",
        ", responseFormat => 'STRUCT<city: STRING, country: STRING>'", None,
        ("could not read the response as STRUCT<CITY:STRING,COUNTRY:STRING>", "the response is not JSON"), sent=True,
        good="""'[[reply:{"city": "Oslo", "country": "Norway"}]] ok'"""),
    row("json_array_for_a_struct", "'[[reply:[\"Paris\"] ]] q'", ", returnType => 'STRUCT<city: STRING>'", None,
        ("could not read the response as STRUCT<CITY:STRING>", "expected a JSON object, got list"), sent=True,
        good="""'[[reply:{"city": "Oslo"}]] ok'"""),
    row("wrong_field_type_in_json", "'[[reply:{\"n\": \"three\"}]] q'", ", returnType => 'STRUCT<n: INT>'", None,
        ("could not read the response as STRUCT<N:INT>", "could not convert string to float: 'three'"), sent=True,
        good="""'[[reply:{"n": 3}]] ok'"""),
    row("prose_for_a_float", "'[[reply:about 0.7]] q'", ", returnType => 'FLOAT'", None,
        ("could not read the response as FLOAT", "'about 0.7'"), sent=True, good="'[[reply:0.5]] ok'"),
    row("fraction_for_an_int", "'[[reply:2.5]] q'", ", returnType => 'INT'", None,
        ("could not read the response as INT", "expected an integer, got '2.5'"), sent=True, good="'[[reply:3]] ok'"),
    row("maybe_for_a_boolean", "'[[reply:maybe]] q'", ", returnType => 'BOOLEAN'", None,
        ("could not read the response as BOOLEAN", "expected a boolean, got 'maybe'"), sent=True, good="'[[reply:true]] ok'"),
    row("object_for_an_array", "'[[reply:{\"a\": 1}]] q'", ", returnType => 'ARRAY<INT>'", None,
        ("could not read the response as ARRAY<INT>", "expected a JSON array, got dict"), sent=True, good="'[[reply:[1, 2] ]] ok'"),
    row("words_for_a_date", "'[[reply:tomorrow]] q'", ", returnType => 'DATE'", None,
        ("could not read the response as DATE", "'tomorrow'"), sent=True, good="'[[reply:2024-01-02]] ok'"),
    row("http_400", "'[[status:400]] q'", "", None, ("HTTP 400 from served entity 'sim'", "injected status 400", "gave up after 1 attempt"),
        sent=True),
    row("http_500_retried_then_given_up", "'[[status:500]] q'", "", None,
        ("HTTP 500 from served entity 'sim'", "gave up after 2 attempts"), sent=True),
    row("http_429_until_the_wait_is_spent", "'[[status:429]] q'", "", None, ("HTTP 429 from served entity 'sim'", "gave up after"),
        sent=True),
    row("malformed_json_body", "'[[malformed:5]] q'", "", None,
        ("HTTP 200 from served entity 'sim' with a body that is not a valid llm/v1/chat response", "gave up after 2 attempts"), sent=True),
    row("connection_reset", "'[[reset:5]] q'", "", None, ("connection lost calling 'sim-chat'", "gave up after 2 attempts"), sent=True),
]


@pytest.mark.parametrize("endpoint, request_sql, extra, response, fragments, sent, good", ROW_CASES)
def test_row_error_with_fail_on_error_false(bspark, sim, ctx_sim, endpoint, request_sql, extra, response, fragments, sent, good):
    df = bspark.sql(f"""
        SELECT id, ai_query('{endpoint}', CASE WHEN id = 2 THEN {request_sql} ELSE {good} END{extra},
                            failOnError => false) AS r
        FROM (SELECT /*+ COALESCE(1) */ * FROM VALUES (1), (2), (3) AS v(id))
    """)  # one partition: the two good rows are one request (dedup), whatever the bad row costs
    assert df.schema["r"].dataType.fieldNames() == ["response", "errorMessage"]
    rows = {r.id: r.r for r in df.collect()}
    assert sorted(rows) == [1, 2, 3]
    assert rows[1].errorMessage is None and rows[3].errorMessage is None and rows[1].response is not None
    bad = rows[2]
    if fragments is None:
        assert bad.errorMessage is None and bad.response.startswith(response)
    else:
        assert bad.response is None
        assert_all_in(bad.errorMessage, fragments)
    received = sim.stats.requests + ctx_sim.stats.requests
    if sent:
        assert received >= 2  # the good rows' one request and the bad row's
    else:
        assert received == 1  # only the good rows' request (identical: sent once)


FAIL_CASES = [
    pytest.param("sim-chat", "IF(id = 2, NULL, text)", "", ("the request is NULL",), False, id="null_request"),
    pytest.param("sim-chat", "IF(id = 2, '', text)", "", EMPTY_FIX, False, id="empty_prompt"),
    pytest.param("sim-chat", f"IF(id = 2, {INVALID_UTF8}, text)", "", UTF8_FIX, False, id="invalid_utf8"),
    pytest.param("sim-chat", "text", ", modelParameters => named_struct('max_tokens', IF(id = 2, -1, 5))",
                 ("modelParameters.max_tokens must be between 1 and 1000000, got -1",), False, id="max_tokens_negative_in_one_row"),
    pytest.param("sim-short", "IF(id = 2, repeat('a', 500), text)", "", ("the prompt has 500 characters", "max_prompt_chars"),
                 False, id="over_max_prompt_chars"),
    pytest.param("sim-chat", "IF(id = 2, '[[reply:not json]] q', '[[reply:{}]] q')", ", returnType => 'STRUCT<a: INT>'",
                 ("could not read the response as STRUCT<A:INT>", "'not json'"), True, id="non_json_for_a_struct"),
    pytest.param("sim-chat", "IF(id = 2, '[[status:500]] q', text)", "", ("HTTP 500", "gave up after 2 attempts"), True, id="http_500"),
    pytest.param("sim-ctx", "IF(id = 2, repeat('word ', 3000), text)", "", ("HTTP 400", "Request too large"), True,
                 id="over_the_context_window"),
]


@pytest.mark.parametrize("endpoint, request_sql, extra, fragments, sent", FAIL_CASES)
def test_fail_on_error_true_names_endpoint_row_and_cause(bspark, sim, ctx_sim, endpoint, request_sql, extra, fragments, sent):
    with pytest.raises(Exception) as info:
        bspark.sql(f"SELECT id, ai_query('{endpoint}', {request_sql}{extra}) "
                   "FROM (SELECT /*+ COALESCE(1) */ * FROM VALUES (1, 'a'), (2, 'b') AS v(id, text))").collect()
    assert_all_in(str(info.value), (f"ai_query('{endpoint}') failed for row ", "of the Arrow batch in partition", "Use failOnError => false",
                                    *fragments))
    # One partition, one Arrow batch: the batch is answered before its failing row fails the query.
    received = sim.stats.requests + ctx_sim.stats.requests
    assert received >= 2 if sent else received == 1  # the good row's request, and the bad row's if sent


DATAFRAME_ROW_CASES = [
    pytest.param("", EMPTY_FIX, id="empty_prompt"),
    pytest.param("  \n", ("the request is only whitespace",), id="blank_prompt"),
    pytest.param(None, ("the request is NULL",), id="null_prompt"),
]


@pytest.mark.parametrize("prompt, fragments", DATAFRAME_ROW_CASES)
def test_dataframe_api_row_errors(bspark, sim, prompt, fragments):
    df = bspark.createDataFrame([(1, "fine"), (2, prompt)], "id INT, p STRING")
    rows = {r.id: r.r for r in df.select("id", spark_udfs.ai_query("sim-chat", "p", failOnError=False).alias("r")).collect()}
    assert rows[1].response == "echo: fine" and rows[1].errorMessage is None
    assert rows[2].response is None
    assert_all_in(rows[2].errorMessage, fragments)
    assert sim.stats.requests == 1


def test_dataframe_api_invalid_utf8_is_a_row_error(bspark, sim):
    df = bspark.sql(f"SELECT 1 AS id, 'fine' AS p UNION ALL SELECT 2, {INVALID_UTF8}")
    rows = {r.id: r.r for r in df.select("id", spark_udfs.ai_query("sim-chat", "p", failOnError=False).alias("r")).collect()}
    assert rows[1].response == "echo: fine"
    assert_all_in(rows[2].errorMessage, UTF8_FIX)
    assert sim.stats.requests == 1


TASK_ROW_CASES = [
    pytest.param("ai_gen(p)", "''", EMPTY_FIX, 1, id="gen_empty_prompt"),
    pytest.param("ai_gen(p)", INVALID_UTF8, ("its prompt argument", *UTF8_FIX), 0, id="gen_invalid_utf8"),
    pytest.param("ai_summarize(p)", INVALID_UTF8, ("ai_summarize failed for row ", "its content argument", *UTF8_FIX), 0,
                 id="summarize_invalid_utf8"),
    pytest.param("ai_classify(p, array('a', 'b'))", INVALID_UTF8, ("ai_classify failed for row ", *UTF8_FIX), 0, id="classify_invalid_utf8"),
    pytest.param("ai_translate(p, IF(p = 'fine', 'es', ''))", "'hola'", ("ai_translate: bad arguments in row ", "to_lang must name a language"), 0,
                 id="translate_empty_language_in_one_row"),
    pytest.param("ai_classify(p, IF(p = 'fine', array('a', 'b'), array()))", "'x'",
                 ("ai_classify: bad arguments in row ", "labels must be a non-empty ARRAY<STRING>"), 0, id="classify_empty_labels_in_one_row"),
    pytest.param("ai_summarize(p, IF(p = 'fine', 5, -1))", "'x'", ("ai_summarize: bad arguments in row ", "max_words must be >= 0, got -1"), 0,
                 id="summarize_negative_max_words_in_one_row"),
]


@pytest.mark.parametrize("call, bad_sql, fragments, requests", TASK_ROW_CASES)
def test_task_function_row_fault_fails_the_query_naming_the_row(bspark, sim, call, bad_sql, fragments, requests):
    """Task functions have no failOnError: a row at fault fails the query, naming the function and the row."""
    with pytest.raises(Exception) as info:
        bspark.sql(f"SELECT {call} FROM (SELECT /*+ COALESCE(1) */ * FROM (SELECT 'fine' AS p UNION ALL SELECT {bad_sql}))").collect()
    assert_all_in(str(info.value), fragments)
    # Bad arguments fail the batch before anything is sent; a prompt the exchange refuses after the
    # batch's good row was answered.
    assert sim.stats.requests == requests


@pytest.mark.parametrize("extra", [
    pytest.param("returnType => NULL", id="return_type"),
    pytest.param("modelParameters => NULL", id="model_parameters"),
    pytest.param("responseFormat => NULL", id="response_format"),
    pytest.param("files => NULL", id="files"),
    pytest.param("modelParameters => named_struct('max_tokens', CAST(NULL AS INT))", id="one_parameter"),
])
def test_null_optional_argument_means_its_default(bspark, sim, extra):
    rows = bspark.sql(f"SELECT ai_query('sim-chat', text, {extra}) AS r FROM t").collect()
    assert sorted(r.r for r in rows) == ["echo: first", "echo: second"]
    assert sim.stats.requests == 2


def test_missing_json_fields_are_null_and_fenced_json_is_read(bspark):
    row_ = bspark.sql("""
        SELECT ai_query('sim-chat', '[[reply:{"city": "Oslo"}]] q', returnType => 'STRUCT<city: STRING, n: INT>',
                        failOnError => false) AS partial,
               ai_query('sim-chat', '[[reply:```json\\n{"city": "Oslo", "n": 7}\\n```]] q',
                        returnType => 'STRUCT<city: STRING, n: INT>') AS fenced
    """).collect()[0]
    assert row_.partial.errorMessage is None and row_.partial.response.city == "Oslo" and row_.partial.response.n is None
    assert row_.fenced.city == "Oslo" and row_.fenced.n == 7


@pytest.mark.parametrize("request_sql, fragments", [
    pytest.param("X'00FF'", ("the request cannot be sent to a llm/v1/chat endpoint as JSON", "bytes", "CAST(col AS STRING)"),
                 id="binary_request"),
    pytest.param("42", ("HTTP 400", "'content' must be a string", "got int"), id="integer_request"),
])
def test_request_of_a_wrong_type_is_a_row_error(bspark, request_sql, fragments):
    [row_] = bspark.sql(f"SELECT ai_query('sim-chat', {request_sql}, failOnError => false) AS r").collect()
    assert row_.r.response is None
    assert_all_in(row_.r.errorMessage, fragments)


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
    row_ = bspark.sql("""
        SELECT ai_classify(CAST(NULL AS STRING), array('a', 'b')) AS c, ai_summarize(CAST(NULL AS STRING)) AS s,
               ai_extract(CAST(NULL AS STRING), array('person')) AS e, ai_similarity(CAST(NULL AS STRING), 'x') AS sim
    """).collect()[0]
    assert row_.c is None and row_.s is None and row_.e is None and row_.sim is None
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
