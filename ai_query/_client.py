"""The client: every row of a batch to its endpoint, concurrently, exactly once, in order.

One ``AIQueryClient`` per Python process (``shared_client``) owns a background event loop, one
long-lived ``httpx.AsyncClient`` on the aiohttp transport (plain httpx's pool collapses at high
concurrency), and per endpoint a provider adapter, an adaptive concurrency limiter and the retry
policy. ``map()`` is the synchronous face used from Spark tasks; ``amap()`` / ``acall()`` the
asynchronous one used by the serving endpoint.
"""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Coroutine, Mapping, Sequence, TypeVar

import httpx

from ._concurrency import AdaptiveConcurrencyLimiter, Outcome
from ._config import EndpointConfig, EndpointRegistry
from ._errors import (
    AIQueryError,
    EndpointError,
    LocalEngineError,
    RateLimitedError,
    RetryableEndpointError,
    SecretNotFoundError,
    SystemicEndpointError,
)
from ._providers import Provider, provider_for
from ._retry import make_retrying
from ._schemas import ModelParameters, ModelResponse

T = TypeVar("T")

# Failures that no row can get past: they stop the whole batch instead of becoming row errors.
SYSTEMIC_ERRORS: tuple[type[BaseException], ...] = (SystemicEndpointError, SecretNotFoundError, LocalEngineError)


@dataclass
class CallResult:
    """One row's outcome: the value or the error, and the audit fields."""

    index: int
    endpoint: str
    status: str  # "ok" | "error"
    value: Any = None
    error: str | None = None
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    usage_estimated: bool = False
    latency_ms: float = 0.0
    attempts: int = 0
    request_id: str | None = None
    finish_reason: str | None = None
    completed_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _prompt_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # chat messages
        return "".join(str(m.get("content", "")) for m in value if isinstance(m, Mapping))
    return str(value)


