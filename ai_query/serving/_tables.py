"""The usage and inference tables written by the serving endpoint (the batch jobs' Delta schemas).

Requests are recorded in memory and appended to Delta in the background, every ``flush_s``
seconds or ``max_rows`` rows, and once more at shutdown, so a request never waits for a commit.
Each append is a Delta app transaction (this process's id, a version per batch): a batch whose
commit landed although the call failed (a lost reply from the store, a timeout) is not
appended twice when it is retried.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import dataclass
from typing import Any, Mapping

from .._logging import get_logger
from ..batch.results import CallResult
from ..sinks import INFERENCE_SCHEMA, USAGE_SCHEMA, AppTransaction, DeltaAppender, inference_record, usage_record

log = get_logger("ai_query.serving")


@dataclass
class _Batch:
    version: int
    rows: list[dict[str, Any]]
    tried: bool = False
    """An append of it failed once: it may have committed all the same, so the next one checks."""


class _Outbox:
    """Rows for one table: new rows, then batches cut from them, each with its transaction version."""

    def __init__(self, appender: DeltaAppender, app_id: str) -> None:
        self.appender = appender
        self.app_id = app_id
        self.rows: list[dict[str, Any]] = []
        self.batches: list[_Batch] = []  # cut, not yet known to be committed
        self.next_version = 0

    def __len__(self) -> int:
        return len(self.rows) + sum(len(b.rows) for b in self.batches)

    def cut(self) -> None:
        if self.rows:
            self.batches.append(_Batch(self.next_version, self.rows))
            self.next_version += 1
            self.rows = []


class ServingTables:
    """Buffers usage (and optionally payload) rows and appends them to their Delta tables."""

    def __init__(self, usage_path: str | None, inference_path: str | None = None, *, flush_s: float = 1.0, max_rows: int = 2000,
                 appenders: tuple[DeltaAppender | None, DeltaAppender | None] | None = None) -> None:
        usage, inference = appenders if appenders is not None else (
            DeltaAppender(usage_path, USAGE_SCHEMA) if usage_path else None,
            DeltaAppender(inference_path, INFERENCE_SCHEMA) if inference_path else None)
        self.usage = usage
        self.inference = inference
        self.app_id = f"ai-query-serving-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        """This process's Delta app-transaction id (one per ServingTables: versions restart with it)."""
        self._usage = _Outbox(usage, self.app_id) if usage is not None else None
        self._inference = _Outbox(inference, self.app_id) if inference is not None else None
        self.flush_s = flush_s
        self.max_rows = max_rows
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    @property
    def enabled(self) -> bool:
        return self.usage is not None or self.inference is not None

    @property
    def pending_rows(self) -> int:
        """Rows recorded and not yet known to be committed."""
        return sum(len(box) for box in (self._usage, self._inference) if box is not None)

    def record(self, result: CallResult, request: Any, *, requester: str, client_request_id: str | None,
               status_code: int, streaming: bool, usage_context: Mapping[str, str] | None = None) -> None:
        if self._usage is not None:
            self._usage.rows.append(usage_record(result, request=request, requester=requester, source="serving",
                                                 client_request_id=client_request_id, status_code=status_code, streaming=streaming,
                                                 usage_context=usage_context))
        if self._inference is not None:
            self._inference.rows.append(inference_record(result, request, source="serving",
                                                         client_request_id=client_request_id, status_code=status_code))
        if self.pending_rows >= self.max_rows:
            asyncio.get_running_loop().create_task(self.flush())

    def start(self) -> None:
        if self.enabled:
            self._task = asyncio.get_running_loop().create_task(self._every())

    async def _every(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            await self.flush()

    async def flush(self) -> None:
        async with self._lock:
            for box in (self._usage, self._inference):
                if box is None:
                    continue
                box.cut()
                while box.batches:  # in version order: a later version must not land before an earlier one
                    batch = box.batches[0]
                    check, batch.tried = batch.tried, True  # an interrupted attempt may still commit: the next one checks
                    try:
                        await asyncio.to_thread(box.appender.append, batch.rows, txn=AppTransaction(box.app_id, batch.version),
                                                check_committed=check)
                    except Exception as exc:  # noqa: BLE001 - a failed append must not stop serving
                        log.warning("could not append %d rows to %s (kept for the next flush): %s", len(batch.rows),
                                    box.appender.path, exc)
                        break
                    box.batches.pop(0)

    async def close(self, attempts: int = 3) -> None:
        """Stop the background flushes and append what is left (retried: several workers of one
        server may race to create a table, and the loser's commit fails once)."""
        if self._task is not None:
            # Not in the middle of an append: a cancelled await does not stop its thread, whose
            # commit would land beside the retry of the same batch.
            async with self._lock:
                self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for attempt in range(attempts):
            await self.flush()
            if not self.pending_rows:
                return
            await asyncio.sleep(0.2 * (attempt + 1))
        log.warning("%d usage and inference rows could not be appended at shutdown", self.pending_rows)
