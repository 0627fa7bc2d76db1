"""A row at fault is that row's error and costs no request (``batch.request.row_fault``, the
exchange, the pipeline's per-group parameters)."""

from __future__ import annotations

import pytest

from ai_query.batch.pipeline import start_rows
from ai_query.batch.request import row_fault

from .fakes import echo_client


@pytest.mark.parametrize("value, limit, fragments", [
    pytest.param(None, None, ("the request is NULL",), id="null"),
    pytest.param("", None, ("an empty string", "nothing to send", "WHERE trim(col) <> ''"), id="empty"),
    pytest.param(" \n\t", None, ("only whitespace", "' \\n\\t'"), id="blank"),
    pytest.param("ok \udcc3(", None, ("not valid UTF-8", "byte 0xC3 at offset 3", "make_valid_utf8(col)"), id="surrogateescape"),
    pytest.param("\ud800", None, ("not valid UTF-8", "byte 0xED"), id="lone_surrogate"),
    pytest.param([], None, ("an empty list of messages",), id="no_messages"),
    pytest.param("x" * 11, 10, ("11 characters", "max_prompt_chars (10)", "left(col, N)"), id="over_max_prompt_chars"),
    pytest.param([{"role": "user", "content": "x" * 11}], 10, ("11 characters",), id="messages_over_max_prompt_chars"),
])
def test_row_fault_names_the_value_and_the_fix(value, limit, fragments):
    message = row_fault(value, limit)
    assert message is not None
    assert all(f in message for f in fragments), message


@pytest.mark.parametrize("value, limit", [("x" * 10, 10), ("é ü 😀", None), ([{"role": "user", "content": ""}], None), ("a", None)])
def test_row_fault_lets_good_rows_through(value, limit):
    assert row_fault(value, limit) is None


def test_faulty_rows_are_errors_and_only_the_good_rows_are_sent(monkeypatch):
    with echo_client(monkeypatch) as (client, prompts):
        requests = ["one", "", "bad \udcff", "two", "three"]
        params = [None, None, None, {"max_tokens": -1}, {"max_tokens": 5}]
        results = start_rows(client, None, ["fake"] * 5, requests, params, [None] * 5).wait()
    assert [r.ok for r in results] == [True, False, False, False, True]
    assert "empty string" in results[1].error and "not valid UTF-8" in results[2].error
    assert "modelParameters.max_tokens must be between 1 and 1000000, got -1; not sent" in results[3].error
    assert all(r.status_code == 400 for r in results[1:4])
    assert sorted(prompts) == ["one", "three"]
