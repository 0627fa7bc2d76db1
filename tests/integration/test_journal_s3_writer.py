"""The response journal's writer on an object store (moto on 127.0.0.1): its thread, its errors."""

from __future__ import annotations

import threading
import time

import pytest

from ai_query import storage
from ai_query.batch import journal as journal_module
from ai_query.batch.journal import _RemoteWriter


def _writer_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "ai-query-journal" and t.is_alive())


def test_the_writer_thread_ends_when_idle_and_the_next_answer_starts_another(s3_server, monkeypatch):
    monkeypatch.setattr(journal_module, "REMOTE_IDLE_S", 0.3)
    bucket = s3_server.bucket()
    before = _writer_threads()
    writer = _RemoteWriter(f"s3://{bucket}/journal/run-1")
    assert _writer_threads() == before  # no answer yet: no thread
    writer.add('{"k": 1}\n')
    assert _writer_threads() == before + 1
    deadline = time.monotonic() + 10
    while _writer_threads() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _writer_threads() == before, "an idle writer kept its thread (one per run in a long-lived worker)"
    assert len(s3_server.keys(bucket, "journal/run-1/")) == 1  # written before the thread ended
    writer.add('{"k": 2}\n')
    writer.flush()
    assert len(s3_server.keys(bucket, "journal/run-1/")) == 2
    assert _writer_threads() in (before, before + 1)


def test_a_failed_write_names_the_journal_and_keeps_the_answers(s3_server):
    bucket = s3_server.bucket()
    missing = f"s3://no-such-bucket-{bucket}/journal/run-1"
    writer = _RemoteWriter(missing)
    writer._lines.extend(['{"k": 1}\n', '{"k": 2}\n'])  # queued, as add() does, without starting the thread
    with pytest.raises(OSError, match=r"could not write 2 answer\(s\) to s3://no-such-bucket-"):
        writer.flush()
    assert writer._lines == ['{"k": 1}\n', '{"k": 2}\n']  # kept for the next try
    writer.write_dir = f"s3://{bucket}/journal/run-1"  # the store is back (here: the right bucket)
    writer.flush()
    assert storage.read_bytes(storage.list_dir(writer.write_dir)[0]).decode().count("\n") == 2


def test_a_tasks_marker_is_put_by_the_writer_and_before_any_line_of_the_task(s3_server):
    from ai_query.batch.journal import ResponseJournal
    from ai_query.batch.results import CallResult

    bucket = s3_server.bucket()
    run = f"s3://{bucket}/journal/run-1"
    s3_server.start_recording()
    first = ResponseJournal(run).for_task("3.0", "7")  # asks whether the marker is there, does not wait for its put
    assert first._earlier is None  # a first attempt replays nothing
    first.record("k1", CallResult(index=0, endpoint="e", status="ok", value="a", prompt_tokens=1))
    first.flush()
    requests = [(r["method"], r["url"].split(bucket, 1)[1]) for r in s3_server.recorded(bucket)]
    assert requests[0] == ("HEAD", "/journal/run-1/tasks/3.0"), requests
    puts = [url for method, url in requests if method == "PUT"]
    assert puts[0] == "/journal/run-1/tasks/3.0" and len(puts) == 2 and "/part-" in puts[1], requests
    # another attempt of the task (a retried stage numbers it 0 again, in another worker) finds it
    again = ResponseJournal(run).for_task("3.0", "9")
    assert again._earlier is not None
    again.catch_up()
    assert again.lookup("k1") is not None


def test_a_marker_whose_put_failed_is_kept_with_the_lines_after_it(s3_server):
    bucket = s3_server.bucket()
    writer = _RemoteWriter(f"s3://no-such-bucket-{bucket}/journal/run-1")
    writer._markers.append(f"s3://no-such-bucket-{bucket}/journal/run-1/tasks/1.0")  # queued, as add_marker does
    writer._lines.append('{"k": 1}\n')
    with pytest.raises(OSError, match=r"could not write 1 answer\(s\)"):
        writer.flush()
    assert writer._markers and writer._lines == ['{"k": 1}\n']
    writer.write_dir = f"s3://{bucket}/journal/run-1"
    writer._markers = [f"{writer.write_dir}/tasks/1.0"]
    s3_server.start_recording()
    assert writer.flush() == 2
    puts = [r["url"].split(bucket, 1)[1] for r in s3_server.recorded(bucket) if r["method"] == "PUT"]
    assert len(puts) == 2 and puts[0] == "/journal/run-1/tasks/1.0" and "/part-" in puts[1], puts  # the marker first
    assert s3_server.keys(bucket, "journal/run-1/tasks/") == ["journal/run-1/tasks/1.0"]
