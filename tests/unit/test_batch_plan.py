"""The plan stage without Spark: request keys, groups, dedup within a batch and against the
stage's answers; and dedup end to end through ``start_rows`` on a mock transport."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json

import pytest

from ai_query import CallResult
from ai_query.batch import StageAnswers, group_rows, plan_group, prompt_text_of, request_key
from ai_query.batch.pipeline import start_rows

from .fakes import echo_client


def test_a_request_key_is_canonical_and_tells_different_requests_apart():
    assert request_key("ep", "hi", {"a": 1, "b": 2}, None) == request_key("ep", "hi", {"b": 2, "a": 1}, None)
    assert request_key("ep", "hi", {"max_tokens": 8}) != request_key("ep", "hi", {"max_tokens": 9})
    assert request_key("ep", "hi") != request_key("other", "hi")
    assert request_key("ep", "hi", None, {"type": "json_object"}) != request_key("ep", "hi")
    chat = [{"role": "user", "content": "hi"}]
    # a string that reads like the JSON of a chat is not that chat
    assert request_key("ep", json.dumps(chat)) != request_key("ep", chat)
    assert prompt_text_of(chat) == prompt_text_of("hi") == "hi"


def test_the_journal_digest_is_the_hash_earlier_versions_wrote():
    # The journal key before the move (ai_query/_journal.py): sha256 of this JSON, 32 hex digits.
    # Pinned so that the journal of a run killed before an upgrade replays after it.
    def old_key(endpoint, request, params, response_format):
        text = json.dumps([endpoint, request, params, response_format], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    assert request_key("ep", "hello", {"max_tokens": 8}).digest == old_key("ep", "hello", {"max_tokens": 8}, None) \
        == "35a40ae680bdb24cf2ba953a5c68d1ee"
    chat = [{"role": "user", "content": [{"type": "text", "text": "caf\u00e9"}]}]
    params, fmt = {"temperature": 0.0, "max_tokens": 4}, {"type": "json_object"}
    assert request_key("ep", chat, params, fmt).digest == old_key("ep", chat, params, fmt)


def test_rows_are_grouped_by_endpoint_parameters_and_format_in_order_of_first_appearance():
    endpoints = ["a", "a", "b", "a", None, "a"]
    params = [{"t": 0}, {"t": 0}, {"t": 0}, {"t": 1}, None, {"t": 0}]
    groups = group_rows(endpoints, ["r0", "r1", "r2", "r3", "r4", "r5"], params, [None] * 6)
    assert [(g.endpoint, g.params, g.rows) for g in groups] == [
        ("a", {"t": 0}, [0, 1, 5]), ("b", {"t": 0}, [2]), ("a", {"t": 1}, [3]), (None, None, [4])]
    assert groups[0].keys == [request_key("a", r, {"t": 0}) for r in ("r0", "r1", "r5")]
    assert groups[3].keys == []  # a NULL endpoint: nothing is sent, nothing to key


def test_identical_requests_are_sent_once_and_null_requests_never_shared():
    requests = ["x", "y", "x", None, None, "x"]
    [group] = group_rows(["ep"] * 6, requests, [None] * 6, [None] * 6)
    plan = plan_group(group, requests, StageAnswers(), deduplicate=True)
    assert plan.send == [0, 1, 3, 4] and plan.copies == [(2, 0), (5, 0)]
    assert plan.shareable == {0, 1} and plan.keys[1] == request_key("ep", "y")
    every_row = plan_group(group, requests, StageAnswers(), deduplicate=False)  # sampling anew
    assert every_row.send == list(range(6)) and every_row.copies == [] and every_row.shareable == set()


def test_requests_of_an_earlier_batch_share_its_answer_settled_or_in_flight():
    answers = StageAnswers()
    done = answers.reserve(request_key("ep", "x"))
    answers.settle(request_key("ep", "x"), done, CallResult(0, "ep", "ok", value="X"))
    in_flight = answers.reserve(request_key("ep", "y"))
    requests = ["x", "y", "z", "x"]
    [group] = group_rows(["ep"] * 4, requests, [None] * 4, [None] * 4)
    plan = plan_group(group, requests, answers, deduplicate=True)
    assert plan.send == [2] and plan.copies == [(3, 0)]
    [(row_x, hit_x), (row_y, hit_y)] = plan.cached
    assert (row_x, hit_x.value) == (0, "X") and (row_y, hit_y) == (1, in_flight)
    assert isinstance(hit_y, concurrent.futures.Future)


@pytest.fixture
def counting_client(monkeypatch):
    with echo_client(monkeypatch) as (client, prompts):
        yield client, prompts


def test_start_rows_sends_each_request_once_and_every_row_gets_its_answer(counting_client):
    client, prompts = counting_client
    requests = ["a", "b", "a", None, "a"]
    results = start_rows(client, None, ["fake", "fake", "fake", "fake", None], requests, [None] * 5, [None] * 5).wait()
    assert sorted(prompts) == ["a", "b"]
    assert [r.index for r in results] == [0, 1, 2, 3, 4]
    assert [r.value for r in results[:3]] == ["echo: a", "echo: b", "echo: a"]
    assert [r.deduplicated for r in results] == [False, False, True, False, False]
    assert results[0].total_tokens == 8 and results[2].total_tokens == 0 and results[2].attempts == 0  # billed once
    assert "NULL" in results[3].error and results[4].error == "the endpoint argument is NULL"
