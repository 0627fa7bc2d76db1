"""The serving endpoint's HTTP client to backends: aiohttp directly, in httpx's shape.

``EndpointClient`` (the batch path) sends through ``httpx.AsyncClient`` on the aiohttp transport;
per request, httpx's request and response models cost about as much CPU as the rest of the
server together (profiled: ~0.35 ms of ~1.3 ms). The server therefore gives the same
``EndpointClient`` this object instead: the one method it calls (``request(method, url, json=,
headers=, timeout=)``), the answer as ``status_code`` / ``headers`` / ``content``, and aiohttp's failures raised as
the httpx exceptions the client already maps to retries (a timeout as ``httpx.ReadTimeout``
caused by the ``asyncio.TimeoutError``, a reset as ``httpx.ConnectError``). Everything above it —
provider adapters, retries, concurrency, parsing — is the batch path's own code. The body is
encoded as httpx encodes ``json=`` (compact UTF-8), with msgspec (floats may be spelled ``1e-7``
where httpx writes ``1e-07``: the same values).
``ai-query serve --http-client httpx`` uses httpx instead.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Mapping

import httpx

from ._json import dumps


@dataclass
class DirectResponse:
    status_code: int
    headers: Mapping[str, str]
    content: bytes


class DirectAiohttpClient:
    """``httpx.AsyncClient.request`` for JSON bodies, on one aiohttp session (made on first use, in the running loop)."""

    def __init__(self, max_connections: int = 2048) -> None:
        self.max_connections = max_connections
        self._session: Any = None
        self._timeouts: dict[float | None, Any] = {}

    def _open(self) -> Any:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=self.max_connections, ttl_dns_cache=300)
        # No cookies: backends are APIs, and a jar costs a lookup per request and per answer.
        self._session = aiohttp.ClientSession(connector=connector, trust_env=False, skip_auto_headers=("User-Agent",),
                                              cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def request(self, method: str, url: str, *, json: Any = None, headers: Mapping[str, str] | None = None,
                      timeout: float | None = None) -> DirectResponse:
        import aiohttp

        session = self._session or self._open()
        # compact UTF-8 like httpx 0.28's ``json=``: the batch path's values (float spellings may differ)
        body = dumps(json)
        try:
            async with session.request(method, url, data=body, headers=headers,
                                       timeout=self._timeout(timeout)) as response:
                content = await response.read()
                return DirectResponse(response.status, response.headers, content)
        except asyncio.TimeoutError as exc:
            raise httpx.ReadTimeout(f"no answer within {timeout} s") from exc
        except aiohttp.ClientConnectionError as exc:
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
        except aiohttp.ClientError as exc:
            raise httpx.TransportError(str(exc) or type(exc).__name__) from exc

    def _timeout(self, seconds: float | None) -> Any:
        timeout = self._timeouts.get(seconds)
        if timeout is None:
            import aiohttp

            timeout = self._timeouts[seconds] = aiohttp.ClientTimeout(total=seconds)
        return timeout

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

