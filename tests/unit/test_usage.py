"""The usage table: rows from call results, appended to a real Delta table, idempotent by app-transaction id."""

from __future__ import annotations

from deltalake import DeltaTable

from ai_query import CallResult
from ai_query.sinks import (
    INFERENCE_SCHEMA,
    USAGE_SCHEMA,
    AppTransaction,
    CommitResult,
    DeltaAppender,
    inference_record,
    usage_record,
)


def _result(i: int, status: str = "ok") -> CallResult:
    return CallResult(i, "sim", status, value="an answer" if status == "ok" else None, error=None if status == "ok" else "boom",
                      model="m-1", prompt_tokens=3 + i, completion_tokens=2, total_tokens=5 + i, request_id=f"r{i}", cost_usd=0.001)


def test_usage_rows_append_once_per_transaction(tmp_path):
    table = DeltaAppender(str(tmp_path / "usage"))
    records = [usage_record(_result(i), request="hello", source="batch:job") for i in range(3)]
    assert table.append(records, txn=AppTransaction("job-1", 0)) is CommitResult.COMMITTED
    assert table.append(records, txn=AppTransaction("job-1", 0)) is CommitResult.ALREADY_COMMITTED  # a re-run of the chunk
    assert table.append(records[:1], txn=AppTransaction("job-1", 1)) is CommitResult.COMMITTED
    got = DeltaTable(str(tmp_path / "usage")).to_pyarrow_table()
    assert got.schema.names == USAGE_SCHEMA.names
    assert got.num_rows == 4
    assert sum(got.column("input_token_count").to_pylist()) == 3 + 4 + 5 + 3
    assert set(got.column("input_character_count").to_pylist()) == {5}
    assert set(got.column("output_character_count").to_pylist()) == {len("an answer")}
    assert table.committed_version("job-1") == 1 and table.committed_version("other") is None


def test_failed_rows_have_no_output_and_payloads_are_capped(tmp_path):
    rec = usage_record(_result(0, "error"), request=[{"role": "user", "content": "hey"}])
    assert rec["status_code"] is None and rec["output_character_count"] == 0 and rec["input_character_count"] == 3
    # a failed request's own HTTP status (a job's usage rows had NULL for every failed one); 200 when answered
    throttled = _result(0, "error")
    throttled.status_code = 429
    assert usage_record(throttled)["status_code"] == 429 and usage_record(_result(0))["status_code"] == 200
    payload = inference_record(_result(1), "é" * 10, max_payload_bytes=9)
    assert payload["request"] == "éééé" and payload["request_truncated"] and not payload["response_truncated"]
    table = DeltaAppender(str(tmp_path / "payloads"), INFERENCE_SCHEMA)
    assert table.read().num_rows == 0
    assert table.append([]) is CommitResult.NOTHING_TO_COMMIT and table.read().num_rows == 0
    assert table.append([payload]) is CommitResult.COMMITTED
    assert table.read().column("request").to_pylist() == ["éééé"]
