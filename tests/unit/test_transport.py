"""The transport seam: requests as the client builds them, failures as rows read them, the error
table and the proxy rules; the shipped client over ``MockTransport``, nothing patched."""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import ssl
import threading

import aiohttp
import httptools
import pytest

from ai_query import AIQueryClient, __version__
from ai_query.limits.quota import BROKER_ATTEMPTS, BrokeredQuota, LocalQuota, QuotaLimits
from ai_query.transport import (
    USER_AGENT,
    ConnectFailedError,
    ConnectionLostError,
    MockTransport,
    Request,
    Response,
    TransportTimeoutError,
    make_transport,
)
from ai_query.transport._errors_table import transport_error
from ai_query.transport._proxies import proxy_for

from .fakes import chat_body, json_response, registry

URL = "http://api.test:8080/v1/chat/completions"


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("AIQ_SECRET_TEST_KEY", "sk-test")


def test_a_json_request_is_compact_utf8_with_lower_case_names_and_our_user_agent():
    request = Request.json("POST", URL, {"messages": ["héllo"], "t": 0.5}, headers={"Authorization": "Bearer k"}, timeout=3)
    assert request.content == '{"messages":["héllo"],"t":0.5}'.encode()
    assert request.headers == {"user-agent": f"ai-query/{__version__}", "accept": "*/*", "authorization": "Bearer k",
                               "content-type": "application/json"}
    assert USER_AGENT == f"ai-query/{__version__}" and request.timeout == 3
    assert Request("GET", URL, headers={"User-Agent": "mine"}).headers["user-agent"] == "mine"


def test_the_client_sends_what_the_provider_built_through_the_transport():
    seen: list[Request] = []

    async def handler(request: Request) -> Response:  # an async handler, as a slow server would be
        seen.append(request)
        return json_response(200, chat_body("hi"))

    client = AIQueryClient(registry(), transport=MockTransport(handler))
    [result] = asyncio.run(client.amap("fake", ["x"], {"max_tokens": 5}))
    [request] = seen
    assert result.value == "hi"
    assert (request.method, request.url, request.timeout) == ("POST", "http://fake.test/v1/chat/completions", 120.0)
    assert request.headers["authorization"] == "Bearer sk-test" and request.headers["user-agent"] == USER_AGENT
    assert json.loads(request.content)["messages"] == [{"role": "user", "content": "x"}]


@pytest.mark.parametrize("error, row_error", [
    (TransportTimeoutError("no answer within 120 s"), "timed out after 120 s waiting for 'fake' (gave up after 1 attempt)"),
    (ConnectionLostError("the connection to http://fake.test closed before the answer was complete"),
     "connection lost calling 'fake': the connection to http://fake.test closed before the answer was complete (gave up after 1 attempt)"),
    (ConnectFailedError("cannot connect to http://fake.test: Connection refused"),
     "connection error calling 'fake': cannot connect to http://fake.test: Connection refused (gave up after 1 attempt)"),
])
def test_transport_errors_become_row_errors_with_their_text(error, row_error):
    def handler(request: Request) -> Response:
        raise error

    client = AIQueryClient(registry(max_attempts=1), transport=MockTransport(handler))
    [result] = asyncio.run(client.amap("fake", ["x"]))
    assert (result.status, result.error, result.status_code) == ("error", row_error, None)


def test_the_mock_refuses_what_no_transport_returns():
    transport = MockTransport(lambda request: {"status": 200})
    with pytest.raises(TypeError, match="returned dict, not a transport Response"):
        asyncio.run(transport.send(Request("GET", URL)))


def _refused() -> OSError:
    return ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed ('10.0.0.1', 8080)")


def _connector_error(os_error: OSError) -> aiohttp.ClientConnectorError:
    key = type("Key", (), {"host": "api.test", "port": 8080, "ssl": None})()
    return aiohttp.ClientConnectorError(key, os_error)


def _untrusted() -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    exc.verify_message = "self-signed certificate"
    return exc


