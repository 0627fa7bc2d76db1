"""The one table from the libraries' exceptions to the core's transport errors.

Each transport catches whatever its library raises and hands it to ``transport_error``; the
first row below whose types match decides the core error, and the core error's text is
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
from urllib.parse import urlsplit

from .._errors import ConnectFailedError, ConnectionLostError, TransportError, TransportTimeoutError


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


def transport_error(exc: BaseException, url: str, timeout: float | None, *, connecting: bool = False) -> TransportError:
    """The core's error for ``exc``, raised while sending to ``url``; raise it ``from exc``."""
    import aiohttp
    import httptools

    if isinstance(exc, TransportError):
        return exc
    origin = origin_of(url)
    if isinstance(exc, (TimeoutError, aiohttp.ServerTimeoutError)):  # before OSError: TimeoutError is one
        return TransportTimeoutError("no answer within " + (f"{timeout:g} s" if timeout is not None else "the timeout"))
    if isinstance(exc, aiohttp.ClientConnectorError) or (connecting and isinstance(exc, (aiohttp.ClientError, OSError))):
        cause = getattr(exc, "certificate_error", None) or getattr(exc, "os_error", None) or exc
        return ConnectFailedError(f"cannot connect to {origin}: {reason_of(cause)}")
    if isinstance(exc, (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError)):
        return ConnectFailedError(f"cannot send to {origin!r}: only http:// and https:// URLs with a host")
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        return ConnectFailedError(f"cannot connect to {origin}: the proxy answered {getattr(exc, 'status', '?')}")
    if isinstance(exc, (aiohttp.ClientResponseError, httptools.HttpParserError)):
        return ConnectionLostError(f"the answer from {origin} is not valid HTTP/1.1")
    if isinstance(exc, (aiohttp.ClientError, OSError)):
        return ConnectionLostError(f"the connection to {origin} closed before the answer was complete")
    return ConnectionLostError(f"the exchange with {origin} failed: {type(exc).__name__}")
