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
