"""One transport: every HTTP request ai-query sends, as a ``Request`` in and a ``Response`` out.

Batch tasks, the serving endpoint, the quota broker client and the local servers' health checks
all send through a ``Transport`` (``send(request) -> Response``, ``aclose()``). Its failures are
the core's own (``ai_query._errors``)::

    TransportError
    ├── ConnectFailedError     no connection: refused, unresolvable, TLS handshake, proxy refused
    ├── ConnectionLostError    a connection closed or broke mid-answer, or the answer was not HTTP
    └── TransportTimeoutError  no complete answer within the request's timeout

mapped from each library's exceptions in one table (``_errors_table``), with texts written there,
so the same reset, timeout or malformed answer reads the same in a Spark row and in a served
response. Implementations:

- ``AiohttpTransport`` (``_aiohttp``): batch tasks, the broker client, health checks.
- ``HttptoolsTransport`` (``_httptools``): the serving endpoint's default, kept while
  ``bench/serving.py`` measures it faster; both pass ``tests/integration/test_transport_conformance.py``.
- ``MockTransport(handler)`` (``_mock``): unit tests, on the same seam, nothing patched.

Proxies come from ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``NO_PROXY``, loopback exempt (``_proxies``).
"""

from __future__ import annotations

from typing import Literal

from .._errors import ConnectFailedError, ConnectionLostError, TransportError, TransportTimeoutError
from ._blocking import request_blocking
from ._mock import MockTransport
from ._messages import USER_AGENT, Request, Response, Transport

TransportKind = Literal["aiohttp", "httptools"]
TRANSPORT_KINDS: tuple[TransportKind, ...] = ("aiohttp", "httptools")


def make_transport(kind: TransportKind = "aiohttp", **options: object) -> Transport:
    """A production transport of ``kind`` (options: ``max_connections``, ``ssl_context``, ``proxy``)."""
    if kind == "aiohttp":
        from ._aiohttp import AiohttpTransport

        return AiohttpTransport(**options)  # type: ignore[arg-type]
    if kind == "httptools":
        from ._httptools import HttptoolsTransport

        return HttptoolsTransport(**options)  # type: ignore[arg-type]
    raise ValueError(f"transport kind is {kind!r}; use one of {', '.join(map(repr, TRANSPORT_KINDS))}")


__all__ = [
    "ConnectFailedError",
    "ConnectionLostError",
    "MockTransport",
    "Request",
    "Response",
    "TRANSPORT_KINDS",
    "Transport",
    "TransportError",
    "TransportKind",
    "TransportTimeoutError",
    "USER_AGENT",
    "make_transport",
    "request_blocking",
]
