"""Journal replay without Spark: answers a killed run received are placed at the re-run's rows
instead of being sent again; new answers are journaled as they arrive."""

from __future__ import annotations

import pytest

from ai_query import CallResult
from ai_query.batch import ResponseJournal, read_entries, replay, request_key
from ai_query.batch.pipeline import start_rows

from .fakes import echo_client


def test_replay_places_journaled_answers_at_their_rows_and_leaves_the_rest_to_send(tmp_path):
    killed = ResponseJournal(str(tmp_path / "run-1"))
    killed.record(request_key("ep", "b"), CallResult(7, "ep", "ok", value="B", total_tokens=5, request_id="r-b"))
    rerun = ResponseJournal(None, [str(tmp_path / "run-1")])
    keys = {0: request_key("ep", "a"), 3: request_key("ep", "b"), 4: request_key("ep", "c")}
    answered, to_send = replay(rerun, [0, 3, 4], keys)
    assert to_send == [0, 4]
    [b] = answered
    assert (b.index, b.value, b.total_tokens, b.request_id) == (3, "B", 5, "r-b")  # at the re-run's row


@pytest.fixture
def counting_client(monkeypatch):
    with echo_client(monkeypatch) as (client, prompts):
        yield client, prompts


def test_a_rerun_sends_only_what_the_killed_run_did_not_receive(tmp_path, counting_client):
    client, prompts = counting_client
    params = [{"max_tokens": 8}] * 2
    first = ResponseJournal(str(tmp_path / "run-1"))
    killed = start_rows(client, None, ["fake"] * 2, ["a", "b"], params, [None] * 2, journal=first).wait()
    assert sorted(prompts) == ["a", "b"]
    [path] = (tmp_path / "run-1").glob("*.jsonl")
    assert set(read_entries(path)) == {request_key("fake", r, {"max_tokens": 8}).digest for r in ("a", "b")}

    prompts.clear()
    second = ResponseJournal(str(tmp_path / "run-2"), [str(tmp_path / "run-1")])
    rerun = start_rows(client, None, ["fake"] * 3, ["b", "c", "a"], params + params[:1], [None] * 3, journal=second).wait()
    assert prompts == ["c"]  # "a" and "b" come from the journal
    assert [r.value for r in rerun] == ["echo: b", "echo: c", "echo: a"] and [r.index for r in rerun] == [0, 1, 2]
    assert (rerun[0].request_id, rerun[0].total_tokens) == (killed[1].request_id, killed[1].total_tokens)
    assert not rerun[0].deduplicated  # a replayed answer is the row's own (its tokens count once)
    [path] = (tmp_path / "run-2").glob("*.jsonl")
    assert list(read_entries(path)) == [request_key("fake", "c", {"max_tokens": 8}).digest]  # only what was sent


def test_other_parameters_are_another_request(tmp_path, counting_client):
    client, prompts = counting_client
    start_rows(client, None, ["fake"], ["a"], [{"max_tokens": 8}], [None], journal=ResponseJournal(str(tmp_path / "run-1"))).wait()
    prompts.clear()
    rerun = ResponseJournal(None, [str(tmp_path / "run-1")])
    start_rows(client, None, ["fake"], ["a"], [{"max_tokens": 9}], [None], journal=rerun).wait()
    assert prompts == ["a"]