class EndpointClient:
    """Calls to one endpoint: provider, adaptive limiter and retry policy."""

    def __init__(
        self,
        config: EndpointConfig,
        http: httpx.AsyncClient,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.config = config
        self.provider: Provider = provider_for(config.entity)
        cc = config.client_config
        self.limiter = AdaptiveConcurrencyLimiter(cc.initial_concurrency, maximum=cc.max_concurrency, clock=clock)
        self._http = http
        self._clock = clock
        self._sleep = sleep
        self.requests_sent = 0

    async def _attempt(self, value: Any, params: ModelParameters, response_format: Mapping[str, Any] | None, prompt_text: str) -> ModelResponse:
        task = self.config.task
        request = await self.provider.build(task, value, params, response_format)
        timeout = self.config.client_config.request_timeout_s
        started = await self.limiter.acquire()
        outcome: Outcome = "error"
        try:
            self.requests_sent += 1
            try:
                response = await self._http.request(
                    request.method, request.url, json=request.json, headers=dict(request.headers), timeout=timeout
                )
            except httpx.TimeoutException as exc:
                outcome = "overload"
                raise RetryableEndpointError(f"timed out after {timeout:g} s waiting for {self.config.name!r}") from exc
            except httpx.TransportError as exc:
                raise RetryableEndpointError(
                    f"connection error calling {self.config.name!r}: {type(exc).__name__}: {exc or 'connection lost'}"
                ) from exc
            try:
                result = self.provider.parse(task, response.status_code, response.headers, response.content, prompt_text)
            except RateLimitedError:
                outcome = "overload"
                raise
            except RetryableEndpointError as exc:
                outcome = "overload" if exc.status_code == 503 else "error"
                raise
            outcome = "ok"
            return result
        finally:
            await self.limiter.release(outcome, started)

    async def call(
        self,
        value: Any,
        params: ModelParameters = ModelParameters(),
        response_format: Mapping[str, Any] | None = None,
        *,
        index: int = 0,
    ) -> CallResult:
        """One row, retried per policy. Row failures come back as ``status='error'``; systemic ones raise."""
        name = self.config.name
        if value is None:
            return CallResult(index, name, "error", error="the request is NULL: nothing to send", model=self.config.entity.model_name)
        prompt_text = _prompt_text(value)
        cc = self.config.client_config
        retrying = make_retrying(
            max_attempts=cc.max_attempts, rate_limit_wait_s=cc.rate_limit_wait_s, clock=self._clock, sleep=self._sleep
        )
        attempts = 0
        t0 = self._clock()
        try:
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    response = await self._attempt(value, params, response_format, prompt_text)
        except SYSTEMIC_ERRORS:
            raise
        except EndpointError as exc:
            return CallResult(
                index,
                name,
                "error",
                error=f"{exc} (gave up after {attempts} attempt{'s' if attempts != 1 else ''})",
                model=self.config.entity.model_name,
                latency_ms=(self._clock() - t0) * 1000.0,
                attempts=attempts,
                request_id=exc.request_id,
            )
        usage = response.usage
        return CallResult(
            index,
            name,
            "ok",
            value=response.value,
            model=response.model or self.config.entity.model_name,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
            usage_estimated=usage.estimated,
            latency_ms=(self._clock() - t0) * 1000.0,
            attempts=attempts,
            request_id=response.request_id,
            finish_reason=response.finish_reason,
        )


class _LoopThread:
    """A daemon thread running one asyncio loop for the process."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="ai-query-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)


class AIQueryClient:
    """Sends rows to the endpoints of a registry.

    ``transport`` replaces the network (e.g. ``httpx.MockTransport(handler)``) and ``clock`` /
    ``sleep`` replace time, so tests are hermetic without patching anything.
    """

    def __init__(
        self,
        registry: EndpointRegistry | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.registry = registry if registry is not None else EndpointRegistry.default()
        self._transport = transport
        self._clock = clock
        self._sleep = sleep
        self._http: httpx.AsyncClient | None = None
        self._endpoints: dict[str, EndpointClient] = {}
        self._loop_thread: _LoopThread | None = None
        self._lock = threading.Lock()

    def _http_client(self) -> httpx.AsyncClient:
        if self._http is None:
            transport = self._transport
            if transport is None:
                from httpx_aiohttp import AiohttpTransport

                limits = httpx.Limits(max_connections=2048, max_keepalive_connections=2048)
                transport = AiohttpTransport(limits=limits, trust_env=False)
            self._http = httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(120.0, connect=10.0))
        return self._http

    def endpoint(self, name: str) -> EndpointClient:
        """The per-endpoint client (created on first use; raises ``UnknownEndpointError``)."""
        client = self._endpoints.get(name)
        if client is None:
            config = self.registry.get(name)
            client = EndpointClient(config, self._http_client(), clock=self._clock, sleep=self._sleep)
            self._endpoints[name] = client
        return client

    async def acall(
        self, endpoint: str, value: Any, params: ModelParameters | Mapping[str, Any] | None = None,
        response_format: Mapping[str, Any] | None = None,
    ) -> CallResult:
        """One request; see ``amap`` for many."""
        params = params if isinstance(params, ModelParameters) else ModelParameters.from_mapping(params)
        return await self.endpoint(endpoint).call(value, params, response_format)

    async def amap(
        self,
        endpoint: str,
        values: Sequence[Any],
        params: ModelParameters | Mapping[str, Any] | None = None,
        response_format: Mapping[str, Any] | None = None,
        *,
        on_result: Callable[[CallResult], None] | None = None,
    ) -> list[CallResult]:
        """All ``values`` through ``endpoint``; results in input order, each row exactly once.

        A systemic failure (bad key, no such model, the local engine down) cancels the rest and
        raises; any other failure is that row's ``error``.
        """
        params = params if isinstance(params, ModelParameters) else ModelParameters.from_mapping(params)
        client = self.endpoint(endpoint)

        async def one(i: int, value: Any) -> CallResult:
            result = await client.call(value, params, response_format, index=i)
            if on_result is not None:
                on_result(result)
            return result

        tasks = [asyncio.ensure_future(one(i, v)) for i, v in enumerate(values)]
        if not tasks:
            return []
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            failure = next((t.exception() for t in done if not t.cancelled() and t.exception() is not None), None)
            if failure is not None:
                raise failure
        finally:
            for task in tasks:
                if not task.done():
                    task.cancel()
            # Collect every outcome (also of cancelled rows) so no exception goes unretrieved.
            await asyncio.gather(*tasks, return_exceptions=True)
        results = [t.result() for t in tasks]
        check_exactly_once(results, len(values))
        return results

    def _loop(self) -> _LoopThread:
        with self._lock:
            if self._loop_thread is None:
                self._loop_thread = _LoopThread()
            return self._loop_thread

    def map(
        self,
        endpoint: str,
        values: Sequence[Any],
        params: ModelParameters | Mapping[str, Any] | None = None,
        response_format: Mapping[str, Any] | None = None,
        *,
        on_result: Callable[[CallResult], None] | None = None,
    ) -> list[CallResult]:
        """Synchronous ``amap`` on the client's background loop (safe from any thread)."""
        return self._loop().run(self.amap(endpoint, values, params, response_format, on_result=on_result))

    def call(self, endpoint: str, value: Any, params: ModelParameters | Mapping[str, Any] | None = None,
             response_format: Mapping[str, Any] | None = None) -> CallResult:
        """Synchronous ``acall``."""
        return self._loop().run(self.acall(endpoint, value, params, response_format))

    def requests_sent(self, endpoint: str) -> int:
        client = self._endpoints.get(endpoint)
        return client.requests_sent if client else 0

    def close(self) -> None:
        """Close the HTTP client and stop the background loop."""
        if self._loop_thread is not None and self._http is not None:
            http, self._http = self._http, None
            try:
                self._loop_thread.run(http.aclose())
            except Exception:  # noqa: BLE001 - closing must not mask the caller's error
                pass
        if self._loop_thread is not None:
            self._loop_thread.stop()
            self._loop_thread = None
        self._endpoints.clear()


def check_exactly_once(results: Sequence[CallResult], expected: int) -> None:
    """Every input row must come back once, in order; anything else is a bug, never silent."""
    if len(results) != expected or any(r.index != i for i, r in enumerate(results)):
        indices = [r.index for r in results]
        raise AIQueryError(
            f"internal error: expected rows 0..{expected - 1} exactly once and in order, got {len(results)} "
            f"results (first indices {indices[:10]}); please report this"
        )


_SHARED: dict[str, AIQueryClient] = {}
_SHARED_PID = os.getpid()
_SHARED_LOCK = threading.Lock()


def registry_fingerprint(registry: EndpointRegistry) -> str:
    """A stable digest of a registry's content (no secrets: they are only references)."""
    data = json.dumps([e.to_dict() for e in registry], sort_keys=True, default=str)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def shared_client(registry: EndpointRegistry) -> AIQueryClient:
    """The process-wide client for ``registry``: one long-lived client per Python worker."""
    global _SHARED_PID
    key = registry_fingerprint(registry)
    with _SHARED_LOCK:
        if os.getpid() != _SHARED_PID:  # forked: the parent's loop thread does not exist here
            _SHARED.clear()
            _SHARED_PID = os.getpid()
        client = _SHARED.get(key)
        if client is None:
            client = _SHARED[key] = AIQueryClient(registry)
        return client


@atexit.register
def _close_shared() -> None:
    for client in list(_SHARED.values()):
        client.close()
    _SHARED.clear()
