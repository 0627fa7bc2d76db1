"""A job's chunk commits on their own thread: in order, one at a time, counted once committed."""

from __future__ import annotations

import logging
import threading
import time

import pyarrow as pa
import pytest

from batch_runner._job_state import JobRunReport
from batch_runner._job_input import with_committed
from batch_runner._jobs import _ChunkCommits


def _chunk(n: int, cost: float = 0.5) -> tuple[pa.Table, list[dict]]:
    result = pa.table({"aiq_status": ["ok"] * n})
    usage = [{"endpoint_name": "e", "input_token_count": 3, "output_token_count": 2, "attempts": 1, "status_code": 200,
              "cost_usd": cost / n} for _ in range(n)]
    return result, usage


def _report() -> JobRunReport:
    return JobRunReport("job", "out", "usage", "run", cost_usd=0.0)


def test_commits_run_in_chunk_order_one_at_a_time_and_overlap_only_from_the_second():
    report, events = _report(), []
    gate = threading.Event()
    commits = _ChunkCommits(report)

    def commit(k: int):
        def run() -> None:
            events.append(("start", k))
            if k == 1:
                time.sleep(0.2)  # a slow first commit: submit must still return only after it
            if k == 2:
                assert gate.wait(10)
            events.append(("end", k))
        return run

    commits.submit(commit(1), *_chunk(4))
    assert events == [("start", 1), ("end", 1)] and report.chunks == 1  # the first chunk commits before the second is asked
    commits.submit(commit(2), *_chunk(4))  # returns while chunk 2 commits
    projected = commits.projected()
    assert report.chunks == 1 and projected.chunks == 2 and projected.rows == 8  # what is committing is counted for the budget
    assert projected.cost_usd == pytest.approx(1.0) and report.cost_usd == pytest.approx(0.5)
    gate.set()
    commits.submit(commit(3), *_chunk(4))  # waits for chunk 2 first
    commits.close()
    assert events == [("start", 1), ("end", 1), ("start", 2), ("end", 2), ("start", 3), ("end", 3)]
    assert report.chunks == 3 and report.rows == 12 and report.total_tokens == 60
    assert report.per_endpoint["e"]["rows"] == 12 and commits.projected() is report


def test_a_failed_commit_is_raised_at_the_next_submit_and_is_not_counted():
    report = _report()
    commits = _ChunkCommits(report)
    commits.submit(lambda: None, *_chunk(2))

    def refuse() -> None:
        raise OSError("the store refused the commit")

    commits.submit(refuse, *_chunk(2))
    ran = []
    with pytest.raises(OSError, match="refused"):
        commits.submit(lambda: ran.append(3), *_chunk(2))
    assert ran == [] and report.chunks == 1 and report.rows == 2  # chunk 3 never committed; chunk 2 not counted
    assert commits.projected() is report
    commits.close()


def test_only_committed_chunks_keys_are_kept_for_the_runs_end():
    commits = _ChunkCommits(_report(), ["id"])
    commits.submit(lambda: None, pa.table({"id": [1, 2], "aiq_status": ["ok", "error"], "answer": ["a", None]}), [])

    def refuse() -> None:
        raise OSError("the store refused the commit")

    commits.submit(refuse, pa.table({"id": [3], "aiq_status": ["ok"], "answer": ["c"]}), [])
    with pytest.raises(OSError):
        commits.wait()
    commits.close()
    assert [t.to_pydict() for t in commits.committed_keys] == [{"id": [1, 2], "aiq_status": ["ok", "error"]}]


def _states(ids, ok, id_type=pa.int64()) -> pa.Table:
    return pa.table({"id": pa.array(ids, id_type), "ok": pa.array(ok, pa.bool_())})


def _as_dict(states: pa.Table) -> dict:
    return dict(zip(states.column("id").to_pylist(), states.column("ok").to_pylist()))


def test_the_runs_end_states_are_the_start_states_with_what_it_committed():
    start = _states([1, 2, 3], [True, False, False], pa.int32())  # as the output stores them (int32)
    chunks = [pa.table({"id": [2, 4], "aiq_status": ["ok", "error"]}),  # 2: a failed key retried, now ok
              pa.table({"id": [3, 5], "aiq_status": ["error", "ok"]})]  # 3: retried, failed again
    assert _as_dict(with_committed(start, chunks, ["id"])) == {1: True, 2: True, 3: False, 4: False, 5: True}
    # an output that did not exist: key_states' empty table (string columns) takes the chunks' types
    empty = pa.table({"id": pa.array([], pa.string()), "ok": pa.array([], pa.bool_())})
    assert _as_dict(with_committed(empty, chunks, ["id"])) == {2: True, 4: False, 3: False, 5: True}
    assert with_committed(start, [], ["id"]) is start
    # append mode keeps every row of a key: ok when any of them is
    appended = with_committed(_states([7], [True]), [pa.table({"id": [7, 8], "aiq_status": ["error", "error"]})], ["id"])
    assert _as_dict(appended) == {7: True, 8: False}


def test_a_failed_first_commit_stops_before_the_next_chunk_is_asked():
    commits = _ChunkCommits(_report())

    def refuse() -> None:
        raise ValueError("schema mismatch")

    with pytest.raises(ValueError, match="schema"):
        commits.submit(refuse, *_chunk(2))
    commits.close()


def test_close_after_an_error_waits_for_the_commit_and_logs_its_failure(caplog):
    commits = _ChunkCommits(_report())
    commits.submit(lambda: None, *_chunk(1))

    def refuse() -> None:
        raise OSError("second error")

    commits.submit(refuse, *_chunk(1))
    with caplog.at_level(logging.ERROR):
        commits.close()  # the run is failing already (an exception on its way): logged, not raised
    assert "second error" in caplog.text
