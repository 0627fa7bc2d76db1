"""Live progress from Spark tasks to the driver, over UDP datagrams on the driver's address.

Spark accumulators arrive only when a task ends, which for a 10,000-row Arrow batch of LLM
calls is minutes of silence. Tasks therefore send small JSON counters (fire and forget, at most
a few per second per process) to a ``ProgressCollector`` listening on the driver. Progress is a
view, not accounting: the Delta tables hold the truth.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class ProgressCounts:
    rows_ok: int = 0
    rows_failed: int = 0
    tokens: int = 0
    deduplicated: int = 0
    """Rows answered by another row's request (counted in ``rows_ok`` / ``rows_failed`` too)."""
    concurrency: dict[str, int] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return self.rows_ok + self.rows_failed


class ProgressReporter:
    """Accumulates counts in a task and sends them every ``interval`` seconds (and on flush)."""

    def __init__(self, address: tuple[str, int], interval: float = 0.25, clock: Callable[[], float] = time.monotonic) -> None:
        self.address = address
        self.interval = interval
        self._clock = clock
        self._pending = ProgressCounts()
        self._last_sent = clock()
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def add(self, ok: bool, tokens: int, endpoint: str | None = None, concurrency: int | None = None,
            *, deduplicated: bool = False) -> None:
        with self._lock:
            self._pending.deduplicated += deduplicated
            if ok:
                self._pending.rows_ok += 1
            else:
                self._pending.rows_failed += 1
            self._pending.tokens += tokens
            if endpoint is not None and concurrency is not None:
                self._pending.concurrency[endpoint] = concurrency
            due = self._clock() - self._last_sent >= self.interval
        if due:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, ProgressCounts()
            self._last_sent = self._clock()
        if pending.rows == 0 and pending.tokens == 0:
            return
        payload = {"ok": pending.rows_ok, "failed": pending.rows_failed, "tokens": pending.tokens, "dedup": pending.deduplicated,
                   "conc": pending.concurrency}
        try:
            self._sock.sendto(json.dumps(payload).encode(), self.address)
        except OSError:
            pass  # progress is best effort; the results do not depend on it

    def close(self) -> None:
        self.flush()
        self._sock.close()


class ProgressCollector:
    """Receives task counters on the driver; ``snapshot()`` gives the totals so far."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((host, 0))
        self._sock.settimeout(0.2)
        self.address: tuple[str, int] = self._sock.getsockname()
        self._totals = ProgressCounts()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="ai-query-progress", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopped.is_set():
            try:
                data, _ = self._sock.recvfrom(65536)
            except (socket.timeout, OSError):
                continue
            try:
                msg = json.loads(data)
            except ValueError:
                continue
            with self._lock:
                self._totals.rows_ok += int(msg.get("ok", 0))
                self._totals.rows_failed += int(msg.get("failed", 0))
                self._totals.tokens += int(msg.get("tokens", 0))
                self._totals.deduplicated += int(msg.get("dedup", 0))
                self._totals.concurrency.update(msg.get("conc", {}))

    def snapshot(self) -> ProgressCounts:
        with self._lock:
            t = self._totals
            return ProgressCounts(t.rows_ok, t.rows_failed, t.tokens, t.deduplicated, dict(t.concurrency))

    def close(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=2)
        self._sock.close()


_REPORTERS: dict[tuple[str, int], ProgressReporter] = {}


def reporter_for(address: tuple[str, int] | None) -> ProgressReporter | None:
    """One reporter per process and address (Spark reuses Python workers across tasks)."""
    if address is None:
        return None
    address = (address[0], int(address[1]))
    reporter = _REPORTERS.get(address)
    if reporter is None:
        reporter = _REPORTERS[address] = ProgressReporter(address)
    return reporter
