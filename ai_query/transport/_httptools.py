"""The transport on httptools: keep-alive HTTP/1.1 connections of its own.

The serving endpoint's default (``ai-query serve --http-client httptools``). Per served request
aiohttp's client machinery (sessions, connectors, payload objects, timeouts, stream readers)
costs about 0.25 ms of 0.55 ms; this transport writes the request head and body at once on a
kept-alive connection and parses the answer with ``httptools`` (uvicorn's parser). It is kept
beside ``AiohttpTransport`` only while ``bench/serving.py`` measures it faster; both pass the
same conformance suite (``tests/integration/test_transport_conformance.py``).

No redirects followed; bodies in ``gzip`` / ``deflate`` decoded (none is asked for, a server may
send one anyway); proxies per ``_proxies.proxy_for`` (``http://`` targets in absolute form,
``https://`` ones through a ``CONNECT`` tunnel); TLS with the system's default context unless
one is given.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import zlib
from dataclasses import dataclass
from typing import Mapping
from urllib.parse import urlsplit

import httptools

from .._errors import ConnectFailedError, ConnectionLostError, TransportError
from ..limits.slots import SlotQueue
from ._errors_table import transport_error
from ._messages import Request, Response, add_header
from ._proxies import proxy_for


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: a request written, its answer parsed by httptools."""

    def __init__(self) -> None:
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
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._finish(exc)
            self.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        if self.headers_done and "content-length" not in self.headers and "transfer-encoding" not in self.headers:
            self.keep_alive = False
            self._finish(None)  # an answer delimited by the end of the connection
        else:
            self._finish(exc if isinstance(exc, OSError) else ConnectionResetError())

    # -- httptools callbacks ------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        add_header(self.headers, name, value)

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
    key: tuple[str, str, int, str | None]
    """Connections are shared by scheme, host, port and the proxy they go through."""
    host_line: bytes
    target: str
    """The request line's target: the path, or the absolute URL when an ``http://`` proxy forwards it."""


