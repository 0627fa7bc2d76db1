"""An endpoint's concurrency shared by the workers that are sending to it now, not by all of them.

``max_concurrency`` is the endpoint's total over a job. A static split (``1/workers`` each) wastes
it whenever partitions are uneven: once one worker runs out of rows, the others keep to their
slice while the endpoint idles (the tail of every job, and most of a skewed one). Each worker
therefore heart-beats to the broker on the driver while it has rows in flight for an endpoint,
and sets its limiter's ceiling to ``max_concurrency / n`` for the ``n`` workers sending now.

Each beat is a long poll: the broker answers when the number of workers differs from the one
this worker last heard, or after ``interval_s``, so a change is heard within milliseconds. A
lower ceiling applies at once, and so does a higher one when a worker left (the number fell
below what this worker had heard: the leaver's rows are done). A worker alone at its first beat
takes more only when a second beat agrees, so two workers that start together never both take
the whole endpoint for a moment. If the broker cannot be reached the static share stays.
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .._errors import TransportError
from .quota import post_json

WORKER_ID = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class ConcurrencyShare:
    """Keeps ``set_maximum(total / n)`` of one endpoint's limiters current while rows are in flight."""

    def __init__(self, endpoint: str, address: tuple[str, int], total: int, limiters: list[Any], *,
                 interval_s: float = 0.5, grace_s: float = 0.1, worker: str = WORKER_ID) -> None:
        self.endpoint = endpoint
        self.url = f"http://{address[0]}:{address[1]}/active"
        self.total = total
        self.limiters = limiters
        self.interval_s = interval_s
        self.grace_s = grace_s
        self._leaving: asyncio.Future[None] | None = None
        self.worker = worker
        self._active = 0
        self._task: asyncio.Task[None] | None = None
        self._pending_raise: int | None = None
        self.failed = False
        self.workers_seen = 0
        # Its own threads: a long poll must not hold one of the loop's default executor (quota
        # calls use it), and the leaving beat must not queue behind a long poll.
        self._threads = ThreadPoolExecutor(2, thread_name_prefix=f"ai-query-share-{endpoint}")

    async def _beat(self, active: bool, seen: int | None = None) -> int | None:
        msg = {"endpoint": self.endpoint, "worker": self.worker, "active": active, "ttl_s": 6 * self.interval_s,
               "seen": seen, "wait_s": self.interval_s}
        try:
            reply = await asyncio.get_running_loop().run_in_executor(self._threads, post_json, self.url, msg,
                                                                     2.0 + self.interval_s)
            return int(reply["workers"])
        except (TransportError, ValueError, KeyError):
            self.failed = True  # keep the static share from now on
            return None

    def _apply(self, workers: int) -> None:
        left = 0 < workers < self.workers_seen
        self.workers_seen = workers
        ceiling = max(1, math.ceil(self.total / workers))
        current = self.limiters[0].maximum
        # A higher ceiling waits for a second beat in a row that says so, unless a worker left.
        wait_to_raise = ceiling > current and not left and self._pending_raise != ceiling
        self._pending_raise = ceiling if wait_to_raise else None
        if ceiling != current and not wait_to_raise:
            for limiter in self.limiters:
                limiter.set_maximum(ceiling)

    async def _run(self) -> None:
        seen = None  # the first beat answers at once
        while not self.failed:
            workers = await self._beat(True, seen)
            if workers is not None:
                self._apply(workers)
                seen = workers

    def enter(self) -> None:
        """Rows of this worker are about to be sent (call on the event loop)."""
        self._active += 1
        if self._leaving is not None and not self._leaving.done():  # back within the grace: it never left
            self._leaving.cancel()
        self._leaving = None
        if self._active == 1 and not self.failed and (self._task is None or self._task.done()):
            self._task = asyncio.ensure_future(self._run())

    async def exit(self) -> None:
        """Those rows are done; unless more come within ``grace_s``, the broker hears it, so others may grow.

        A Spark task's next Arrow batch follows its last within milliseconds: leaving at once let
        the other workers take this one's room and give it back a round trip later, 429s between.
        """
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
        self._pending_raise = None
        self.workers_seen = 0  # a worker that comes back starts afresh
        if not self.failed:
            await self._beat(False)

    async def aclose(self) -> None:
        """Leave now (the client is closing): no task of this share outlives its event loop."""
        if self._leaving is not None and not self._leaving.done():
            self._leaving.cancel()
        self._leaving = None
        if self._active == 0:
            await self._leave(grace=False)
        elif self._task is not None:
            self._task.cancel()
            self._task = None
        self._threads.shutdown(wait=False)  # a long poll still out ends within its wait_s


__all__ = ["ConcurrencyShare", "WORKER_ID"]
