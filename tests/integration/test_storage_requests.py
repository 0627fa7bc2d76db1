"""What the storage seam costs on a real S3 server (moto on 127.0.0.1), counted request by request.

A job commits every chunk; on an object store every log read is a GET per commit file and every
small object a PUT (or a three-request multipart upload). These tests count the requests the
server records, so that a change which brings back whole-log reads or multipart uploads fails.
"""

from __future__ import annotations

import pyarrow as pa
from deltalake import DeltaTable, write_deltalake

from ai_query import storage
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
