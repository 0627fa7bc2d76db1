"""An endpoint's concurrency shared by the workers that are sending to it now, leased before sending.

``max_concurrency`` is the endpoint's total over a job, at every instant. A static split
(``1/workers`` each) wastes it whenever partitions are uneven (the tail of every job, most of a
skewed one); a split each worker computes from the number of workers it last heard of overshoots
it whenever that number changes (a starting worker sends before the others shed their part, and
what they have in flight stays in flight: 23-275 requests per job refused by a server whose cap
was the total). So each worker *leases* its slots from the driver's broker
(``leases.ConcurrencyLeases``, where the rules are) and its limiters never have more in flight:

- it starts holding nothing: its rows wait until the first grant (a round trip to the driver),
  and at its first beat it asks for no more than its static share: workers of a job start
  within milliseconds of each other, and the first to ask, granted the whole endpoint, had sent a
  window's worth before the others came, which they then waited a round trip to drain;
- while it has rows for the endpoint it long-polls the broker, which answers when its grant
  changes (another worker came or left, or room freed up), else after ``interval_s``;
- a lower grant applies at once to new requests; the requests already in flight drain, and the
  worker reports each fall of what it holds, so the broker can grant the slots to another;
- it reports the overload signals (429s) its limiters see, and hears the others': a worker still
  in slow start ends it when another was refused (the capacity is shared: each worker doubling on
  its own went past it by the others' part, a burst of 429s at the start of every short job);
- it leaves ``grace_s`` after its rows are done (a Spark task's next Arrow batch follows its last
  within milliseconds: leaving at once handed its room to others and took it back a round trip
  later).

If the broker cannot be reached the worker keeps to the static share (``1/workers``) it was built with.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .._errors import TransportError
from .quota import post_json

WORKER_ID = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class ConcurrencyShare:
    """Keeps one endpoint's limiters within the slots this worker leases from the driver's broker."""

    def __init__(self, endpoint: str, address: tuple[str, int], total: int, limiters: list[Any], *,
                 interval_s: float = 0.5, grace_s: float = 0.1, worker: str | None = None, ttl_s: float = 10.0) -> None:
        self.endpoint = endpoint
        self.url = f"http://{address[0]}:{address[1]}/lease"
        self.total = total
        self.limiters = limiters
        self.interval_s = interval_s
        self.grace_s = grace_s
        self.ttl_s = ttl_s
        # One holder per share (per client's limiters), not per process: two clients of one
        # process hold slots of their own.
        self.worker = worker or f"{WORKER_ID}-{uuid.uuid4().hex[:6]}"
        self.static = limiters[0].maximum  # the static share, kept if the broker cannot be reached
        self.ceiling = 0
        """Slots leased now (the most this worker may have in flight)."""
        self.seq = 0
        self.workers_seen = 0
        self.failed = False
        self._reported = 0
        self.overloads_seen: int | None = None
        """The endpoint's overload signals over all workers, as last heard from the broker."""
        self._signals = 0  # this worker's overload signals, as last reported
        self._own_unheard = 0  # reported since the last answer
        self._watch: asyncio.Task[None] | None = None
        self._active = 0
        self._task: asyncio.Task[None] | None = None
        self._drain: asyncio.Task[None] | None = None
        self._leaving: asyncio.Future[None] | None = None
        self._left: asyncio.Future[Any] | None = None
        for limiter in limiters:  # lease before send: nothing goes out before the first grant
            limiter.set_lease(0)
        # Its own threads: a long poll must not hold one of the loop's default executor (quota
        # calls use it), and a report must not queue behind a long poll.
        self._threads = ThreadPoolExecutor(2, thread_name_prefix=f"ai-query-share-{endpoint}")

    @property
    def held(self) -> int:
        """What the broker must count for this worker: its ceiling, or more while a cut drains."""
        return max(self.ceiling, *(limiter.in_flight for limiter in self.limiters))

    async def _post(self, **msg: Any) -> dict[str, Any] | None:
        msg = {"endpoint": self.endpoint, "worker": self.worker, "total": self.total, "ttl_s": self.ttl_s, **msg}
        timeout = 2.0 + float(msg.get("wait_s", 0.0))
        try:
            return await asyncio.get_running_loop().run_in_executor(self._threads, post_json, self.url, msg, timeout)
        except (TransportError, ValueError, KeyError):
            self._fail()
            return None

    def _fail(self) -> None:
        """The broker is gone: keep to the static share from now on."""
        if not self.failed:
            self.failed = True
            self.ceiling = self.static
            for limiter in self.limiters:
                limiter.set_maximum(self.static)
                limiter.set_lease(None)

    def _hear_overloads(self, total: int) -> None:
        if self.overloads_seen is not None and total - self.overloads_seen - self._own_unheard > 0:
            for limiter in self.limiters:  # another worker was refused: the shared capacity is reached
                shared = getattr(limiter, "on_shared_overload", None)
                if shared is not None:
                    shared()
        self.overloads_seen, self._own_unheard = total, 0

    async def _watch_overloads(self) -> None:
        """Report this worker's new overload signals within ~10 ms, so the others stop growing."""
        self._signals = sum(limiter.overload_signals for limiter in self.limiters)
        while not self.failed:
            await asyncio.sleep(0.01)
            signals = sum(limiter.overload_signals for limiter in self.limiters)
            if signals > self._signals:
                new, self._signals = signals - self._signals, signals
                self._own_unheard += new
                reply = await self._post(active=True, grant=False, held=self.held, seq=self.seq, overloads=new)
                if reply is not None:
                    self._hear_overloads(int(reply.get("overloads", 0)))

    def _apply(self, reply: dict[str, Any]) -> None:
        if self.failed:
            return
        self._hear_overloads(int(reply.get("overloads", 0)))
        grant, self.seq, self.workers_seen = int(reply["grant"]), int(reply["seq"]), int(reply["workers"])
        if grant == self.ceiling:
            return
        self.ceiling = grant
        for limiter in self.limiters:
            if grant > 0:  # the policy's shape (AIMD scales its limit with it); 0 only holds rows back
                limiter.set_maximum(grant)
            limiter.set_lease(grant)  # the hard cap
        if self.held > grant and (self._drain is None or self._drain.done()):
            self._drain = asyncio.ensure_future(self._report_drain())

    async def _report_drain(self) -> None:
        """After a cut: report each fall of what this worker holds, until it is down to its ceiling."""
        self._reported = self.held
        while not self.failed and self._reported > self.ceiling:
            await asyncio.sleep(0.002)
            held = self.held
            if held < self._reported:
                self._reported = held
                await self._post(active=True, grant=False, held=held, seq=self.seq)

    async def _run(self) -> None:
        if self._left is not None:  # the broker hears this worker leave before it hears it come back
            await asyncio.shield(self._left)
        # The first beat answers at once (rows are waiting for it), with no more than the static
        # share; the next comes after ``grace_s``, when the job's other workers have asked too.
        reply = await self._post(active=True, held=self.held, seq=self.seq, ceiling=self.ceiling, want=self.static)
        if reply is not None:
            self._apply(reply)
            await asyncio.sleep(self.grace_s)
        while not self.failed:
            reply = await self._post(active=True, held=self.held, seq=self.seq, ceiling=self.ceiling, wait_s=self.interval_s,
                                     overloads_seen=self.overloads_seen)
            if reply is not None:
                self._apply(reply)

    def enter(self) -> None:
        """Rows of this worker are about to be sent (call on the event loop)."""
        self._active += 1
        if self._leaving is not None and not self._leaving.done():  # back within the grace: it never left
            self._leaving.cancel()
        self._leaving = None
        if self._active == 1 and not self.failed and (self._task is None or self._task.done()):
            self._task = asyncio.ensure_future(self._run())
            self._watch = asyncio.ensure_future(self._watch_overloads())

    async def exit(self) -> None:
        """Those rows are done; unless more come within ``grace_s``, the slots go back to the broker."""
        self._active -= 1
        if self._active == 0 and self._task is not None:
            self._leaving = asyncio.ensure_future(self._leave())

    async def _leave(self, grace: bool = True) -> None:
        if grace:
            await asyncio.sleep(self.grace_s)
        if self._active > 0 or self._task is None:
            return
        self._task.cancel()
        self._task = None
        if self._watch is not None:
            self._watch.cancel()
        if self.failed:
            return
        self.ceiling = 0
        for limiter in self.limiters:
            limiter.set_lease(0)  # nothing is in flight: a worker that comes back leases again
        self.workers_seen = 0
        self._left = asyncio.ensure_future(self._post(active=False))
        await asyncio.shield(self._left)

    async def aclose(self) -> None:
        """Leave now (the client is closing): no task of this share outlives its event loop."""
        if self._leaving is not None and not self._leaving.done():
            self._leaving.cancel()
        self._leaving = None
        if self._drain is not None:
            self._drain.cancel()
        if self._active == 0:
            await self._leave(grace=False)
        elif self._task is not None:
            self._task.cancel()
            self._task = None
        if self._watch is not None:
            self._watch.cancel()
        self._threads.shutdown(wait=False)  # a long poll still out ends within its wait_s


__all__ = ["ConcurrencyShare", "WORKER_ID"]
