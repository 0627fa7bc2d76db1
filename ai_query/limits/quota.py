"""Request and token quotas (requests/min, tokens/min, queries/hour, provisioned tokens/s).

``SlidingWindowLimit`` admits an amount only if the amounts admitted over the last ``window_s``
stay within ``limit``: stricter than a server's fixed window, so it never trips one, however the
two clocks' windows are aligned, and as strict as a server's sliding window, *if* each amount is
stamped no earlier than the server sees it. So a request is admitted when it is about to be sent,
after it took its concurrency slot: admitted before, it waited for the slot (up to a window
scheduler's worth of rows) while the server's window had not yet counted it, and the admissions
it made room for at the next slide came too early (94 quota 429s at each slide of a 1,200/min
sliding window). The gap left (the broker's answer travelling back, the request going out) is
covered by keeping each admission ``SEND_MARGIN_S`` longer than the window (at most 1 % of it).
``admit()`` reserves one request and ``prompt + max_tokens`` tokens and returns the admission's
stamp; ``settle()`` refunds (or charges) the difference to that admission once the real usage is
known (refunding the newest admissions instead let ours expire later than the server's refunded
one: we counted less than it did); ``pause_until()`` stops all admissions after a ``Retry-After``.

Quotas are shared across Spark executors through a ``QuotaBroker`` on the driver (a small
HTTP server, stdlib only): every process asks it for leases, so the limit holds for the whole
job instead of being multiplied by the number of workers. When the broker is unreachable a
process falls back to a static share (``1 / workers``) of each limit.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Awaitable, Callable, Protocol

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from .._errors import TransportError, TransportTimeoutError
from ..config import ClientConfig, EndpointConfig
from ..transport import Request, request_blocking
from .leases import ConcurrencyLeases

SEND_MARGIN_S = 0.5
"""How much longer than its window an admission is counted: the time from the broker's stamp to the server."""

BROKER_ATTEMPTS = 6
"""Tries of one broker call that times out (``timeout_s`` each) before this worker keeps to its static share."""


