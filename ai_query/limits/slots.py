"""The one queue for slots in flight under a changing limit: first come, first served, cancel-safe.

Both concurrency policies (``aimd`` and ``gradient``) decide only *how many* requests may be in
flight; this queue decides *who* goes next. It wakes only as many waiters as it has free slots
(an ``asyncio.Condition`` with ``notify_all`` would wake thousands of waiting rows on every
completion), and a new caller never overtakes one that is already waiting.

Cancellation is where queues like this leak. A waiter can be cancelled in two places:

- *while waiting*: its future is cancelled and stays in the deque until a hand-over passes it
  (removing it at once would cost O(waiters) per cancellation, O(n^2) when a whole batch of
  waiting rows is cancelled). Only live waiters count in ``waiting``, so a cancelled one never
  blocks the fast path, and the deque is compacted when cancelled futures outnumber live ones;
- *after its slot was handed over* but before it ran: the slot was already counted for it, so it
  gives the slot back and the next waiter gets it.

The limit is read through a callable, since the policies change it between hand-overs. A
``lease`` caps it from outside: the slots this worker holds of an endpoint's total across workers
(``share``); 0 holds every caller back until the driver's broker grants some (lease before send).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Callable, Literal

Outcome = Literal["ok", "overload", "error"]
"""How a request ended, for a concurrency policy: ``overload`` (429, 503, timeout) shrinks the limit."""


class SlotQueue:
    """Slots in flight, at most ``limit()`` of them, handed to waiters in arrival order."""

    def __init__(self, limit: Callable[[], int]) -> None:
        self._limit = limit
        self._in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._waiting = 0  # live waiters; cancelled ones may still sit in ``_waiters``
        self.lease: int | None = None
        """Slots leased from the driver's broker (``None``: no lease, the limit alone counts)."""

    def _cap(self) -> int:
        limit = self._limit()
        return limit if self.lease is None else min(limit, self.lease)

    def set_lease(self, lease: int | None) -> None:
        """Cap the slots at ``lease`` (a lower lease takes nothing back from callers in flight)."""
        self.lease = lease
        self.hand_over()

    @property
    def in_flight(self) -> int:
        """Slots taken, including those handed to a waiter that has not run yet."""
        return self._in_flight

    @property
    def waiting(self) -> int:
        """Callers waiting for a slot (cancelled ones not counted)."""
        return self._waiting

    def try_take(self) -> bool:
        """Take a slot if one is free and nobody waits for one."""
        if self._in_flight >= self._cap() or self._waiting:
            return False
        self._in_flight += 1
        return True

    async def take(self) -> None:
        """Wait for a slot, behind everyone who asked before."""
        if self.try_take():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._waiting += 1
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.cancelled():  # gave up while waiting: nothing was counted for it
                self._waiting -= 1
                if len(self._waiters) > 2 * self._waiting + 64:
                    self._waiters = deque(w for w in self._waiters if not w.done())
            else:  # its slot was handed over just as it gave up: pass the slot on
                self._in_flight -= 1
                self.hand_over()
            raise

    def give_back(self) -> None:
        """Free one slot and hand free slots to the longest waiting callers."""
        self._in_flight -= 1
        self.hand_over()

    def hand_over(self) -> None:
        """Give free slots to the longest waiting callers (call it when the limit rose)."""
        limit = self._cap()
        while self._waiters and self._in_flight < limit:
            waiter = self._waiters.popleft()
            if waiter.done():  # cancelled while waiting; ``take`` has uncounted it
                continue
            self._in_flight += 1  # counted for it until it runs
            self._waiting -= 1
            waiter.set_result(None)
