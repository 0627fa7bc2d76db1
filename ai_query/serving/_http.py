"""The serving endpoint's HTTP client to backends: keep-alive HTTP/1.1 of its own, in httpx's shape.

``EndpointClient`` in the batch tasks sends through aiohttp directly (``ai_query._http``).
Per served request, httpx's request and response models cost about as much CPU as the rest of
the server together, and aiohttp's client machinery (sessions, connectors, payload objects,
timeouts, stream readers) still about 0.25 ms of 0.55 ms. The server therefore gives the same
``EndpointClient`` a ``DirectHTTPClient``: the one method it calls (``request(method, url, json=,
headers=, timeout=)``), the request head and body written at once on a kept-alive connection,
the answer parsed by ``httptools`` (uvicorn's parser) into ``status_code`` / ``headers`` /
``content``, and failures raised as the httpx exceptions the client already maps to retries (a
timeout as ``httpx.ReadTimeout`` caused by the ``TimeoutError``, a refused or reset connection as
``httpx.ConnectError``). Everything above it (provider adapters, retries, concurrency, parsing)
is the batch path's own code. The body is encoded as httpx encodes ``json=`` (compact UTF-8),
with msgspec (floats may be spelled ``1e-7`` where httpx writes ``1e-07``: the same values).
``ai-query serve --http-client httpx`` uses httpx instead.
"""

from __future__ import annotations

import asyncio
import zlib
from collections import deque
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import urlsplit

import httpx