class HttptoolsTransport:
    """``send`` on keep-alive HTTP/1.1 connections, one per request in flight, up to ``max_connections``."""

    def __init__(self, max_connections: int = 2048, *, ssl_context: ssl.SSLContext | None = None,
                 proxy: str | None = None) -> None:
        self.max_connections = max_connections
        self.proxy = proxy
        # Requests in flight, at most max_connections; the rest wait their turn (the limiters' queue).
        self._slots = SlotQueue(lambda: self.max_connections)
        self._idle: dict[tuple[str, str, int, str | None], list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._targets: dict[str, _Target] = {}
        self._ssl = ssl_context

    def _target(self, url: str) -> _Target:
        target = self._targets.get(url)
        if target is None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConnectFailedError(f"cannot send to {url!r}: only http:// and https:// URLs with a host")
            port = parts.port or (443 if parts.scheme == "https" else 80)
            host = parts.netloc.rpartition("@")[2]
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            proxy = proxy_for(url, self.proxy)
            if proxy is not None and parts.scheme == "http":
                path = f"http://{host}{path}"  # absolute form: the proxy forwards it
            if len(self._targets) >= 1024:  # URLs that vary per request: no point keeping them
                self._targets.clear()
            target = self._targets[url] = _Target((parts.scheme, parts.hostname, port, proxy),
                                                  f"host: {host}\r\n".encode("latin-1"), path)
        return target

    async def send(self, request: Request) -> Response:
        target = self._target(request.url)
        body = request.content
        lines = [f"{request.method} {target.target} HTTP/1.1\r\n".encode("latin-1"), target.host_line]
        for name, value in request.headers.items():
            if "\n" in value or "\r" in value or "\n" in name or "\r" in name:
                raise TransportError(f"header {name!r} has a line break")
            try:
                lines.append(f"{name}: {value}\r\n".encode("latin-1"))
            except UnicodeEncodeError:
                raise TransportError(f"header {name!r} has characters HTTP headers cannot carry") from None
        lines.append(b"content-length: %d\r\n\r\n" % len(body))
        lines.append(body)
        loop = asyncio.get_running_loop()
        deadline = None if request.timeout is None else loop.time() + request.timeout
        try:
            return await self._exchange(target, lines, loop, deadline)
        except _ConnectFailed as exc:  # refused, DNS, TLS
            cause = exc.__cause__ or exc
            raise transport_error(cause, request.url, request.timeout, connecting=True) from cause
        except (OSError, TransportError, httptools.HttpParserError) as exc:  # reset, closed, timed out, not HTTP
            raise transport_error(exc, request.url, request.timeout) from exc

    async def _exchange(self, target: _Target, lines: list[bytes], loop: asyncio.AbstractEventLoop,
                        deadline: float | None) -> Response:
        # A deadline timer on the answer's future, not ``asyncio.timeout``: the same total timeout
        # at a third of the cost (a served request's hot path).
        if not self._slots.try_take():
            waiting = self._slots.take()
            await (waiting if deadline is None else asyncio.wait_for(waiting, max(0.0, deadline - loop.time())))
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
            response = Response(conn.status, headers=conn.headers, content=_decoded(conn.headers, b"".join(conn.body)))
            if conn.keep_alive and not conn.closed:
                self._idle.setdefault(target.key, []).append(conn)
            else:
                self._discard(conn)
            return response
        finally:
            self._slots.give_back()

    def _idle_connection(self, key: tuple[str, str, int, str | None]) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
            self._open.discard(conn)
        return None

    async def _connect(self, key: tuple[str, str, int, str | None]) -> _Connection:
        scheme, host, port, proxy = key
        context = None
        if scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        loop = asyncio.get_running_loop()
        try:
            if proxy is None:
                _, conn = await loop.create_connection(_Connection, host, port, ssl=context)
            elif scheme == "http":
                proxy_parts = urlsplit(proxy)
                _, conn = await loop.create_connection(_Connection, proxy_parts.hostname, proxy_parts.port or 80)
            else:
                sock = await _tunnel(loop, proxy, host, port)
                _, conn = await loop.create_connection(_Connection, sock=sock, ssl=context, server_hostname=host)
        except TimeoutError:  # an OSError, but the deadline's, not a refusal
            raise
        except OSError as exc:
            raise _ConnectFailed() from exc
        self._open.add(conn)
        return conn

    def _discard(self, conn: _Connection) -> None:
        conn.close()
        self._open.discard(conn)

    async def aclose(self) -> None:
        for conn in list(self._open):
            self._discard(conn)
        self._idle.clear()


class _ConnectFailed(OSError):
    """Marks an ``OSError`` raised before a connection existed (its cause is the real one)."""


async def _tunnel(loop: asyncio.AbstractEventLoop, proxy: str, host: str, port: int) -> socket.socket:
    """A socket to ``host:port`` through the proxy's ``CONNECT`` tunnel (TLS is started on it after)."""
    parts = urlsplit(proxy)
    infos = await loop.getaddrinfo(parts.hostname, parts.port or 80, type=socket.SOCK_STREAM)
    family, type_, proto, _, address = infos[0]
    sock = socket.socket(family, type_, proto)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, address)
        await loop.sock_sendall(sock, f"CONNECT {host}:{port} HTTP/1.1\r\nhost: {host}:{port}\r\n\r\n".encode("latin-1"))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await loop.sock_recv(sock, 4096)
            if not chunk:
                raise ConnectionResetError()
            head += chunk
        status = head.split(b" ", 2)[1:2]
        if status != [b"200"]:
            raise ConnectFailedError(f"cannot connect to https://{host}:{port}: the proxy answered "
                                     f"{status[0].decode('latin-1') if status else '?'}")
        return sock
    except BaseException:
        sock.close()
        raise


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
        raise ConnectionLostError(f"the {encoding} answer does not decompress: {exc}") from exc
    raise ConnectionLostError(f"the answer is encoded with {encoding!r}, which this transport does not decode")

