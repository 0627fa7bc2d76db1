"""Raw-wire HTTP servers on 127.0.0.1 for transport tests: exact bytes, including the faults
real backends commit (silence, a closed connection, half an answer, an answer that is not HTTP)."""

from __future__ import annotations

import asyncio
import ssl
import threading


class RawServer:
    """A TCP server on 127.0.0.1 whose ``handler(request_bytes, writer)`` writes whatever it likes."""

    def __init__(self, handler, ssl_context: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.ssl_context = ssl_context
        self.connections = 0
        self.requests: list[bytes] = []
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> "RawServer":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = self.server.sockets[0].getsockname()[1]
        scheme = "https" if self.ssl_context else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}/v1/chat"
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        for writer in list(self._writers):  # kept-alive connections: their handlers end now, not at loop teardown
            writer.close()
        for _ in range(3):
            await asyncio.sleep(0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next((line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), b"0"))
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                if await self.handler(request, writer) == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


def answer(status: int, body: bytes, *headers: str) -> bytes:
    lines = [f"HTTP/1.1 {status} X", f"content-length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def ok(request, writer):
    writer.write(answer(200, b'{"ok": 1}'))
    await writer.drain()


async def fault(behaviour: str, request, writer):
    """What the fault servers do (also used by the error-parity tests)."""
    if behaviour == "silent":
        await asyncio.sleep(5)
    elif behaviour == "half":  # headers and part of the body, then the end
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"cho")
        await writer.drain()
    elif behaviour == "garbage":
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
    elif behaviour == "malformed":  # a well-formed answer whose body is not JSON
        writer.write(answer(200, b"{not json", "content-type: application/json"))
        await writer.drain()
        return None
    return "close"


async def fault_by_path(request, writer):
    """``fault`` named by the request path's first segment (``POST /reset/v1/chat/completions``)."""
    return await fault(request.split(b" ")[1].split(b"/")[1].decode(), request, writer)  # "reset": the request read, the connection closed without a word


class ThreadedRawServer:
    """A ``RawServer`` on a loop thread of its own, for synchronous tests (Spark, a served endpoint)."""

    def __init__(self, handler) -> None:
        self.handler = handler

    def __enter__(self) -> "ThreadedRawServer":
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="raw-wire-server", daemon=True)
        self.thread.start()
        self.raw = RawServer(self.handler)
        asyncio.run_coroutine_threadsafe(self.raw.__aenter__(), self.loop).result(10)
        self.port = self.raw.port
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    async def _shutdown(self) -> None:
        await self.raw.__aexit__()
        handlers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]  # e.g. a silent one, asleep
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
