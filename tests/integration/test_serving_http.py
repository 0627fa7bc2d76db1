"""The serving endpoint's own backend client (``DirectHTTPClient``) against raw HTTP servers on 127.0.0.1.

Each server answers with exact bytes, so the test covers what real backends do on the wire:
kept-alive connections, chunked and close-delimited bodies, repeated headers, gzip, a server
closing an idle connection, resets, malformed answers and silence; every failure must arrive as
the httpx exception ``EndpointClient`` maps to its retry policy.
"""

from __future__ import annotations

import asyncio
import gzip
import json

import httpx
import pytest

from ai_query.serving._http import DirectHTTPClient

pytestmark = pytest.mark.integration


class RawServer:
    """A TCP server on 127.0.0.1 whose ``handler(request_bytes, writer)`` writes whatever it likes."""

    def __init__(self, handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []

    async def __aenter__(self) -> "RawServer":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1/chat"
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next((line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), b"0"))
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                if await self.handler(request, writer) == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def answer(status: int, body: bytes, *headers: str) -> bytes:
    lines = [f"HTTP/1.1 {status} X", f"content-length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def run(coro):
    return asyncio.run(coro)


def test_requests_are_well_formed_and_connections_are_kept_alive():
    async def handler(request, writer):
        writer.write(answer(200, b'{"ok": 1}', "x-request-id: r1", "set-cookie: a=1", "set-cookie: b=2"))
        await writer.drain()

    async def main():
        client = DirectHTTPClient()
        async with RawServer(handler) as server:
            responses = [await client.request("POST", server.url + "?x=1", json={"messages": ["héllo"], "t": 0.5},
                                              headers={"content-type": "application/json", "authorization": "Bearer k"}, timeout=5)
                         for _ in range(3)]
            await client.aclose()
            return server, responses

    server, responses = run(main())
    assert server.connections == 1  # one connection for three requests
    head, _, body = server.requests[0].partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /v1/chat?x=1 HTTP/1.1"
    assert {"content-type: application/json", "authorization: Bearer k", f"content-length: {len(body)}"} <= set(lines[1:])
    assert any(line.lower().startswith("host: 127.0.0.1:") for line in lines)
    assert json.loads(body) == {"messages": ["héllo"], "t": 0.5} and b" " not in body  # compact UTF-8, as httpx's json=
    r = responses[-1]
    assert (r.status_code, r.content, r.headers["x-request-id"], r.headers["set-cookie"]) == (200, b'{"ok": 1}', "r1", "a=1, b=2")


def test_chunked_close_delimited_and_gzip_bodies():
    payload = json.dumps({"choices": [{"text": "x" * 5000}]}).encode()

    async def handler(request, writer):
        kind = request.split(b" ")[1]
        if kind.endswith(b"chunked"):
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            for i in range(0, len(payload), 1000):
                part = payload[i:i + 1000]
                writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
        elif kind.endswith(b"gzip"):
            writer.write(answer(200, gzip.compress(payload), "content-encoding: gzip"))
        else:  # HTTP/1.0 style: the body ends with the connection
            writer.write(b"HTTP/1.0 200 OK\r\n\r\n" + payload)
            await writer.drain()
            return "close"
        await writer.drain()

    async def main():
        client = DirectHTTPClient()
        async with RawServer(handler) as server:
            out = [await client.request("POST", server.url + suffix, json={}, timeout=5) for suffix in ("/chunked", "/gzip", "/close", "/chunked")]
            await client.aclose()
            return server, out

    server, out = run(main())
    assert all(r.status_code == 200 and r.content == payload for r in out)
    assert server.connections == 2  # the close-delimited answer spent its connection; the others were reused


def test_a_server_closing_an_idle_connection_costs_no_failed_request():
    async def handler(request, writer):
        writer.write(answer(200, b"{}", "connection: close"))
        await writer.drain()
        return "close"

    async def main():
        client = DirectHTTPClient()
        async with RawServer(handler) as server:
            codes = []
            for _ in range(3):
                codes.append((await client.request("POST", server.url, json={}, timeout=5)).status_code)
                await asyncio.sleep(0.05)
            await client.aclose()
            return server, codes

    server, codes = run(main())
    assert codes == [200, 200, 200] and server.connections == 3


def test_max_connections_holds_requests_until_a_connection_is_free():
    async def handler(request, writer):
        await asyncio.sleep(0.05)
        writer.write(answer(200, b"{}"))
        await writer.drain()

    async def main():
        client = DirectHTTPClient(max_connections=2)
        async with RawServer(handler) as server:
            answers = await asyncio.gather(*(client.request("POST", server.url, json={}, timeout=10) for _ in range(6)))
            await client.aclose()
            return server, answers

    server, answers = run(main())
    assert [r.status_code for r in answers] == [200] * 6 and server.connections == 2


@pytest.mark.parametrize("behaviour, error, text", [
    ("silent", httpx.ReadTimeout, "no answer within 0.3 s"),
    ("reset", httpx.ConnectError, "closed the connection"),
    ("half", httpx.ConnectError, "closed the connection"),
    ("garbage", httpx.TransportError, "malformed HTTP response"),
    ("refused", httpx.ConnectError, ""),
])
def test_failures_arrive_as_the_httpx_errors_the_retry_policy_knows(behaviour, error, text):
    async def handler(request, writer):
        if behaviour == "silent":
            await asyncio.sleep(5)
        elif behaviour == "half":  # headers and part of the body, then the end
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"cho")
            await writer.drain()
        elif behaviour == "garbage":
            writer.write(b"NOT HTTP AT ALL\r\n\r\n")
            await writer.drain()
        return "close"

    async def main():
        client = DirectHTTPClient()
        async with RawServer(handler) as server:
            url = server.url
            if behaviour == "refused":
                server.server.close()
                await server.server.wait_closed()
            with pytest.raises(error) as info:
                await client.request("POST", url, json={}, timeout=0.3)
            await client.aclose()
            return info

    info = run(main())
    assert text in str(info.value)
    if behaviour == "silent":
        assert isinstance(info.value.__cause__, TimeoutError)  # what EndpointClient counts as a real timeout
