"""Live progress from Spark tasks to the driver, over UDP datagrams on the driver's address.

Spark accumulators arrive only when a task ends, which for a 10,000-row Arrow batch of LLM
calls is minutes of silence. Tasks therefore send small JSON counters (fire and forget, at most
a few per second per process) to a ``ProgressCollector`` listening on the driver. Progress is a
view, not accounting: the Delta tables hold the truth.

Counts carry the user action they belong to (Spark: the SQL execution, ``BatchContext.action``),
because the driver cannot tell two actions apart by timing: ``df.collect(); df.collect()`` runs
the second action's tasks within milliseconds of the first one's last datagram, and a display
that cut bars at pauses showed one bar with twice the rows and tokens of the query.
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
    """Accumulates counts in a task and sends them every ``interval`` seconds (and on flush),
    per action (``None``: an action nobody named)."""

    def __init__(self, address: tuple[str, int], interval: float = 0.25, clock: Callable[[], float] = time.monotonic) -> None:
        self.address = address
        self.interval = interval
        self._clock = clock
        self._pending: dict[str | None, ProgressCounts] = {}
        self._last_sent = clock()
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def add(self, ok: bool, tokens: int, endpoint: str | None = None, concurrency: int | None = None,
            *, deduplicated: bool = False, action: str | None = None) -> None:
        with self._lock:
            pending = self._pending.get(action)
            if pending is None:
                pending = self._pending[action] = ProgressCounts()
            pending.deduplicated += deduplicated
            if ok:
                pending.rows_ok += 1
            else:
                pending.rows_failed += 1
            pending.tokens += tokens
            if endpoint is not None and concurrency is not None:
                pending.concurrency[endpoint] = concurrency
            due = self._clock() - self._last_sent >= self.interval
        if due:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            by_action, self._pending = self._pending, {}
            self._last_sent = self._clock()
        for action, pending in by_action.items():
            if pending.rows == 0 and pending.tokens == 0:
                continue
            payload = {"ok": pending.rows_ok, "failed": pending.rows_failed, "tokens": pending.tokens,
                       "dedup": pending.deduplicated, "conc": pending.concurrency, "action": action}
            try:
                self._sock.sendto(json.dumps(payload).encode(), self.address)
            except OSError:
                pass  # progress is best effort; the results do not depend on it

    def close(self) -> None:
        self.flush()
        self._sock.close()


class ProgressCollector:
    """Receives task counters on the driver; ``snapshot()`` gives the totals so far,
    ``by_action()`` the same per action (in the order their first counts arrived)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((host, 0))
        self._sock.settimeout(0.2)
        self.address: tuple[str, int] = self._sock.getsockname()
        self._totals = ProgressCounts()
        self._actions: dict[str | None, ProgressCounts] = {}
        self._lock = threading.Lock()
        self._sync_done = threading.Condition(self._lock)
        self._syncs = self._synced = 0
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
            if not isinstance(msg, dict):
                continue
            if "sync" in msg:
                with self._lock:
                    self._synced = max(self._synced, int(msg["sync"]))
                    self._sync_done.notify_all()
                continue
            action = msg.get("action")
            action = action if isinstance(action, str) else None
            with self._lock:
                per_action = self._actions.get(action)
                if per_action is None:
                    per_action = self._actions[action] = ProgressCounts()
                for counts in (self._totals, per_action):
                    counts.rows_ok += int(msg.get("ok", 0))
                    counts.rows_failed += int(msg.get("failed", 0))
                    counts.tokens += int(msg.get("tokens", 0))
                    counts.deduplicated += int(msg.get("dedup", 0))
                    counts.concurrency.update(msg.get("conc", {}))

    def snapshot(self) -> ProgressCounts:
        with self._lock:
            return _copy(self._totals)

    def sync(self, timeout: float = 1.0) -> bool:
        """Wait (at most ``timeout`` s) until every datagram queued at this socket is counted: a
        marker sent to itself is read after them. False if the marker was not seen in time."""
        with self._lock:
            self._syncs += 1
            token = self._syncs
        try:
            self._sock.sendto(json.dumps({"sync": token}).encode(), self.address)
        except OSError:
            return False
        with self._sync_done:
            return self._sync_done.wait_for(lambda: self._synced >= token, timeout)

    def by_action(self) -> dict[str | None, ProgressCounts]:
        """The counts of each action (``None``: counts sent without one)."""
        with self._lock:
            return {action: _copy(counts) for action, counts in self._actions.items()}

    def close(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=2)
        self._sock.close()


def _copy(t: ProgressCounts) -> ProgressCounts:
    return ProgressCounts(t.rows_ok, t.rows_failed, t.tokens, t.deduplicated, dict(t.concurrency))


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
