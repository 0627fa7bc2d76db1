"""The endpoint-usage table: one row per served request, in the shape of Databricks'
``system.serving.endpoint_usage`` (plus endpoint name, latency, attempts and cost), written to
Delta by batch jobs and by the serving endpoint alike, so one table answers "what did we spend".

Writers append through the one Delta committer (``_delta_commit``) with an optional app
transaction: a chunk of usage committed twice (a job killed after the commit and re-run, a serving
flush whose reply was lost) is skipped the second time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Sequence

import pyarrow as pa

from ._delta_commit import AppTransaction, CommitResult, DeltaCommitter
from .. import storage

USAGE_SCHEMA = pa.schema(
    [
        pa.field("request_time", pa.timestamp("us", tz="UTC")),
        pa.field("endpoint_name", pa.string()),
        pa.field("served_entity_id", pa.string()),
        pa.field("requester", pa.string()),
        pa.field("usage_context", pa.map_(pa.string(), pa.string())),
        pa.field("status_code", pa.int32()),
        pa.field("databricks_request_id", pa.string()),
        pa.field("client_request_id", pa.string()),
        pa.field("input_token_count", pa.int64()),
        pa.field("output_token_count", pa.int64()),
        pa.field("usage_estimated", pa.bool_()),
        pa.field("input_character_count", pa.int64()),
        pa.field("output_character_count", pa.int64()),
        pa.field("request_streaming", pa.bool_()),
        pa.field("latency_ms", pa.float64()),
        pa.field("attempts", pa.int32()),
        pa.field("cost_usd", pa.float64()),
        pa.field("source", pa.string()),
    ]
)
"""Columns of the usage table. ``databricks_request_id`` is the endpoint's own request id (the
name kept from the system table); ``source`` says who sent it (``batch:<job>``, ``serving``, ...)."""

INFERENCE_SCHEMA = pa.schema(
    [
        pa.field("request_time", pa.timestamp("us", tz="UTC")),
        pa.field("endpoint_name", pa.string()),
        pa.field("databricks_request_id", pa.string()),
        pa.field("client_request_id", pa.string()),
        pa.field("status_code", pa.int32()),
        pa.field("request", pa.string()),
        pa.field("response", pa.string()),
        pa.field("request_truncated", pa.bool_()),
        pa.field("response_truncated", pa.bool_()),
        pa.field("source", pa.string()),
    ]
)
"""Columns of the optional inference (payload) table; payloads longer than the cap are cut."""


def _chars(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list) and all(isinstance(m, Mapping) for m in value):  # chat messages
        return sum(len(str(m.get("content", ""))) for m in value)
    return len(str(value))


def usage_record(
    result: Any,
    *,
    request: Any = None,
    requester: str = "",
    source: str = "",
    client_request_id: str | None = None,
    status_code: int | None = None,
    streaming: bool = False,
    usage_context: Mapping[str, str] | None = None,
    served_entity_id: str | None = None,
) -> dict[str, Any]:
    """One usage row from a ``CallResult`` (rows answered from a duplicate cost nothing: skip them)."""
    ok = result.status == "ok"
    completed = result.completed_at or datetime.now(timezone.utc)
    return {
        "request_time": completed,
        "endpoint_name": result.endpoint,
        "served_entity_id": served_entity_id or result.model,
        "requester": requester,
        "usage_context": dict(usage_context or {}),
        "status_code": status_code if status_code is not None else result.http_status,
        "databricks_request_id": result.request_id,
        "client_request_id": client_request_id,
        "input_token_count": int(result.prompt_tokens),
        "output_token_count": int(result.completion_tokens),
        "usage_estimated": bool(result.usage_estimated),
        "input_character_count": _chars(request),
        "output_character_count": _chars(result.value) if ok else 0,
        "request_streaming": streaming,
        "latency_ms": float(result.latency_ms),
        "attempts": int(result.attempts),
        "cost_usd": result.cost_usd,
        "source": source,
    }


def _truncate(text: str, cap: int) -> tuple[str, bool]:
    data = text.encode("utf-8")
    if len(data) <= cap:
        return text, False
    return data[:cap].decode("utf-8", errors="ignore"), True


def inference_record(
    result: Any, request: Any, *, max_payload_bytes: int = 65536, source: str = "",
    client_request_id: str | None = None, status_code: int | None = None,
) -> dict[str, Any]:
    """One payload row: request and response as JSON text, each cut at ``max_payload_bytes``."""
    import json

    req_text = request if isinstance(request, str) else json.dumps(request, default=str)
    resp = result.value if result.status == "ok" else {"error": result.error}
    resp_text = resp if isinstance(resp, str) else json.dumps(resp, default=str)
    req_text, req_cut = _truncate(req_text, max_payload_bytes)
    resp_text, resp_cut = _truncate(resp_text, max_payload_bytes)
    return {
        "request_time": result.completed_at or datetime.now(timezone.utc),
        "endpoint_name": result.endpoint,
        "databricks_request_id": result.request_id,
        "client_request_id": client_request_id,
        "status_code": status_code if status_code is not None else (200 if result.status == "ok" else None),
        "request": req_text,
        "response": resp_text,
        "request_truncated": req_cut,
        "response_truncated": resp_cut,
        "source": source,
    }


@dataclass
class DeltaAppender:
    """Appends rows of a fixed schema to a Delta table (created on first write), once per app transaction."""

    path: str
    schema: pa.Schema = USAGE_SCHEMA

    def append(self, records: Sequence[Mapping[str, Any]] | Iterable[Mapping[str, Any]], *,
               txn: AppTransaction | None = None, check_committed: bool = True) -> CommitResult:
        """Append ``records`` in one commit; with ``txn``, a transaction already committed is skipped.

        ``check_committed=False`` skips that check (one read of the table) when the caller knows
        the transaction was never tried before.
        """
        table = pa.Table.from_pylist(list(records), schema=self.schema)
        return DeltaCommitter(self.path).append(table, txn, check_committed=check_committed)

    def committed_version(self, app_id: str) -> int | None:
        """The highest app-transaction version committed for ``app_id`` (``None``: none, or no table)."""
        return DeltaCommitter(self.path).committed_version(app_id)

    def read(self) -> pa.Table:
        if not storage.is_delta_table(self.path):
            return self.schema.empty_table()
        return storage.delta_table(self.path).to_pyarrow_table()


__all__ = ["DeltaAppender", "INFERENCE_SCHEMA", "USAGE_SCHEMA", "inference_record", "usage_record"]
