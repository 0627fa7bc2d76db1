"""What a transport carries: a ``Request`` (method, URL, headers, body, timeout) and a ``Response``
(status, headers, body), and the ``Transport`` protocol that turns one into the other.

Both are plain slotted objects, not httpx's models: building and reading them is on the hot
path of every row and every served request. Header names are lower case (HTTP/1.1 names are
case-insensitive), so ``headers["retry-after"]`` reads the same whatever the sender wrote.
Every request says who sends it (``user-agent: ai-query/<version>``) unless the caller says so
itself. JSON bodies are encoded one way, by msgspec: compact UTF-8.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, runtime_checkable

import msgspec

from .._version import __version__

USER_AGENT = f"ai-query/{__version__}"
_ENCODER = msgspec.json.Encoder()


class Request:
    """One HTTP request: ``timeout`` bounds the whole exchange (connect, send, answer), in seconds."""

    __slots__ = ("method", "url", "headers", "content", "timeout")

    def __init__(self, method: str, url: str, *, headers: Mapping[str, str] | None = None, content: bytes = b"",
                 timeout: float | None = None) -> None:
        self.method = method
        self.url = url
        self.headers = {"user-agent": USER_AGENT, "accept": "*/*"}
        for name, value in (headers or {}).items():
            self.headers[name.lower()] = value
        self.content = content
        self.timeout = timeout

    @classmethod
    def json(cls, method: str, url: str, body: Any, *, headers: Mapping[str, str] | None = None,
             timeout: float | None = None) -> "Request":
        """A request whose body is ``body`` as JSON (msgspec: compact UTF-8)."""
        request = cls(method, url, headers=headers, content=_ENCODER.encode(body), timeout=timeout)
        request.headers.setdefault("content-type", "application/json")
        return request

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.url}>"


class Response:
    """One HTTP answer, its body read whole and decoded of any ``content-encoding``."""

    __slots__ = ("status_code", "headers", "content")

    def __init__(self, status_code: int, *, headers: Mapping[str, str] | None = None, content: bytes = b"") -> None:
        self.status_code = status_code
        self.headers: Mapping[str, str] = headers if headers is not None else {}
        self.content = content

    def json(self) -> Any:
        return msgspec.json.decode(self.content)

    def __repr__(self) -> str:
        return f"<Response {self.status_code}>"


def add_header(headers: dict[str, str], name: bytes, value: bytes) -> None:
    """Names in lower case, a repeated header joined to the earlier value by ", " (RFC 9110)."""
    key, text = name.decode("latin-1").lower(), value.decode("latin-1")
    old = headers.get(key)
    headers[key] = text if old is None else f"{old}, {text}"


@runtime_checkable
class Transport(Protocol):
    """Sends a request and returns its answer, or raises a ``TransportError`` (never a library's own)."""

    async def send(self, request: Request) -> Response: ...

    async def aclose(self) -> None: ...
