"""The response journal: answers written as they arrive, replayed by a later run, torn lines skipped."""

from __future__ import annotations

from ai_query.batch import CallResult, ResponseJournal, read_entries, request_key


def test_answers_are_replayed_by_a_later_run_and_errors_are_not(tmp_path):
    run1 = ResponseJournal(str(tmp_path / "run-1"))
    ok = CallResult(3, "ep", "ok", value="hi", model="m", prompt_tokens=4, completion_tokens=2, total_tokens=6, request_id="r1", attempts=1)
    key = request_key("ep", "hello", {"max_tokens": 8}, None)
    run1.record(key, ok)
    run1.record(request_key("ep", "bad", None, None), CallResult(4, "ep", "error", error="HTTP 400"))
    assert key != request_key("ep", "hello", {"max_tokens": 9}, None)

    run2 = ResponseJournal.from_property(ResponseJournal.property_value(str(tmp_path / "run-2"), [str(tmp_path / "run-1")]))
    got = run2.lookup(key)
    assert got is not None and (got.value, got.prompt_tokens, got.request_id, got.completed_at) == ("hi", 4, "r1", ok.completed_at)
    assert run2.lookup(request_key("ep", "bad", None, None)) is None  # a failed request is asked again
    assert ResponseJournal.from_property(None) is None


def test_a_line_cut_by_a_kill_is_skipped(tmp_path):
    journal = ResponseJournal(str(tmp_path / "run"))
    journal.record("k1", CallResult(0, "ep", "ok", value="a"))
    (path,) = (tmp_path / "run").glob("*.jsonl")
    with path.open("a") as fh:
        fh.write('{"key": "k2", "result": {"index"')  # the process died mid-write
    assert list(read_entries(path)) == ["k1"]


def test_a_retried_attempt_replays_earlier_attempts_of_its_own_task_only(tmp_path):
    run = str(tmp_path / "run-1")
    first = ResponseJournal(run).for_task("7.0", "100", retried=False)  # attempt 0 of task 0, in a worker that dies
    other = ResponseJournal(run).for_task("7.1", "101", retried=False)  # task 1 of the same stage
    first.record("k1", CallResult(0, "ep", "ok", value="a", request_id="r1"))
    other.record("k2", CallResult(0, "ep", "ok", value="b", request_id="r2"))
    (path,) = [p for p in (tmp_path / "run-1").glob("*.jsonl") if "r1" in p.read_text()]
    with path.open("a") as fh:
        fh.write('{"key": "k3", "result": {"index"')  # the worker died mid-write

    retry = ResponseJournal(run, ()).for_task("7.0", "102")  # attempt 0 of a retried stage: the marker tells
    assert first.lookup("k1") is None  # a first attempt replays nothing of its own run
    retry.catch_up()
    assert retry.lookup("k1").request_id == "r1"
    assert retry.lookup("k2") is None  # task 1 commits that answer itself: one answer, one row
    assert retry.lookup("k3") is None
    retry_of_task_1 = ResponseJournal(run).for_task("7.1", "105")
    retry_of_task_1.catch_up()
    assert retry_of_task_1.lookup("k2").request_id == "r2" and retry_of_task_1.lookup("k1") is None
    twin = ResponseJournal(run).for_task("7.0", "103", retried=False)  # an attempt of task 0 still running
    twin.record("k4", CallResult(0, "ep", "ok", value="c", request_id="r4"))
    assert retry.lookup("k4") is None
    retry.catch_up()
    assert retry.lookup("k4").request_id == "r4"
    journal = ResponseJournal(run)
    assert journal.for_task("7.2", "104") is journal.for_task("7.2", "104")
