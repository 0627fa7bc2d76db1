"""Every production transport against raw HTTP servers on 127.0.0.1: one suite, each test run per transport.

Each server answers with exact bytes, so the suite covers what real backends do on the wire:
kept-alive connections, chunked and close-delimited bodies, repeated headers, gzip, a server
closing an idle connection, resets, malformed answers and silence, TLS with a certificate made
here, and an HTTP proxy (``CONNECT`` tunnels and forwarded requests) on 127.0.0.1. Every failure
must arrive as the core's transport error with the same text whichever transport carried it.
"""

from __future__ import annotations

import asyncio
import datetime
import gzip
import ipaddress
import json
import ssl
from pathlib import Path

import pytest

from ai_query import __version__
from ai_query.transport import (
    TRANSPORT_KINDS,
    ConnectFailedError,
    ConnectionLostError,
    Request,
    TransportTimeoutError,
    make_transport,
)

from tests.raw_wire import RawServer, answer, fault, ok

pytestmark = pytest.mark.integration


@pytest.fixture(params=TRANSPORT_KINDS)
def kind(request, monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    return request.param


def run(coro):
    return asyncio.run(coro)


def post(url: str, body=None, timeout: float = 5, **headers: str) -> Request:
    return Request.json("POST", url, {} if body is None else body, headers=headers, timeout=timeout)


def test_requests_are_well_formed_and_connections_are_kept_alive(kind):
    async def handler(request, writer):
        writer.write(answer(200, b'{"ok": 1}', "x-request-id: r1", "set-cookie: a=1", "set-cookie: b=2"))
        await writer.drain()

    async def main():
        transport = make_transport(kind)
        async with RawServer(handler) as server:
            responses = [await transport.send(post(server.url + "?x=1", {"messages": ["héllo"], "t": 0.5}, authorization="Bearer k"))
                         for _ in range(3)]
            await transport.aclose()
            return server, responses

    server, responses = run(main())
    assert server.connections == 1  # one connection for three requests
    head, _, body = server.requests[0].partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /v1/chat?x=1 HTTP/1.1"
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    assert headers["content-type"] == "application/json" and headers["authorization"] == "Bearer k"
    assert headers["content-length"] == str(len(body)) and headers["host"].startswith("127.0.0.1:")
    assert headers["user-agent"] == f"ai-query/{__version__}"
    assert json.loads(body) == {"messages": ["héllo"], "t": 0.5} and b" " not in body  # compact UTF-8 (msgspec)
    r = responses[-1]
    assert (r.status_code, r.content, r.headers["x-request-id"], r.headers["set-cookie"]) == (200, b'{"ok": 1}', "r1", "a=1, b=2")


def test_chunked_close_delimited_and_gzip_bodies(kind):
    payload = json.dumps({"choices": [{"text": "x" * 5000}]}).encode()

    async def handler(request, writer):
        target = request.split(b" ")[1]
        if target.endswith(b"chunked"):
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            for i in range(0, len(payload), 1000):
                part = payload[i:i + 1000]
                writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
        elif target.endswith(b"gzip"):
            writer.write(answer(200, gzip.compress(payload), "content-encoding: gzip"))
        else:  # HTTP/1.0 style: the body ends with the connection
            writer.write(b"HTTP/1.0 200 OK\r\n\r\n" + payload)
            await writer.drain()
            return "close"
        await writer.drain()

    async def main():
        transport = make_transport(kind)
        async with RawServer(handler) as server:
            out = [await transport.send(post(server.url + suffix)) for suffix in ("/chunked", "/gzip", "/close", "/chunked")]
            await transport.aclose()
            return server, out

    server, out = run(main())
    assert all(r.status_code == 200 and r.content == payload for r in out)
    assert server.connections == 2  # the close-delimited answer spent its connection; the others were reused


def test_a_server_closing_an_idle_connection_costs_no_failed_request(kind):
    async def handler(request, writer):
        writer.write(answer(200, b"{}", "connection: close"))
        await writer.drain()
        return "close"

    async def main():
        transport = make_transport(kind)
        async with RawServer(handler) as server:
            codes = []
            for _ in range(3):
                codes.append((await transport.send(post(server.url))).status_code)
                await asyncio.sleep(0.05)
            await transport.aclose()
            return server, codes

    server, codes = run(main())
    assert codes == [200, 200, 200] and server.connections == 3


def test_max_connections_holds_requests_until_a_connection_is_free(kind):
    async def handler(request, writer):
        await asyncio.sleep(0.05)
        writer.write(answer(200, b"{}"))
        await writer.drain()

    async def main():
        transport = make_transport(kind, max_connections=2)
        async with RawServer(handler) as server:
            answers = await asyncio.gather(*(transport.send(post(server.url, timeout=10)) for _ in range(6)))
            await transport.aclose()
            return server, answers

    server, answers = run(main())
    assert [r.status_code for r in answers] == [200] * 6 and server.connections == 2


def test_a_request_giving_up_while_it_waits_for_a_connection_holds_up_nobody(kind):
    async def handler(request, writer):
        await asyncio.sleep(0.2)
        writer.write(answer(200, b"{}"))
        await writer.drain()

    async def main():
        transport = make_transport(kind, max_connections=1)
        async with RawServer(handler) as server:
            first = asyncio.ensure_future(transport.send(post(server.url, timeout=10)))
            await asyncio.sleep(0.05)  # the one connection is taken: the next ones wait
            impatient = asyncio.ensure_future(transport.send(post(server.url, timeout=0.05)))
            cancelled = asyncio.ensure_future(transport.send(post(server.url, timeout=10)))
            last = asyncio.ensure_future(transport.send(post(server.url, timeout=10)))
            await asyncio.sleep(0.01)
            cancelled.cancel()
            outcomes = await asyncio.gather(first, impatient, cancelled, last, return_exceptions=True)
            await transport.aclose()
            return server, outcomes

    server, (first, impatient, cancelled, last) = run(main())
    assert first.status_code == 200 and last.status_code == 200
    assert isinstance(impatient, TransportTimeoutError)
    assert isinstance(cancelled, asyncio.CancelledError)
    assert server.connections == 1


@pytest.mark.parametrize("behaviour, error, text", [
    ("silent", TransportTimeoutError, "no answer within 0.3 s"),
    ("reset", ConnectionLostError, "the connection to {origin} closed before the answer was complete"),
    ("half", ConnectionLostError, "the connection to {origin} closed before the answer was complete"),
    ("garbage", ConnectionLostError, "the answer from {origin} is not valid HTTP/1.1"),
    ("refused", ConnectFailedError, "cannot connect to {origin}: Connection refused"),
])
def test_failures_arrive_as_the_core_errors_with_one_text(kind, behaviour, error, text):
    async def main():
        transport = make_transport(kind)
        async with RawServer(lambda request, writer: fault(behaviour, request, writer)) as server:
            url = server.url
            if behaviour == "refused":
                server.server.close()
                await server.server.wait_closed()
            with pytest.raises(error) as info:
                await transport.send(post(url, timeout=0.3))
            await transport.aclose()
            return info, f"http://127.0.0.1:{server.port}"

    info, origin = run(main())
    assert str(info.value) == text.format(origin=origin)  # exact: the same words from every transport
    if behaviour == "silent":
        assert isinstance(info.value.__cause__, TimeoutError)


# -- TLS ------------------------------------------------------------------------------------------

def make_certificate(directory: Path, *hosts: str) -> tuple[Path, Path]:
    """A self-signed certificate for ``hosts`` (names or IPs) and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    alt = []
    for host in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


@pytest.fixture
def tls(tmp_path):
    """(server context, client context trusting it) for a certificate naming 127.0.0.1 and upstream.test."""
    cert_file, key_file = make_certificate(tmp_path, "127.0.0.1", "upstream.test")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_file, key_file)
    return server, ssl.create_default_context(cafile=str(cert_file))


def test_https_with_a_trusted_certificate(kind, tls):
    server_context, client_context = tls

    async def main():
        transport = make_transport(kind, ssl_context=client_context)
        async with RawServer(ok, ssl_context=server_context) as server:
            responses = [await transport.send(post(server.url)) for _ in range(2)]
            await transport.aclose()
            return server, responses

    server, responses = run(main())
    assert [(r.status_code, r.content) for r in responses] == [(200, b'{"ok": 1}')] * 2 and server.connections == 1


def test_https_refuses_an_untrusted_certificate(kind, tls):
    server_context, _ = tls

    async def main():
        transport = make_transport(kind)  # the system's trust store: the test's certificate is not in it
        async with RawServer(ok, ssl_context=server_context) as server:
            with pytest.raises(ConnectFailedError) as info:
                await transport.send(post(server.url))
            await transport.aclose()
            return server, info

    server, info = run(main())
    assert str(info.value) == f"cannot connect to https://127.0.0.1:{server.port}: TLS certificate not trusted (self-signed certificate)"
    assert server.requests == []


# -- proxies --------------------------------------------------------------------------------------

class Proxy:
    """An HTTP proxy on 127.0.0.1: ``CONNECT`` tunnels and absolute-form forwarding, names resolved
    through ``hosts`` (so a test can send to a name no DNS knows). ``seen`` keeps each request line."""

    def __init__(self, hosts: dict[str, str]) -> None:
        self.hosts = hosts
        self.seen: list[str] = []

    async def __aenter__(self) -> "Proxy":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ")
            self.seen.append(f"{method} {target}")
            if method == "CONNECT":
                host, _, port = target.rpartition(":")
            else:  # forwarded: the origin server gets the same bytes (servers accept the absolute form)
                netloc = target.split("/")[2]
                host, _, port = netloc.rpartition(":") if ":" in netloc else (netloc, "", "80")
            up_reader, up_writer = await asyncio.open_connection(self.hosts.get(host, host), int(port))
            if method == "CONNECT":
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                up_writer.write(head)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


def test_http_proxy_from_the_environment(kind, monkeypatch):
    async def main():
        async with RawServer(ok) as server, Proxy({"upstream.test": "127.0.0.1"}) as proxy:
            monkeypatch.setenv("HTTP_PROXY", proxy.url)
            transport = make_transport(kind)
            url = f"http://upstream.test:{server.port}/v1/chat"
            first, second = [await transport.send(post(url)) for _ in range(2)]
            await transport.aclose()
            return server, proxy, first, second

    server, proxy, first, second = run(main())
    assert (first.status_code, second.content) == (200, b'{"ok": 1}')
    assert proxy.seen[0] == f"POST http://upstream.test:{server.port}/v1/chat"
    assert server.requests[0].split(b"\r\n", 1)[0].decode().startswith("POST http://upstream.test:")


def test_https_proxy_tunnels_with_connect(kind, tls, monkeypatch):
    server_context, client_context = tls

    async def main():
        async with RawServer(ok, ssl_context=server_context) as server, Proxy({"upstream.test": "127.0.0.1"}) as proxy:
            monkeypatch.setenv("HTTPS_PROXY", proxy.url)
            transport = make_transport(kind, ssl_context=client_context)
            response = await transport.send(post(f"https://upstream.test:{server.port}/v1/chat"))
            await transport.aclose()
            return server, proxy, response

    server, proxy, response = run(main())
    assert (response.status_code, response.content) == (200, b'{"ok": 1}')
    assert proxy.seen == [f"CONNECT upstream.test:{server.port}"]
    assert server.requests[0].startswith(b"POST /v1/chat HTTP/1.1")  # through the tunnel: origin form, end to end TLS


def test_no_proxy_and_loopback_go_direct(kind, monkeypatch):
    async def main():
        async with RawServer(ok) as server, Proxy({"upstream.test": "127.0.0.1"}) as proxy:
            monkeypatch.setenv("HTTP_PROXY", proxy.url)
            transport = make_transport(kind)
            loopback = await transport.send(post(server.url))  # loopback: exempt from an environment proxy
            monkeypatch.setenv("NO_PROXY", "upstream.test")
            with pytest.raises(ConnectFailedError) as info:  # direct, and no DNS knows the name
                await transport.send(post(f"http://upstream.test:{server.port}/v1/chat"))
            await transport.aclose()
            configured = make_transport(kind, proxy=proxy.url)  # a proxy given to the transport applies to loopback too
            through = await configured.send(post(server.url))
            await configured.aclose()
            return server, proxy, loopback, info, through

    server, proxy, loopback, info, through = run(main())
    assert loopback.status_code == 200 and through.status_code == 200
    assert str(info.value).startswith(f"cannot connect to http://upstream.test:{server.port}: ")
    assert proxy.seen == [f"POST {server.url}"]
