"""What the storage seam costs on a real S3 server (moto on 127.0.0.1), counted request by request.

A job commits every chunk; on an object store every log read is a GET per commit file and every
small object a PUT (or a three-request multipart upload). These tests count the requests the
server records, so that a change which brings back whole-log reads or multipart uploads fails.
"""

from __future__ import annotations

import pyarrow as pa
import pytest
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake

from ai_query import DeltaCommitError, storage
from ai_query.sinks import AppTransaction, DeltaCommitter


def _log_gets(requests: list[dict]) -> int:
    return sum(1 for r in requests if r["method"] == "GET" and "/_delta_log/0" in r["url"])


def test_a_small_object_is_one_put_not_a_multipart_upload(s3_server):
    bucket = s3_server.bucket()
    s3_server.start_recording()
    storage.write_bytes(f"s3://{bucket}/state/journal/part-1.jsonl", b'{"a": 1}\n')
    requests = s3_server.recorded(bucket)
    assert [r["method"] for r in requests] == ["PUT"], requests
    assert storage.read_bytes(f"s3://{bucket}/state/journal/part-1.jsonl") == b'{"a": 1}\n'


def test_an_exclusive_create_is_a_head_and_a_put(s3_server):
    """A job's run lock (and a journal marker's check) asks whether the object is there: asking
    "is it a directory" as well would add a LIST to each."""
    bucket = s3_server.bucket()
    lock = f"s3://{bucket}/out.aiq/run.lock"
    s3_server.start_recording()
    assert storage.create_exclusive(lock, b'{"run_id": "r1"}')
    assert not storage.create_exclusive(lock, b'{"run_id": "r2"}')  # a second run finds it
    requests = s3_server.recorded(bucket)
    assert [r["method"] for r in requests] == ["HEAD", "PUT", "HEAD"], requests
    assert storage.read_bytes(lock) == b'{"run_id": "r1"}'


def test_inside_reuse_delta_tables_each_commit_is_read_once(s3_server):
    bucket = s3_server.bucket()
    path = f"s3://{bucket}/usage"
    for v in range(1, 9):  # eight earlier commits of the job
        DeltaCommitter(path).append(pa.table({"x": [v]}), AppTransaction("job", v))
    with storage.reuse_delta_tables():
        committer = DeltaCommitter(path)
        assert committer.committed_version("job") == 8  # the first read: the whole log, once
        s3_server.start_recording()
        for v in range(9, 13):  # four chunks: check, append
            assert not committer.is_committed(AppTransaction("job", v))
            committer.append(pa.table({"x": [v]}), AppTransaction("job", v))
        assert committer.committed_version("job") == 12
        requests = s3_server.recorded(bucket)
    # each new commit is read a bounded number of times (the write's own check, the next update),
    # never the eight before it again: a whole-log read per check would be >= 4 * 9 GETs
    assert _log_gets(requests) <= 4 * 4, _log_gets(requests)
    assert DeltaTable(path).transaction_version("job") == 12


def test_a_kept_handle_sees_commits_made_by_another_writer(s3_server):
    bucket = s3_server.bucket()
    path = f"s3://{bucket}/out"
    DeltaCommitter(path).append(pa.table({"x": [1]}), AppTransaction("job", 1))
    with storage.reuse_delta_tables():
        committer = DeltaCommitter(path)
        assert committer.committed_version("job") == 1 and committer.committed_version("other") is None
        # another process commits (its own app id, then ours at a later version)
        write_deltalake(path, pa.table({"x": [2]}), mode="append")
        DeltaCommitter(path).append(pa.table({"x": [3]}), AppTransaction("other", 5))
        DeltaCommitter(path).append(pa.table({"x": [4]}), AppTransaction("job", 7))
        assert committer.committed_version("other") == 5
        assert committer.committed_version("job") == 7
        assert committer.is_committed(AppTransaction("job", 6))
        assert sorted(storage.delta_table(path).to_pyarrow_table().column("x").to_pylist()) == [1, 2, 3, 4]
    # outside the block: a fresh open each time, same answers
    assert DeltaCommitter(path).committed_version("job") == 7


def test_handles_are_kept_per_thread_block_and_dropped_after_it(tmp_path):
    path = str(tmp_path / "t")
    write_deltalake(path, pa.table({"x": [1]}))
    with storage.reuse_delta_tables():
        first = storage.delta_table(path)
        assert storage.delta_table(path) is first
        with storage.reuse_delta_tables():  # nested: the same handles
            assert storage.delta_table(path) is first
        assert storage.delta_table(path, version=0) is not first  # a pinned version: a handle of its own
    assert storage.delta_table(path) is not first