class SlidingWindowLimit:
    """At most ``limit`` units in any ``window_s`` span."""

    def __init__(self, limit: float, window_s: float, margin_s: float = 0.0) -> None:
        if limit <= 0 or window_s <= 0:
            raise ValueError(f"limit and window_s must be > 0, got {limit}, {window_s}")
        self.limit = float(limit)
        self.window_s = float(window_s) + margin_s
        self._events: deque[list[float]] = deque()  # [time, amount]
        self._used = 0.0

    def _expire(self, now: float) -> None:
        while self._events and self._events[0][0] <= now - self.window_s:
            self._used -= self._events.popleft()[1]

    def wait_time(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` fits (0 if it fits now). An amount above the limit waits for an empty window."""
        self._expire(now)
        amount = min(amount, self.limit)
        if self._used + amount <= self.limit + 1e-9:
            return 0.0
        excess = self._used + amount - self.limit
        for t, a in self._events:
            excess -= a
            if excess <= 1e-9:
                return max(0.0, t + self.window_s - now)
        return self.window_s

    def take(self, amount: float, now: float) -> None:
        self._events.append([now, amount])
        self._used += amount

    def adjust(self, delta: float, now: float, at: float | None = None) -> None:
        """Refund (negative) or charge (positive) once real usage is known.

        A refund goes to the admission stamped ``at`` (none if it has left the window: a
        server gives nothing back to a window gone by either); without ``at``, to the newest.
        """
        self._expire(now)
        if delta >= 0:
            self.take(delta, now)
            return
        refund = -delta
        for event in reversed(self._events):
            if at is not None and event[0] != at:
                if event[0] < at:
                    break
                continue
            give = min(refund, event[1])
            event[1] -= give
            self._used -= give
            refund -= give
            if refund <= 0:
                break

    @property
    def used(self) -> float:
        return self._used


@dataclass(frozen=True)
class QuotaLimits:
    """The limits of one endpoint, already scaled to this process's share."""

    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    queries_per_hour: float | None = None
    tokens_per_second: float | None = None  # provisioned throughput

    @classmethod
    def of(cls, endpoint: EndpointConfig, share: float = 1.0) -> "QuotaLimits | None":
        cc: ClientConfig = endpoint.client_config
        pt = endpoint.entity.max_provisioned_throughput
        limits = cls(
            cc.requests_per_minute * share if cc.requests_per_minute else None,
            cc.tokens_per_minute * share if cc.tokens_per_minute else None,
            cc.queries_per_hour * share if cc.queries_per_hour else None,
            pt * share if pt else None,
        )
        return None if limits == cls() else limits

    def windows(self) -> list[tuple[str, SlidingWindowLimit]]:
        out = []
        if self.requests_per_minute:
            out.append(("requests", SlidingWindowLimit(self.requests_per_minute, 60.0, SEND_MARGIN_S)))
        if self.queries_per_hour:
            out.append(("requests", SlidingWindowLimit(self.queries_per_hour, 3600.0, SEND_MARGIN_S)))
        if self.tokens_per_minute:
            out.append(("tokens", SlidingWindowLimit(self.tokens_per_minute, 60.0, SEND_MARGIN_S)))
        if self.tokens_per_second:
            # Provisioned throughput: pace to tokens/s with at most a quarter second's burst, so
            # the jitter between admission here and arrival there cannot bunch two bursts into
            # one second of the server's.
            out.append(("tokens", SlidingWindowLimit(max(self.tokens_per_second * 0.25, 1.0), 0.25)))
        return out


class QuotaState:
    """The admission logic over a set of windows; shared by the local quota and the broker."""

    def __init__(self, limits: QuotaLimits) -> None:
        self._windows = limits.windows()
        self.paused_until = 0.0
        self._lock = threading.Lock()

    def try_admit(self, requests: int, tokens: float, now: float) -> float:
        """Take the amounts and return 0, or take nothing and return the seconds to wait."""
        with self._lock:
            if now < self.paused_until:
                return self.paused_until - now
            amounts = [(w, requests if kind == "requests" else tokens) for kind, w in self._windows]
            wait = max((w.wait_time(amount, now) for w, amount in amounts), default=0.0)
            if wait > 0:
                return wait
            for w, amount in amounts:
                w.take(amount, now)
            return 0.0

    def settle(self, token_delta: float, now: float, at: float | None = None) -> None:
        if not token_delta:
            return
        with self._lock:
            for kind, w in self._windows:
                if kind == "tokens":
                    w.adjust(token_delta, now, at)

    def pause_until(self, until: float) -> None:
        with self._lock:
            self.paused_until = max(self.paused_until, until)

    def used(self) -> dict[str, float]:
        """What the windows hold, per kind (``requests``, ``tokens``; the larger of two windows of
        one kind): diagnostics, e.g. that a cluster's executors really took their quota here."""
        out: dict[str, float] = {}
        with self._lock:
            for kind, w in self._windows:
                out[kind] = max(out.get(kind, 0.0), w.used)
        return out


class Quota(Protocol):
    async def admit(self, tokens: float) -> float:
        """Wait until one request of ``tokens`` fits, take it; the admission's stamp (for ``settle``)."""
        ...

    def settle(self, reserved: float, actual: float, at: float | None = None) -> None: ...

    def pause_for(self, seconds: float) -> None: ...


class LocalQuota:
    """An endpoint's quota enforced in this process alone (a static share of the limits)."""

    def __init__(self, limits: QuotaLimits, *, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.state = QuotaState(limits)
        self._clock = clock
        self._sleep = sleep

    async def admit(self, tokens: float) -> float:
        while True:
            now = self._clock()
            wait = self.state.try_admit(1, tokens, now)
            if wait <= 0:
                return now
            await self._sleep(min(wait, 5.0))

    def settle(self, reserved: float, actual: float, at: float | None = None) -> None:
        self.state.settle(actual - reserved, self._clock(), at)

    def pause_for(self, seconds: float) -> None:
        self.state.pause_until(self._clock() + seconds)


# -- the broker: one quota for every executor of a job ---------------------------------------


class QuotaBroker:
    """Serves ``/admit``, ``/settle`` and ``/pause`` (quotas) and ``/lease`` (concurrency shares) on the
    driver for the endpoints of a registry.

    Wall-clock time (``time.time``) is the shared clock: executors of one job run on machines
    whose clocks agree far better than a quota window.
    """

    def __init__(self, endpoints: list[EndpointConfig], host: str = "127.0.0.1") -> None:
        self.states: dict[str, QuotaState] = {}
        self.leases = ConcurrencyLeases()
        """Per endpoint, the concurrency slots each worker sending to it holds (``share``)."""
        for endpoint in endpoints:
            limits = QuotaLimits.of(endpoint)
            if limits is not None:
                self.states[endpoint.name] = QuotaState(limits)
        broker = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # The head and the body go out in two writes: with Nagle's algorithm the body waited
            # for the client's delayed ACK, 40 ms on every broker call (quota admission, leases).
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:  # no per-request logging
                pass

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("content-length", 0))
                try:
                    msg = json.loads(self.rfile.read(length))
                    reply = broker.handle(self.path, msg)
                    status = 200
                except (ValueError, KeyError) as exc:
                    reply, status = {"error": str(exc)}, 400
                data = json.dumps(reply).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the worker went away (its executor ended)
                    self.close_connection = True

        self._server = ThreadingHTTPServer((host, 0), Handler)
        self._server.daemon_threads = True
        self.address: tuple[str, int] = self._server.server_address[:2]  # type: ignore[assignment]
        self._thread = threading.Thread(target=self._server.serve_forever, name="ai-query-quota-broker", daemon=True)
        self._thread.start()

    def handle(self, path: str, msg: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        if path == "/lease":
            ceiling = msg.get("ceiling")
            return self.leases.lease(str(msg["endpoint"]), str(msg["worker"]), int(msg["total"]), active=bool(msg["active"]),
                                     held=int(msg.get("held", 0)), seq=int(msg.get("seq", 0)),
                                     ceiling=None if ceiling is None else int(ceiling), grant=bool(msg.get("grant", True)),
                                     ttl_s=float(msg.get("ttl_s", 10.0)), wait_s=float(msg.get("wait_s", 0.0)),
                                     overloads=int(msg.get("overloads", 0)),
                                     want=None if msg.get("want") is None else int(msg["want"]),
                                     overloads_seen=None if msg.get("overloads_seen") is None else int(msg["overloads_seen"]))
        state = self.states.get(msg["endpoint"])
        if state is None:
            return {"wait_s": 0.0}
        if path == "/admit":
            return {"wait_s": state.try_admit(int(msg.get("requests", 1)), float(msg.get("tokens", 0)), now), "at": now}
        if path == "/settle":
            at = msg.get("at")
            state.settle(float(msg["token_delta"]), now, None if at is None else float(at))
            return {}
        if path == "/pause":
            state.pause_until(now + float(msg["seconds"]))
            return {}
        raise KeyError(f"unknown broker path {path}")

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def post_json(url: str, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
    """POST ``msg`` to the driver's broker and return its JSON answer (blocking; run it off the loop).

    Raises the transport's ``TransportError``s, and a ``TransportError`` for an answer other than 200.
    """
    response = request_blocking(Request.json("POST", url, msg, timeout=timeout))
    if response.status_code != 200:
        raise TransportError(f"the quota broker at {url} answered HTTP {response.status_code}")
    return json.loads(response.content)


class BrokeredQuota:
    """An endpoint's quota leased from the driver's broker; a static share if it cannot be reached."""

    def __init__(self, endpoint: str, address: tuple[str, int], fallback: LocalQuota, *,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, timeout_s: float = 10.0) -> None:
        self.endpoint = endpoint
        self.url = f"http://{address[0]}:{address[1]}"
        self.fallback = fallback
        self._sleep = sleep
        self._timeout = timeout_s
        self.broker_failed = False

    def _post(self, path: str, msg: dict[str, Any]) -> dict[str, Any]:
        return post_json(self.url + path, msg, self._timeout)

    async def _call(self, path: str, msg: dict[str, Any]) -> dict[str, Any] | None:
        """The broker's answer; ``None`` once it is known to be unreachable.

        A refused, broken or refusing connection counts as unreachable at once. A slow answer on
        a busy driver is retried (the broker may already have granted it, and falling back then
        would admit the request twice), but through tenacity and bounded: after
        ``BROKER_ATTEMPTS`` timeouts the broker counts as unreachable too.
        """
        if self.broker_failed:
            return None
        loop = asyncio.get_running_loop()
        retrying = AsyncRetrying(retry=retry_if_exception_type(TransportTimeoutError), stop=stop_after_attempt(BROKER_ATTEMPTS),
                                 wait=wait_exponential_jitter(initial=0.05, max=1.0), sleep=self._sleep, reraise=True)
        try:
            async for attempt in retrying:
                with attempt:
                    return await loop.run_in_executor(None, self._post, path, msg)
        except (TransportError, ValueError):  # ValueError: an answer that is not JSON
            self.broker_failed = True  # from now on this process keeps to its static share
        return None

    async def admit(self, tokens: float) -> float:
        msg = {"endpoint": self.endpoint, "requests": 1, "tokens": tokens}
        while True:
            reply = await self._call("/admit", msg)
            if reply is None:
                return await self.fallback.admit(tokens)
            wait = float(reply.get("wait_s", 0.0))
            if wait <= 0:
                return float(reply.get("at", 0.0))
            await self._sleep(min(wait, 5.0))

    def _send_later(self, path: str, msg: dict[str, Any]) -> None:
        """Fire and forget (off the event loop): settling and pausing need no answer."""
        def send() -> None:
            try:
                self._post(path, msg)
            except (TransportError, ValueError):
                self.broker_failed = True

        try:
            asyncio.get_running_loop().run_in_executor(None, send)
        except RuntimeError:  # no loop: called from plain code
            send()

    def settle(self, reserved: float, actual: float, at: float | None = None) -> None:
        if self.broker_failed:
            self.fallback.settle(reserved, actual)  # ``at`` is the broker's stamp, not the fallback's
        elif actual != reserved:
            self._send_later("/settle", {"endpoint": self.endpoint, "token_delta": actual - reserved, "at": at})

    def pause_for(self, seconds: float) -> None:
        self.fallback.pause_for(seconds)
        if not self.broker_failed:
            self._send_later("/pause", {"endpoint": self.endpoint, "seconds": seconds})
