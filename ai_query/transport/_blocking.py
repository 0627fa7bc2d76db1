"""``request_blocking``: the production transport for plain (non-async) code.

The quota broker client and the local servers' health checks run in threads outside any event
loop. They send through the same transport as every row (same errors, same proxy rules, same
User-Agent), on one private loop thread per process with its own kept-alive connections, made
on first use. Never call it from that loop (it would wait on itself); from any other thread,
including an executor of a running loop, it is safe.
"""

from __future__ import annotations

import asyncio
import atexit
import threading

from ._messages import Request, Response, Transport

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_transport: Transport | None = None


def _running() -> tuple[asyncio.AbstractEventLoop, Transport]:
    global _loop, _transport
    with _lock:
        if _loop is None or _loop.is_closed():
            from ._aiohttp import AiohttpTransport

            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="ai-query-blocking-transport", daemon=True).start()
            _transport = AiohttpTransport(max_connections=64)
            atexit.register(_close, _loop, _transport)
        assert _transport is not None
        return _loop, _transport


def _close(loop: asyncio.AbstractEventLoop, transport: Transport) -> None:
    if loop.is_running():
        try:
            asyncio.run_coroutine_threadsafe(transport.aclose(), loop).result(timeout=2)
        except Exception:  # noqa: BLE001 - exiting: nothing left to tell
            pass
        loop.call_soon_threadsafe(loop.stop)


def request_blocking(request: Request) -> Response:
    """``request``'s answer, waiting in this thread; raises the core's ``TransportError``s.

    ``request.timeout`` bounds the exchange (give one: a broker or a health check that does not
    answer must not hold the caller forever).
    """
    loop, transport = _running()
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:  # the usual case: a plain thread
        running = None
    if running is loop:
        raise RuntimeError("request_blocking was called on its own transport's loop: await the transport instead")
    return asyncio.run_coroutine_threadsafe(transport.send(request), loop).result()