from .._http import DirectResponse
from ._json import dumps


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: a request written, its answer parsed by httptools."""

    def __init__(self) -> None:
        import httptools

        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.waiter: asyncio.Future[None] | None = None
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.headers_done = False
        self.keep_alive = False

    def begin(self, waiter: asyncio.Future[None]) -> None:
        self.waiter = waiter
        self.headers = {}
        self.body = []
        self.headers_done = False

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        import httptools

        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._finish(httpx.RemoteProtocolError(f"malformed HTTP response: {exc}"))
            self.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        if self.headers_done and "content-length" not in self.headers and "transfer-encoding" not in self.headers:
            self.keep_alive = False
            self._finish(None)  # an answer delimited by the end of the connection
        else:
            self._finish(ConnectionResetError(f"the server closed the connection{f': {exc}' if exc else ''}"))

    # -- httptools callbacks ------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        old = self.headers.get(key)
        self.headers[key] = text if old is None else f"{old}, {text}"  # as httpx's Headers.get joins repeats

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        self._finish(None)

    def _finish(self, exc: BaseException | None) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


@dataclass(frozen=True)
class _Target:
    key: tuple[str, str, int]
    host_line: bytes
    path: str


class DirectHTTPClient:
    """``httpx.AsyncClient.request`` for JSON bodies on keep-alive HTTP/1.1 connections of its own.

    The least a backend call needs and no more: one connection per request in flight, kept
    open for the next; the request written at once; the answer parsed by ``httptools`` (uvicorn's
    parser). No redirects followed (as httpx), no proxies (as ``trust_env=False``), TLS for
    ``https`` URLs with the system's default context.
    """

    def __init__(self, max_connections: int = 2048) -> None:
        self.max_connections = max_connections
        self._in_use = 0
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._targets: dict[str, _Target] = {}
        self._ssl: Any = None

    def _target(self, url: str) -> _Target:
        target = self._targets.get(url)
        if target is None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise httpx.UnsupportedProtocol(f"cannot send to {url!r}: only http:// and https:// URLs")
            port = parts.port or (443 if parts.scheme == "https" else 80)
            host = parts.netloc.rpartition("@")[2]
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            target = self._targets[url] = _Target((parts.scheme, parts.hostname, port), f"host: {host}\r\n".encode("latin-1"), path)
        return target

    async def request(self, method: str, url: str, *, json: Any = None, headers: Mapping[str, str] | None = None,
                      timeout: float | None = None) -> DirectResponse:
        target = self._target(url)
        # compact UTF-8 like httpx 0.28's ``json=``: the batch path's values (float spellings may differ)
        body = dumps(json) if json is not None else b""
        lines = [f"{method} {target.path} HTTP/1.1\r\n".encode("latin-1"), target.host_line, b"accept: */*\r\n"]
        for name, value in (headers or {}).items():
            if "\n" in value or "\r" in value or "\n" in name or "\r" in name:
                raise httpx.LocalProtocolError(f"header {name!r} has a line break")
            try:
                lines.append(f"{name}: {value}\r\n".encode("latin-1"))
            except UnicodeEncodeError:
                raise httpx.LocalProtocolError(f"header {name!r} has characters HTTP headers cannot carry") from None
        lines.append(b"content-length: %d\r\n\r\n" % len(body))
        lines.append(body)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        try:
            return await self._exchange(target, lines, loop, deadline)
        except TimeoutError as exc:  # before OSError: it is one
            raise httpx.ReadTimeout(f"no answer within {timeout} s") from exc
        except OSError as exc:  # refused, reset, closed, DNS, TLS
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc

    async def _exchange(self, target: _Target, lines: list[bytes], loop: asyncio.AbstractEventLoop,
                        deadline: float | None) -> DirectResponse:
        # A deadline timer on the answer's future, not ``asyncio.timeout``: the same total timeout
        # at a third of the cost (a served request's hot path).
        while self._in_use >= self.max_connections:
            slot = loop.create_future()
            self._slot_waiters.append(slot)
            await asyncio.wait_for(slot, None if deadline is None else max(0.0, deadline - loop.time()))
        self._in_use += 1
        try:
            conn = self._idle_connection(target.key)
            if conn is None:
                connecting = self._connect(target.key)
                conn = await (connecting if deadline is None else asyncio.wait_for(connecting, max(0.0, deadline - loop.time())))
            waiter = loop.create_future()
            conn.begin(waiter)
            expiry = None if deadline is None else loop.call_at(deadline, _expire, waiter)
            try:
                assert conn.transport is not None
                conn.transport.writelines(lines)
                await waiter
            except BaseException:  # failed, timed out or cancelled mid-answer: the connection is spent
                self._discard(conn)
                raise
            finally:
                if expiry is not None:
                    expiry.cancel()
            response = DirectResponse(conn.status, conn.headers, _decoded(conn.headers, b"".join(conn.body)))
            if conn.keep_alive and not conn.closed:
                self._idle.setdefault(target.key, []).append(conn)
            else:
                self._discard(conn)
            return response
        finally:
            self._in_use -= 1
            while self._slot_waiters:
                slot = self._slot_waiters.popleft()
                if not slot.done():
                    slot.set_result(None)
                    break

    def _idle_connection(self, key: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
            self._open.discard(conn)
        return None

    async def _connect(self, key: tuple[str, str, int]) -> _Connection:
        scheme, host, port = key
        context = None
        if scheme == "https":
            if self._ssl is None:
                import ssl

                self._ssl = ssl.create_default_context()
            context = self._ssl
        _, conn = await asyncio.get_running_loop().create_connection(_Connection, host, port, ssl=context)
        self._open.add(conn)
        return conn

    def _discard(self, conn: _Connection) -> None:
        conn.close()
        self._open.discard(conn)

    async def aclose(self) -> None:
        for conn in list(self._open):
            self._discard(conn)
        self._idle.clear()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


def _decoded(headers: Mapping[str, str], content: bytes) -> bytes:
    """The body without its ``content-encoding`` (none is asked for; a server may send one anyway)."""
    encoding = headers.get("content-encoding", "").strip().lower()
    if encoding in ("", "identity") or not content:
        return content
    try:
        if encoding == "gzip":
            return zlib.decompress(content, 16 + zlib.MAX_WBITS)
        if encoding == "deflate":
            try:
                return zlib.decompress(content)
            except zlib.error:
                return zlib.decompress(content, -zlib.MAX_WBITS)
    except zlib.error as exc:  # a broken answer: retried like a broken connection
        raise httpx.TransportError(f"the {encoding} answer does not decompress: {exc}") from exc
    raise httpx.TransportError(f"the answer is encoded with {encoding!r}, which this client does not decode")
