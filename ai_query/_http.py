"""The HTTP client to model endpoints: aiohttp directly, in httpx's shape.

Through ``httpx.AsyncClient`` on the aiohttp transport, httpx's request and response models
cost about as much CPU per request as everything else of ours together (profiled in the
serving endpoint: ~0.35 ms of ~1.3 ms; in a Spark worker, ~35% of the event loop's time). CPU
per request is also the time between one answer and the next request on its slot, so it costs
throughput at a concurrency cap, not only CPU. ``AIQueryClient`` (the batch path) therefore
sends through this object (the serving endpoint through its own lighter ``DirectHTTPClient``,
``ai_query/serving/_http.py``, in the same shape): the one method ``EndpointClient`` calls
(``request(method, url, json=, headers=, timeout=)``), the body encoded exactly as httpx
encodes ``json=`` (same bytes on the wire), the answer as ``status_code`` / ``headers`` /
``content``, and aiohttp's failures raised as the httpx exceptions the client already maps to
retries (a timeout as ``httpx.ReadTimeout`` caused by the ``asyncio.TimeoutError``, a refused
connection as ``httpx.ConnectError``, a reset as ``httpx.ReadError``). An injected httpx transport (tests: ``httpx.MockTransport``) uses httpx instead.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Mapping

import httpx


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

    def _open(self) -> Any:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=self.max_connections, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(connector=connector, trust_env=False, skip_auto_headers=("User-Agent",))
        return self._session

    async def request(self, method: str, url: str, *, json: Any = None, headers: Mapping[str, str] | None = None,
                      timeout: float | None = None) -> DirectResponse:
        import aiohttp

        session = self._session or self._open()
        # httpx 0.28's encoding of ``json=``, so the bytes sent equal the batch path's
        body = _dumps(json)
        try:
            async with session.request(method, url, data=body, headers=headers,
                                       timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                content = await response.read()
                return DirectResponse(response.status, response.headers, content)
        except asyncio.TimeoutError as exc:
            raise httpx.ReadTimeout(f"no answer within {timeout} s") from exc
        except aiohttp.ClientConnectorError as exc:  # could not connect
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
        except aiohttp.ClientConnectionError as exc:  # an open connection broke: a reset, a disconnect
            raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
        except aiohttp.ClientError as exc:
            raise httpx.TransportError(str(exc) or type(exc).__name__) from exc

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


def _dumps(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
