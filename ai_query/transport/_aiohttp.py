"""The transport on aiohttp: one session, made on first use in the running loop.

The batch tasks' default. httpx's request and response models cost about as much CPU per
request as everything else of ours together (~35 % of a Spark worker's event loop), and CPU per
request is also the time between an answer and the next request on its slot; so requests go
to aiohttp directly, and what comes back is read whole into a ``Response``. Proxies follow
``_proxies.proxy_for`` (aiohttp's own ``trust_env`` is off: it would not exempt loopback).
"""

from __future__ import annotations

import ssl
from typing import Any

from ._errors_table import transport_error
from ._messages import Request, Response, add_header
from ._proxies import proxy_for


class AiohttpTransport:
    """``send`` over one ``aiohttp.ClientSession`` with up to ``max_connections`` connections."""

    def __init__(self, max_connections: int = 2048, *, ssl_context: ssl.SSLContext | None = None,
                 proxy: str | None = None) -> None:
        self.max_connections = max_connections
        self.ssl_context = ssl_context
        self.proxy = proxy
        self._session: Any = None
        self._proxies: dict[str, str | None] = {}

    def _open(self) -> Any:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=self.max_connections, ttl_dns_cache=300,
                                         ssl=self.ssl_context if self.ssl_context is not None else True)
        self._session = aiohttp.ClientSession(connector=connector, trust_env=False, skip_auto_headers=("User-Agent",),
                                              auto_decompress=True)
        return self._session

    def _proxy(self, url: str) -> str | None:
        try:
            return self._proxies[url]
        except KeyError:
            if len(self._proxies) >= 1024:  # URLs that vary per request: no point keeping them
                self._proxies.clear()
            proxy = self._proxies[url] = proxy_for(url, self.proxy)
            return proxy

    async def send(self, request: Request) -> Response:
        import aiohttp

        session = self._session or self._open()
        try:
            async with session.request(request.method, request.url, data=request.content, headers=request.headers,
                                       proxy=self._proxy(request.url), allow_redirects=False,
                                       timeout=aiohttp.ClientTimeout(total=request.timeout)) as response:
                content = await response.read()
                headers: dict[str, str] = {}
                for name, value in response.raw_headers:
                    add_header(headers, name, value)
                return Response(response.status, headers=headers, content=content)
        except (aiohttp.ClientError, OSError) as exc:  # TimeoutError is an OSError
            raise transport_error(exc, request.url, request.timeout) from exc

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()
