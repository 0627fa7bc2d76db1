"""The driver's side of concurrency shares: slots leased to workers, never more than the total.

``max_concurrency`` is the endpoint's total over the job's workers, and it must hold at every
instant, not on average: a server whose cap is that total refuses every request above it. A
split that each worker applies on its own (``total / n`` for the ``n`` it last heard of) cannot:
a worker that starts takes its share before the others have heard of it and shed theirs, and
the requests they already have in flight stay in flight. So slots are *leased*:

- each worker holds a number of slots (``held``); the broker's record of them never sums above
  the total, and a worker never has more in flight than it holds;
- a worker's fair share is ``total // n`` (the first ``total % n`` to join get one more);
- a raise comes only out of free room (slots nobody holds) and is recorded as held before its
  answer leaves the broker, so two workers can never be granted the same slot;
- a cut takes effect on the worker at once for new requests, but the broker keeps counting the
  old number until the worker *reports* that its requests in flight have fallen to the new
  ceiling: only then may another worker be granted those slots.

Overload is shared too: a worker reports the overload signals (429s) it saw, and every worker's
answer carries the endpoint's count, so the others end their slow start at once instead of each
doubling past the shared capacity (``AdaptiveConcurrencyLimiter.on_shared_overload``).

A worker starts holding nothing (lease before send). Grants carry a sequence number: a report
that left the worker before it heard of a raise cannot lower the record below that raise (it
keeps the larger of the two). A worker that stops beating (a killed executor) is dropped after
``ttl_s``; the slots it held come back then, not before, since a late beat of a live worker
would otherwise find its slots given away.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass
from typing import Callable


@dataclass
class _Holder:
    held: int
    seq: int
    expires: float
    order: int


class ConcurrencyLeases:
    """Slots of each endpoint held by each worker; thread-safe (one broker thread per request)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._changed = threading.Condition()
        self._order = itertools.count()
        self.holders: dict[str, dict[str, _Holder]] = {}
        self.overloads: dict[str, int] = {}
        """Overload signals reported per endpoint, by all its workers."""

    def held(self, endpoint: str) -> dict[str, int]:
        """Slots held per worker of ``endpoint`` (for tests and diagnostics)."""
        with self._changed:
            return {w: h.held for w, h in self.holders.get(endpoint, {}).items()}

    def _expire(self, holders: dict[str, _Holder], now: float) -> None:
        dead = [w for w, h in holders.items() if h.expires < now]
        for w in dead:
            del holders[w]
        if dead:
            self._changed.notify_all()

    @staticmethod
    def _grant(holders: dict[str, _Holder], worker: str, total: int) -> int:
        ranked = sorted(holders, key=lambda w: holders[w].order)
        n, place = len(ranked), ranked.index(worker)
        fair = total // n + (1 if place < total % n else 0)
        free = total - sum(h.held for h in holders.values())
        return min(fair, holders[worker].held + max(0, free))

    def lease(self, endpoint: str, worker: str, total: int, *, active: bool = True, held: int = 0, seq: int = 0,
              ceiling: int | None = None, grant: bool = True, ttl_s: float = 10.0, wait_s: float = 0.0,
              overloads: int = 0, overloads_seen: int | None = None, want: int | None = None) -> dict[str, int]:
        """Record what ``worker`` holds (``held``, having applied grant ``seq``), and grant its share.

        ``active=False``: the worker leaves and holds nothing. ``grant=False``: a report only (the
        worker's requests in flight fell after a cut). Otherwise the answer is ``grant`` (the
        ceiling the worker must apply), its ``seq`` and the number of ``workers``; with ``wait_s``
        it waits until the grant differs from ``ceiling`` (the worker's ceiling now) or the
        endpoint's ``overloads`` from ``overloads_seen``: a long poll, so a worker hears at once
        that it must shed slots, that room freed up, or that another worker was refused. ``want``
        caps the grant (a worker's first beats: see ``share``).
        """
        total = max(1, int(total))
        with self._changed:
            holders = self.holders.setdefault(endpoint, {})
            if overloads:
                self.overloads[endpoint] = self.overloads.get(endpoint, 0) + overloads
                self._changed.notify_all()
            now = self._clock()
            self._expire(holders, now)
            if not active:
                if holders.pop(worker, None) is not None:
                    self._changed.notify_all()
                return {"grant": 0, "seq": seq, "workers": len(holders), "overloads": self.overloads.get(endpoint, 0)}
            record = holders.get(worker)
            if record is None and not grant:  # a late report of a worker that has left: it holds nothing
                return {"grant": -1, "seq": seq, "workers": len(holders), "overloads": self.overloads.get(endpoint, 0)}
            if record is None:  # a newcomer: the others' shares fall
                record = holders[worker] = _Holder(held, seq, now, next(self._order))
                self._changed.notify_all()
            before = record.held
            # A report sent before a raise reached the worker cannot undo the raise.
            record.held = held if seq >= record.seq else max(held, record.held)
            record.expires = now + wait_s + ttl_s  # never dropped while it waits here
            if record.held != before:
                self._changed.notify_all()
            if not grant:
                return {"grant": -1, "seq": record.seq, "workers": len(holders), "overloads": self.overloads.get(endpoint, 0)}
            deadline = self._clock() + wait_s
            while True:
                if worker not in holders:  # it left (or was dropped) while this poll waited
                    return {"grant": 0, "seq": record.seq, "workers": len(holders), "overloads": self.overloads.get(endpoint, 0)}
                granted = self._grant(holders, worker, total)
                if want is not None:
                    granted = min(granted, want)
                left = deadline - self._clock()
                news = overloads_seen is not None and self.overloads.get(endpoint, 0) != overloads_seen
                if granted != ceiling or news or left <= 0:
                    break
                self._changed.wait(left)
                self._expire(holders, self._clock())
            if granted > record.held:  # counted as held before the answer leaves
                record.held = granted
                record.seq += 1
                self._changed.notify_all()
            return {"grant": granted, "seq": record.seq, "workers": len(holders), "overloads": self.overloads.get(endpoint, 0)}


__all__ = ["ConcurrencyLeases"]
