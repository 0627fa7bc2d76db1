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
