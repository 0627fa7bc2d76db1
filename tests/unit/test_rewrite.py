import pytest

from ai_query import ArgumentError
from spark_udfs._rewrite import bind_arguments, find_calls, parse_literal, replace_names

SIG = ["endpoint", "request", "returnType", "failOnError", "modelParameters", "responseFormat"]


def test_finds_calls_and_named_arguments_outside_literals_and_comments():
    sql = """
    SELECT id, AI_QUERY('ep', CONCAT('say (hi), ', text),
                        failOnError => false,
                        modelParameters => named_struct('max_tokens', 64, 'temperature', 0.0)) AS r,
           'ai_query(not, a, call)' AS s -- ai_query('in a comment')
           /* ai_query('x', 'y') */, my_ai_query(1), t.ai_query
    FROM t
    """
    calls = find_calls(sql, {"ai_query"})
    assert len(calls) == 1
    call = calls[0]
    bound = bind_arguments(call, SIG, 2)
    assert bound["endpoint"].literal == "ep"
    assert bound["request"].text == "CONCAT('say (hi), ', text)"
    assert bound["request"].literal is NotImplemented
    assert bound["failOnError"].literal is False
    assert bound["modelParameters"].literal == {"max_tokens": 64, "temperature": 0.0}
    assert sql[call.end - 1] == ")"


def test_nested_calls_are_all_found():
    sql = "SELECT ai_query('a', ai_query('b', x)) FROM t"
    assert [c.args[0].literal for c in find_calls(sql, {"ai_query"})] == ["a", "b"]


def test_replace_names_changes_only_the_function_name():
    sql = "SELECT ai_query('e', 'it''s', returnType => 'FLOAT') AS x FROM t"
    calls = find_calls(sql, {"ai_query"})
    out = replace_names(sql, {calls[0].start: "ai_query__float"}, calls)
    assert out == "SELECT ai_query__float('e', 'it''s', returnType => 'FLOAT') AS x FROM t"
    assert find_calls(out, {"ai_query"}) == []
    assert calls[0].args[1].literal == "it's"


@pytest.mark.parametrize(
    "sql, message",
    [
        ("SELECT ai_query('e', 'x', foo => 1)", "unknown named argument 'foo'"),
        ("SELECT ai_query('e')", "missing required argument(s) request"),
        ("SELECT ai_query('e', 'x', failOnError => true, failOnError => false)", "given twice"),
        ("SELECT ai_query(endpoint => 'e', 'x')", "follows a named one"),
        ("SELECT ai_query('e', 'x', 'STRING', true, null, null, 'extra')", "at most 6 arguments"),
    ],
)
def test_bad_calls_are_named(sql, message):
    with pytest.raises(ArgumentError, match=message.replace("(", r"\(").replace(")", r"\)")):
        for call in find_calls(sql, {"ai_query"}):
            bind_arguments(call, SIG, 2)


def test_literals():
    assert parse_literal("'a\\'b'") == "a'b"
    assert parse_literal("42") == 42 and parse_literal("0.5") == 0.5 and parse_literal("NULL") is None
    assert parse_literal("array('x', 'y')") == ["x", "y"]
    assert parse_literal("col") is NotImplemented
    with pytest.raises(ArgumentError, match="unterminated"):
        find_calls("SELECT ai_query('e', 'x)", {"ai_query"})