@pytest.mark.parametrize("make, connecting, error, text", [
    (lambda: TimeoutError(), False, TransportTimeoutError, "no answer within 2.5 s"),
    (lambda: aiohttp.ServerTimeoutError("Timeout on reading data from socket"), False, TransportTimeoutError, "no answer within 2.5 s"),
    (lambda: _connector_error(_refused()), False, ConnectFailedError, "cannot connect to http://api.test:8080: Connection refused"),
    (_refused, True, ConnectFailedError, "cannot connect to http://api.test:8080: Connection refused"),
    (lambda: socket.gaierror(-2, "Name or service not known"), True, ConnectFailedError,
     "cannot connect to http://api.test:8080: Name or service not known"),
    (_untrusted, True, ConnectFailedError, "cannot connect to http://api.test:8080: TLS certificate not trusted (self-signed certificate)"),
    (lambda: aiohttp.ServerDisconnectedError(), False, ConnectionLostError,
     "the connection to http://api.test:8080 closed before the answer was complete"),
    (lambda: ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), False, ConnectionLostError,
     "the connection to http://api.test:8080 closed before the answer was complete"),
    (lambda: aiohttp.ClientPayloadError("Response payload is not completed"), False, ConnectionLostError,
     "the connection to http://api.test:8080 closed before the answer was complete"),
    (lambda: httptools.HttpParserInvalidStatusError("invalid status"), False, ConnectionLostError,
     "the answer from http://api.test:8080 is not valid HTTP/1.1"),
    (lambda: aiohttp.InvalidURL("ftp://x"), False, ConnectFailedError,
     "cannot send to 'http://api.test:8080': only http:// and https:// URLs with a host"),
])
def test_the_error_table(make, connecting, error, text):
    mapped = transport_error(make(), URL, 2.5, connecting=connecting)
    assert type(mapped) is error and str(mapped) == text
    mine = ConnectionLostError("already ours")
    assert transport_error(mine, URL, 2.5) is mine


def test_proxies_from_the_environment_loopback_exempt(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert proxy_for("https://api.test/v1") is None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    monkeypatch.setenv("HTTP_PROXY", "http://plain.corp:3128")
    assert proxy_for("https://api.test/v1") == "http://proxy.corp:3128"
    assert proxy_for("http://api.test/v1") == "http://plain.corp:3128"
    for loopback in ("http://127.0.0.1:8000/v1", "http://localhost:8000/v1", "http://[::1]:8000/v1", "http://127.9.9.9/"):
        assert proxy_for(loopback) is None
    assert proxy_for("http://127.0.0.1:8000/v1", "http://mine:1") == "http://mine:1"  # configured: loopback too
    monkeypatch.setenv("NO_PROXY", "api.test,.internal")
    assert proxy_for("https://api.test/v1") is None and proxy_for("https://x.internal/v1") is None
    assert proxy_for("https://other.test/v1") == "http://proxy.corp:3128"
    assert proxy_for("https://api.test/v1", "http://mine:1") is None  # NO_PROXY exempts a configured proxy too


def test_make_transport_names_the_kinds():
    with pytest.raises(ValueError, match="transport kind is 'httpx'; use one of 'aiohttp', 'httptools'"):
        make_transport("httpx")  # type: ignore[arg-type]


class SilentBroker:
    """A TCP listener on 127.0.0.1 that accepts and never answers: a driver too busy to reply."""

    def __enter__(self) -> "SilentBroker":
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.accepted: list[socket.socket] = []
        self.address = self.sock.getsockname()
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def _accept(self) -> None:
        while True:
            try:
                self.accepted.append(self.sock.accept()[0])
            except OSError:
                return

    def __exit__(self, *exc) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


def test_a_broker_that_never_answers_is_retried_a_bounded_number_of_times_then_left():
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    async def main(address):
        fallback = LocalQuota(QuotaLimits(requests_per_minute=100))
        quota = BrokeredQuota("e", address, fallback, sleep=sleep, timeout_s=0.05)
        await quota.admit(10)
        return quota

    with SilentBroker() as broker:
        quota = asyncio.run(main(broker.address))
        assert quota.broker_failed
        assert len(broker.accepted) == BROKER_ATTEMPTS  # one try per attempt, each timed out, then the static share
    assert len(waits) == BROKER_ATTEMPTS - 1 and all(0 <= w <= 1.0 for w in waits)

