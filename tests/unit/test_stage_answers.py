"""Rows of later batches (Arrow batches of a Spark stage) share the answers of identical requests sent earlier in the stage,
also while those are still in flight; a batch that fails releases what it marked as in flight."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from ai_query import AIQueryClient, UnknownEndpointError
from ai_query.batch import StageAnswers, request_key
from ai_query.batch.pipeline import start_rows
from ai_query.transport import MockTransport, Request, Response

from .fakes import chat_body, echo_registry, json_response


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("AIQ_SECRET_TEST_KEY", "sk-test")


class SlowTransport(MockTransport):
    """Answers ``echo: <prompt>`` once ``release`` is set, counting the requests."""

    def __init__(self) -> None:
        super().__init__(self.answer)
        self.release = threading.Event()
        self.prompts: list[str] = []

    async def answer(self, request: Request) -> Response:
        prompt = json.loads(request.content)["messages"][0]["content"]
        self.prompts.append(prompt)
        while not self.release.is_set():
            await asyncio.sleep(0.005)
        return json_response(200, chat_body(f"echo: {prompt}"))


def test_a_later_batch_shares_an_identical_request_still_in_flight():
    transport = SlowTransport()
    client = AIQueryClient(echo_registry(), transport=transport)
    answers = StageAnswers()
    try:
        first = start_rows(client, None, ["fake"] * 2, ["a", "b"], [None] * 2, [None] * 2, answers=answers)
        second = start_rows(client, None, ["fake"] * 3, ["b", "c", "a"], [None] * 3, [None] * 3, answers=answers)
        transport.release.set()
        one, two = first.wait(), second.wait()
        assert sorted(transport.prompts) == ["a", "b", "c"]  # "a" and "b" once, though still in flight
        assert [r.value for r in two] == ["echo: b", "echo: c", "echo: a"] and [r.index for r in two] == [0, 1, 2]
        assert [r.deduplicated for r in two] == [True, False, True] and two[0].total_tokens == 0
        assert all(r.ok and not r.deduplicated for r in one)
    finally:
        client.close()


def test_a_batch_that_fails_to_start_releases_its_requests():
    transport = SlowTransport()
    transport.release.set()
    client = AIQueryClient(echo_registry(), transport=transport)
    answers = StageAnswers()
    try:
        # the first group marks "a" as in flight, the second names an endpoint that does not exist
        with pytest.raises(UnknownEndpointError):
            start_rows(client, None, ["fake", "nope"], ["a", "x"], [None] * 2, [None] * 2, answers=answers)
        assert answers.get(request_key("fake", "a")) is None  # not left marked as in flight
        # a retried task of the stage sends "a" itself instead of waiting for an answer that never comes
        [again] = start_rows(client, None, ["fake"], ["a"], [None], [None], answers=answers).wait()
        assert again.ok and not again.deduplicated
    finally:
        client.close()


def test_a_replayed_answer_is_shared_by_later_batches(tmp_path):
    from ai_query.batch import ResponseJournal

    transport = SlowTransport()
    transport.release.set()
    client = AIQueryClient(echo_registry(), transport=transport)
    killed = ResponseJournal(str(tmp_path / "run-1"))
    try:  # the killed run got "a" (one request, 8 tokens) before it died
        [answer] = start_rows(client, None, ["fake"], ["a"], [None], [None], journal=killed, answers=StageAnswers()).wait()
        assert transport.prompts == ["a"]
        rerun = ResponseJournal(None, [str(tmp_path / "run-1")])
        answers = StageAnswers()
        first = start_rows(client, None, ["fake"], ["a"], [None], [None], journal=rerun, answers=answers).wait()
        later = start_rows(client, None, ["fake", "fake"], ["a", "b"], [None] * 2, [None] * 2, journal=rerun, answers=answers).wait()
        assert transport.prompts == ["a", "b"]  # "a" never again
        assert first[0].total_tokens == answer.total_tokens > 0
        assert later[0].deduplicated and later[0].total_tokens == 0 and later[0].value == answer.value  # not counted twice
    finally:
        client.close()
