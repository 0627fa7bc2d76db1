"""The serving endpoint's usage appends are Delta app transactions: a retried batch lands once."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import datetime, timezone

from ai_query import CallResult
from ai_query.sinks import USAGE_SCHEMA, DeltaAppender
from ai_query.serving._tables import ServingTables


class LostReplyAppender(DeltaAppender):
    """Commits its first append and then fails, as when the store's reply is lost; then behaves."""

    failures_left = 1

    def append(self, records, **kwargs):
        committed = super().append(records, **kwargs)
        if self.failures_left:
            self.failures_left -= 1
            raise OSError("connection reset after the commit")
        return committed


class DownAppender(DeltaAppender):
    """Fails ``failures_left`` times before committing anything."""

    failures_left = 2

    def append(self, records, **kwargs):
        if self.failures_left:
            self.failures_left -= 1
            raise OSError("store unreachable")
        return super().append(records, **kwargs)


def _result(i: int) -> CallResult:
    return CallResult(i, "sim-chat", "ok", value=f"answer {i}", model="m", prompt_tokens=3, completion_tokens=2, total_tokens=5,
                      request_id=f"req-{i}", completed_at=datetime.now(timezone.utc))


def _record(tables: ServingTables, i: int) -> None:
    tables.record(_result(i), f"question {i}", requester="alice", client_request_id=f"c-{i}", status_code=200, streaming=False)


def test_a_batch_whose_commit_landed_before_the_call_failed_is_not_appended_again(tmp_path):
    appender = LostReplyAppender(str(tmp_path / "usage"), USAGE_SCHEMA)
    tables = ServingTables(None, appenders=(appender, None))

    async def run():
        for i in range(3):
            _record(tables, i)
        await tables.flush()  # commits, then "fails": the batch is kept
        assert tables.pending_rows == 3
        _record(tables, 3)
        await tables.close()  # retries the batch (already committed: skipped), then appends row 3

    asyncio.run(run())
    rows = appender.read().to_pylist()
    assert sorted(r["databricks_request_id"] for r in rows) == ["req-0", "req-1", "req-2", "req-3"]
    assert sum(r["input_token_count"] + r["output_token_count"] for r in rows) == 20 and tables.pending_rows == 0


def test_rows_wait_out_an_unreachable_store_and_land_once(tmp_path):
    appender = DownAppender(str(tmp_path / "usage"), USAGE_SCHEMA)
    tables = ServingTables(None, appenders=(appender, None))

    async def run():
        _record(tables, 0)
        await tables.flush()  # fails: kept
        _record(tables, 1)
        await tables.flush()  # fails again: both batches kept, in order
        assert tables.pending_rows == 2
        await tables.close()

    asyncio.run(run())
    rows = appender.read().to_pylist()
    assert sorted(r["databricks_request_id"] for r in rows) == ["req-0", "req-1"]
    assert appender.committed_version(tables.app_id) == 1  # two transactions, versions 0 and 1, in that order


class SlowAppender(DeltaAppender):
    """Takes a while to commit (a remote store), telling when an append has begun."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.started = threading.Event()

    def append(self, records, **kwargs):
        self.started.set()
        time.sleep(0.3)
        return super().append(records, **kwargs)


def test_shutdown_during_a_background_append_does_not_append_the_batch_twice(tmp_path):
    appender = SlowAppender(str(tmp_path / "usage"), USAGE_SCHEMA)
    tables = ServingTables(None, flush_s=0.01, appenders=(appender, None))

    async def run():
        tables.start()
        for i in range(3):
            _record(tables, i)
        assert await asyncio.to_thread(appender.started.wait, 10)  # the background flush is mid-append
        await tables.close()

    asyncio.run(run())
    rows = appender.read().to_pylist()
    assert sorted(r["databricks_request_id"] for r in rows) == ["req-0", "req-1", "req-2"]
