"""The one table from the libraries' exceptions to the core's transport errors.

Each transport catches whatever its library raises and hands it to ``transport_error``; the
first row of ``_table()`` whose types match decides the core error, and the core error's text is
written here, from the URL, the timeout and the OS's reason, never from the library's message.
That is what makes a reset read the same in a Spark row (aiohttp) and in a served response
(httptools)::

    library exception                                        core error              text
    ------------------------------------------------------  ----------------------  ---------------------------------------------
    TransportError (already ours)                           itself
    TimeoutError, aiohttp.ServerTimeoutError                TransportTimeoutError   no answer within {timeout} s
    aiohttp.InvalidURL (not http/https, no host)            ConnectFailedError      cannot send to {origin}: only http:// and https:// URLs
    aiohttp.ClientConnectorError (DNS, refused, TLS, proxy) ConnectFailedError      cannot connect to {origin}: {reason}
    aiohttp.ClientHttpProxyError (CONNECT refused)          ConnectFailedError      cannot connect to {origin}: the proxy answered {status}
    aiohttp.ClientResponseError, httptools.HttpParserError  ConnectionLostError     the answer from {origin} is not valid HTTP/1.1
    aiohttp.ServerDisconnectedError, ClientPayloadError,    ConnectionLostError     the connection to {origin} closed before the answer was complete
      ClientOSError, ConnectionError, OSError (after connecting)
    OSError while connecting (refused, DNS, TLS)            ConnectFailedError      cannot connect to {origin}: {reason}
    any other aiohttp.ClientError                           ConnectionLostError     the connection to {origin} closed before ...

``connecting`` says the failure came before a connection existed (the httptools transport knows;
aiohttp says so by its exception type).
"""

from __future__ import annotations

import os
import ssl
from typing import Callable
from urllib.parse import urlsplit

from .._errors import ConnectFailedError, ConnectionLostError, TransportError, TransportTimeoutError

_Row = tuple[tuple[type[BaseException], ...], Callable[[BaseException, str, "float | None", bool], TransportError]]
_TABLE: list[_Row] | None = None


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}" if parts.netloc else url


def reason_of(exc: BaseException | None) -> str:
    """Why a connection could not be made, in the OS's words (the same whichever library asked)."""
    if exc is None:
        return "no connection"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted ({exc.verify_message or exc.reason})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({exc.reason or type(exc).__name__})"
    errno = getattr(exc, "errno", None)
    if isinstance(exc, OSError) and isinstance(errno, int) and errno > 0:
        return os.strerror(errno)
    if isinstance(exc, OSError) and exc.strerror:  # DNS (negative errno): "Name or service not known"
        return exc.strerror
    return str(exc) or type(exc).__name__


def _not_sendable(exc: BaseException, origin: str, timeout: float | None, connecting: bool) -> TransportError:
    return ConnectFailedError(f"cannot send to {origin!r}: only http:// and https:// URLs with a host")


def _timed_out(exc: BaseException, origin: str, timeout: float | None, connecting: bool) -> TransportError:
    return TransportTimeoutError("no answer within " + (f"{timeout:g} s" if timeout is not None else "the timeout"))


def _not_connected(exc: BaseException, origin: str, timeout: float | None, connecting: bool) -> TransportError:
    cause = getattr(exc, "certificate_error", None) or getattr(exc, "os_error", None) or exc
    return ConnectFailedError(f"cannot connect to {origin}: {reason_of(cause)}")


def _proxy_refused(exc: BaseException, origin: str, timeout: float | None, connecting: bool) -> TransportError:
    return ConnectFailedError(f"cannot connect to {origin}: the proxy answered {getattr(exc, 'status', '?')}")


def _not_http(exc: BaseException, origin: str, timeout: float | None, connecting: bool) -> TransportError:
    return ConnectionLostError(f"the answer from {origin} is not valid HTTP/1.1")


def _lost(exc: BaseException, origin: str, timeout: float | None, connecting: bool) -> TransportError:
    if connecting:
        return _not_connected(exc, origin, timeout, connecting)
    return ConnectionLostError(f"the connection to {origin} closed before the answer was complete")


def _table() -> list[_Row]:
    global _TABLE
    if _TABLE is None:
        import aiohttp
        import httptools

        _TABLE = [
            ((TimeoutError, aiohttp.ServerTimeoutError), _timed_out),  # before OSError: TimeoutError is one
            ((aiohttp.ClientConnectorError,), _not_connected),
            ((aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError), _not_sendable),
            ((aiohttp.ClientHttpProxyError,), _proxy_refused),
            ((aiohttp.ClientResponseError, httptools.HttpParserError), _not_http),
            ((aiohttp.ClientError, OSError), _lost),
        ]
    return _TABLE


def transport_error(exc: BaseException, url: str, timeout: float | None, *, connecting: bool = False) -> TransportError:
    """The core's error for ``exc``, raised while sending to ``url``; raise it ``from exc``."""
    if isinstance(exc, TransportError):
        return exc
    origin = origin_of(url)
    for types, make in _table():
        if isinstance(exc, types):
            return make(exc, origin, timeout, connecting)
    return ConnectionLostError(f"the exchange with {origin} failed: {type(exc).__name__}")

