"""The usage and inference tables written by the serving endpoint (the batch jobs' Delta schemas).

Requests are recorded in memory and appended to Delta in the background, every ``flush_s``
seconds or ``max_rows`` rows, and once more at shutdown, so a request never waits for a commit.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from .._client import CallResult
from .._usage import INFERENCE_SCHEMA, USAGE_SCHEMA, DeltaAppender, inference_record, usage_record

log = logging.getLogger("ai_query.serving")


class ServingTables:
    """Buffers usage (and optionally payload) rows and appends them to their Delta tables."""

    def __init__(self, usage_path: str | None, inference_path: str | None = None, *, flush_s: float = 1.0, max_rows: int = 2000) -> None:
        self.usage = DeltaAppender(usage_path, USAGE_SCHEMA) if usage_path else None
        self.inference = DeltaAppender(inference_path, INFERENCE_SCHEMA) if inference_path else None
        self.flush_s = flush_s
        self.max_rows = max_rows
        self._usage_rows: list[dict[str, Any]] = []
        self._inference_rows: list[dict[str, Any]] = []
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    @property
    def enabled(self) -> bool:
        return self.usage is not None or self.inference is not None

    def record(self, result: CallResult, request: Any, *, requester: str, client_request_id: str | None,
               status_code: int, streaming: bool) -> None:
        if self.usage is not None:
            self._usage_rows.append(usage_record(result, request=request, requester=requester, source="serving",
                                                 client_request_id=client_request_id, status_code=status_code, streaming=streaming))
        if self.inference is not None:
            self._inference_rows.append(inference_record(result, request, source="serving",
                                                         client_request_id=client_request_id, status_code=status_code))
        if len(self._usage_rows) + len(self._inference_rows) >= self.max_rows:
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
            for appender, rows in ((self.usage, self._usage_rows), (self.inference, self._inference_rows)):
                if appender is None or not rows:
                    continue
                batch = rows[:]
                del rows[:len(batch)]
                try:
                    await asyncio.to_thread(appender.append, batch)
                except Exception as exc:  # noqa: BLE001 - a failed append must not stop serving
                    rows[:0] = batch  # keep them for the next flush
                    log.warning("could not append %d rows to %s: %s", len(batch), appender.path, exc)

    async def close(self, attempts: int = 3) -> None:
        """Stop the background flushes and append what is left (retried: several workers of one
        server may race to create a table, and the loser's commit fails once)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for attempt in range(attempts):
            await self.flush()
            if not self._usage_rows and not self._inference_rows:
                return
            await asyncio.sleep(0.2 * (attempt + 1))
        log.warning("%d usage and %d inference rows could not be appended at shutdown", len(self._usage_rows), len(self._inference_rows))