def _whole_log_lists(requests: list[dict]) -> int:
    return sum(1 for r in requests if r["method"] == "GET" and "list-type=2" in r["url"] and "_delta_log" in r["url"]
               and "start-after" not in r["url"])


def test_a_job_commit_through_a_kept_handle_reads_only_what_it_writes(s3_server):
    """A job's chunk commit (a version the run took: ``check_committed=False``) goes through the
    kept handle: no read of the earlier commits, no whole-log listing (delta-rs's expired-log
    cleanup lists the log after every commit; it runs with the checkpoints only)."""
    bucket = s3_server.bucket()
    path = f"s3://{bucket}/usage"
    for v in range(1, 9):
        DeltaCommitter(path).append(pa.table({"x": [v]}), AppTransaction("job", v))
    with storage.reuse_delta_tables():
        committer = DeltaCommitter(path)
        committer.append(pa.table({"x": [9]}), AppTransaction("job", 9), check_committed=False)  # opens the handle
        s3_server.start_recording()
        for v in range(10, 14):
            committer.append(pa.table({"x": [v]}), AppTransaction("job", v), check_committed=False)
            committer.merge(pa.table({"x": [v]}), ["x"], AppTransaction("job2", v), check_committed=False)
        requests = s3_server.recorded(bucket)
    assert _whole_log_lists(requests) == 0, [r["url"] for r in requests if "list-type" in r["url"]]
    # delta-rs reads back what a commit wrote (at most two GETs of new commit files each): never the nine before
    assert _log_gets(requests) <= 2 * 8, _log_gets(requests)
    assert sorted(DeltaTable(path).to_pyarrow_table().column("x").to_pylist()) == list(range(1, 14))
    assert DeltaTable(path).transaction_version("job") == 13 and DeltaTable(path).transaction_version("job2") == 13


def test_checkpoints_and_log_cleanup_still_happen_through_a_kept_handle(tmp_path):
    path = str(tmp_path / "t")
    write_deltalake(path, pa.table({"x": [0]}), configuration={
        "delta.checkpointInterval": "4", "delta.logRetentionDuration": "interval 0 seconds"})
    with storage.reuse_delta_tables():
        committer = DeltaCommitter(path)
        for v in range(1, 10):
            committer.append(pa.table({"x": [v]}), AppTransaction("job", v), check_committed=False)
    log = sorted(p.name for p in (tmp_path / "t" / "_delta_log").iterdir())
    checkpoints = [name for name in log if name.endswith(".checkpoint.parquet")]
    assert checkpoints and int(checkpoints[-1][:20]) >= 6, log  # every 4 versions, the latest at 6 or later
    # the commits before the latest checkpoint were cleaned up (retention 0 s): as many LISTs as checkpoints
    assert "00000000000000000001.json" not in log and "00000000000000000005.json" not in log, log
    assert "00000000000000000009.json" in log
    assert DeltaTable(path).to_pyarrow_table().num_rows == 10 and DeltaTable(path).transaction_version("job") == 9


def test_a_fresh_commit_racing_another_writer_of_its_transaction_is_refused(s3_server):
    """A run is its job's one writer, so its chunk commits skip the "already committed" check;
    should another writer commit the same app id meanwhile, delta-rs's conflict check refuses
    ours (the commit fails, naming the transaction) rather than recording the version twice."""
    bucket = s3_server.bucket()
    path = f"s3://{bucket}/out"
    DeltaCommitter(path).append(pa.table({"x": [1]}), AppTransaction("job", 1))
    with storage.reuse_delta_tables():
        committer = DeltaCommitter(path)
        committer.append(pa.table({"x": [2]}), AppTransaction("job", 2), check_committed=False)
        # another writer (no kept handle) commits the same app id
        write_deltalake(path, pa.table({"x": [3]}), mode="append", storage_options=storage.delta_options(path),
                        commit_properties=CommitProperties(app_transactions=[Transaction("job", 3)]))
        with pytest.raises(DeltaCommitError, match=r"app transaction 'job' version 3"):
            committer.append(pa.table({"x": [33]}), AppTransaction("job", 3), check_committed=False)
    assert sorted(DeltaTable(path).to_pyarrow_table().column("x").to_pylist()) == [1, 2, 3]
