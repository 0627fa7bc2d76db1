"""The endpoint exchange: each row routed, admitted, sent, classified and retried.

``EndpointClient`` is the exchange for one endpoint: route (the traffic split over its served
entities, falling back to the next), admit (quota, then a concurrency slot), send, classify the
answer (ok, a row error, a retryable fault, a sign of overload, a systemic failure) and retry
per policy. Each served entity has a circuit breaker (``limits.breaker``): when it stops
answering, rows wait in it for the outage to end (up to ``outage_wait_s``) instead of spending
their attempts and the retry budget. ``AIQueryClient`` holds one per endpoint of a registry, one long-lived transport
(``ai_query.transport``: aiohttp by default, ``MockTransport`` in unit tests) and a background
event loop. ``map()`` is the synchronous face used from Spark tasks; ``amap()`` /
``acall()`` the asynchronous one used by the serving endpoint. The stages around the exchange
(request keys, dedup, prefix order, the window scheduler, collection) live in ``ai_query.batch``;
one client per process is ``ai_query.batch.pipeline.shared_client``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping, Sequence

from .limits import AdaptiveConcurrencyLimiter, limiter_for
from .limits.slots import Outcome
from .config import EndpointConfig, EndpointRegistry, ServedEntity
from ._errors import (
    EndpointError,
    EndpointOutageError,
    EndpointTimeoutError,
    EndpointUnavailableError,
    LocalEngineError,
    RateLimitedError,
    ReplicaUnavailableError,
    RetryableEndpointError,
    SecretNotFoundError,
    SystemicEndpointError,
    ConnectionLostError,
    TransportError,
    TransportTimeoutError,
)
from .backends import Backend, BatchContext, backend_for
from ._logging import Throttled, get_logger
from ._redact import redact, remember_headers
from ._loop import LoopThread
from ._tracing import RequestSpans, request_tracer
from .limits.breaker import CircuitBreaker, is_outage
from .limits.quota import BrokeredQuota, LocalQuota, Quota, QuotaLimits
from .limits.retry import RecentFaults, RetryBudget, log_budget_stop, log_retry, make_retrying, retry_within_budget
from .limits.share import ConcurrencyShare
from .transport import Request, Transport, make_transport
from ._schemas import ModelParameters, ModelResponse, Usage
from .batch.plan import prefix_order
from .batch.request import prompt_text_of, row_fault, traffic_point
from .batch.results import CallResult, answered_result, check_exactly_once, failed_result
from .batch.scheduler import WindowScheduler

_throttled = Throttled(get_logger("ai_query.client"))  # rare events only: 429 waits, budget stops
DEFAULT_MAX_TOKENS_RESERVED = 256
"""Tokens reserved for the answer when a request sets no max_tokens (quota admission only)."""

# Failures that no row can get past: they stop the whole batch instead of becoming row errors.
SYSTEMIC_ERRORS: tuple[type[BaseException], ...] = (SystemicEndpointError, SecretNotFoundError, LocalEngineError)


@dataclass
class _Route:
    """One served entity of an endpoint, with its own adapter, concurrency limiter and circuit breaker."""

    entity: ServedEntity
    backend: Backend
    limiter: AdaptiveConcurrencyLimiter
    weight: int
    breaker: CircuitBreaker


class EndpointClient:
    """Calls to one endpoint: routes over its served entities, concurrency, quota and retries."""

    def __init__(
        self,
        config: EndpointConfig,
        http: Transport,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        quota: Quota | None = None,
        share: float = 1.0,
        tracer: Any = None,
    ) -> None:
        self.config = config
        cc = config.client_config
        # max_concurrency is the endpoint's total over all the job's workers: each takes its share.
        maximum = max(1, math.ceil(cc.max_concurrency * share))
        initial = max(1, min(maximum, math.ceil(cc.initial_concurrency * share)))
        weights = dict(config.traffic_routes) if config.traffic_routes else {config.served_entities[0].name: 100}
        self.routes = [
            _Route(e, backend, limiter_for(cc.concurrency, backend.capabilities, initial, maximum, clock), weights.get(e.name, 0),
                   CircuitBreaker(config.name if len(config.served_entities) == 1 else f"{config.name}/{e.name}",
                                  outage_wait_s=cc.outage_wait_s, clock=clock, sleep=sleep))
            for e, backend in ((e, backend_for(e)) for e in config.served_entities)
        ]
        self.quota = quota
        self.budget = RetryBudget(cc.retry_budget)
        self.recent_faults = RecentFaults()
        """Random faults among the last answered attempts: their retries go at once while few fail."""
        self._http = http
        self._clock = clock
        self._sleep = sleep
        self.requests_sent = 0
        self.fallbacks = 0
        self.concurrency_share: ConcurrencyShare | None = None
        """Set by ``AIQueryClient`` when several workers share the endpoint through the driver's broker."""
        self.spans = RequestSpans(tracer, config) if tracer is not None else None
        if self.spans is not None:  # decided once (``_tracing``): without a tracer ``call`` stays the plain method
            self.call = self.spans.traced(self.call)  # type: ignore[method-assign]

    @property
    def backend(self) -> Backend:
        return self.routes[0].backend

    @property
    def limiter(self) -> AdaptiveConcurrencyLimiter:
        return self.routes[0].limiter

    def _order(self, prompt_text: str) -> list[_Route]:
        """The routes to try, first the one the traffic split picks for this request.

        The pick is a hash of the request, not a random draw, so that the same row goes to the
        same entity in batch and online (and on a retried task).
        """
        weighted = [r for r in self.routes if r.weight > 0]
        if len(weighted) <= 1:
            first = weighted[0] if weighted else self.routes[0]
        else:
            point = traffic_point(prompt_text, sum(r.weight for r in weighted))
            for first in weighted:
                point -= first.weight
                if point < 0:
                    break
        if not self.config.fallback_enabled:
            return [first]
        return [first, *[r for r in self.routes if r is not first]]

    def with_default_max_tokens(self, params: ModelParameters) -> ModelParameters:
        """``params`` with the endpoint's ``default_max_tokens`` where a generating call sets none."""
        default = self.config.client_config.default_max_tokens
        if default is None or self.config.task == "llm/v1/embeddings" or any(k == "max_tokens" for k, _ in params.values):
            return params
        return ModelParameters(tuple(sorted((*params.values, ("max_tokens", default)))))

    def _reservation(self, prompt_text: str, params: ModelParameters) -> float:
        """Tokens to reserve at admission: the prompt (estimated) plus the most the answer may take."""
        # Never under-count: every word is at least one token for any tokenizer in use.
        prompt = max(Usage.estimate(prompt_text, "").prompt_tokens, len(prompt_text.split()))
        if self.config.task == "llm/v1/embeddings":
            return float(prompt)
        return float(prompt + dict(params.values).get("max_tokens", DEFAULT_MAX_TOKENS_RESERVED))

    async def _attempt(self, route: _Route, value: Any, params: ModelParameters, response_format: Mapping[str, Any] | None,
                       prompt_text: str, first: bool = False, give_up: tuple[float, str] | None = None) -> ModelResponse:
        task = self.config.task
        backend = route.backend
        in_process = backend.capabilities.in_process  # in-process backends (MLflow pyfunc) skip HTTP
        request = None if in_process else await backend.build(task, value, params, response_format)
        if request is not None:  # the credentials sent are scrubbed from whatever comes back (_redact.py)
            remember_headers(request.headers)
        timeout = self.config.client_config.request_timeout_s
        reserved = 0.0
        admitted_at: float | None = None
        breaker = route.breaker
        while True:
            # while the endpoint is down, wait here, before taking a concurrency slot
            probe = breaker.state != "closed" and await breaker.admit(*(give_up or (None, "")))
            try:
                started = await route.limiter.acquire()
            except BaseException:
                if probe:
                    breaker.probe_abandoned()
                raise
            if probe or breaker.state == "closed":
                break
            # the breaker opened while this row queued for a slot: give it back, wait in the breaker
            await route.limiter.release("error", started)
        if self.quota is not None:  # the quota after the slot: charged to the window in which it is sent
            reserved = self._reservation(prompt_text, params)
            try:
                admitted_at = await self.quota.admit(reserved)
            except BaseException:
                if probe:
                    breaker.probe_abandoned()
                await route.limiter.release("error", started)
                raise
        if first:  # the retry budget grows with requests sent, not with rows queued
            self.budget.record_first_attempt()
        outcome: Outcome = "error"
        charged = 0.0
        failure: BaseException | None = None
        sent_at = self._clock()
        try:
            self.requests_sent += 1
            if in_process:
                result = await backend.invoke(task, value, params, response_format, prompt_text)
            else:
                assert request is not None
                try:
                    response = await self._http.send(
                        Request.json(request.method, request.url, request.json, headers=request.headers, timeout=timeout)
                    )
                except TransportError as exc:
                    if isinstance(exc, TransportTimeoutError):
                        outcome = "overload"
                        raise EndpointTimeoutError(f"timed out after {timeout:g} s waiting for {self.config.name!r}") from exc
                    # "lost" when an open connection broke (a reset, a disconnect)
                    how = "lost" if isinstance(exc, ConnectionLostError) else "error"
                    raise RetryableEndpointError(f"connection {how} calling {self.config.name!r}: {exc}") from exc
                try:
                    result = backend.parse(task, response.status_code, response.headers, response.content, prompt_text)
                except RateLimitedError as exc:
                    outcome = "overload"
                    if self.quota is not None and exc.retry_after:
                        self.quota.pause_for(exc.retry_after)  # every worker waits, not just this row
                    raise
                except RetryableEndpointError:
                    # A bare 500/503 is a fault, not a sign of load: shrinking the window for it
                    # collapsed throughput (faults benchmark, 0.17 of the bound). A 503 that asks
                    # for a pause (Retry-After) arrives as RateLimitedError above.
                    outcome = "error"
                    raise
            outcome = "ok"
            charged = float(result.usage.total_tokens)
            return result
        except BaseException as exc:
            failure = exc
            raise
        finally:
            if outcome == "ok":
                self.recent_faults.record(False)
            elif isinstance(failure, RetryableEndpointError) and not isinstance(failure, (RateLimitedError, EndpointTimeoutError)):
                self.recent_faults.record(True)
            down = is_outage(failure)
            endpoints_fault = down and breaker.failed(str(failure), probe=probe, row=hash(prompt_text))
            if outcome == "ok" or (isinstance(failure, EndpointError) and not down and not isinstance(failure, EndpointTimeoutError)):
                breaker.answered(sent_at)  # any answer, even an error, says the endpoint is there (from when it was sent)
            elif probe and not down:
                breaker.probe_abandoned()  # a timeout or a cancelled row says nothing: probe again
            if self.quota is not None:
                # Servers that keep the whole reservation (no refund of unused max_tokens) get
                # none back from us either; otherwise we would run ahead of their count.
                refund = self.config.client_config.quota_refunds_unused or outcome != "ok"
                self.quota.settle(reserved, charged if refund else reserved, admitted_at)
            await route.limiter.release(outcome, started)
            # routing backends (vllm_pool) count what is outstanding
            if request is not None and backend.request_done(request, failure):
                # One replica of a pool is down, not the endpoint: the retry goes to another
                # replica and spends no retry budget (it still counts towards max_attempts).
                assert isinstance(failure, RetryableEndpointError)
                raise ReplicaUnavailableError(str(failure), request_id=failure.request_id) from failure
            if endpoints_fault:  # met while the breaker is open: the row waits for the endpoint
                assert isinstance(failure, RetryableEndpointError)
                raise EndpointUnavailableError(str(failure), status_code=failure.status_code, request_id=failure.request_id,
                                               breaker_open=breaker.state != "closed") from failure

    async def call(
        self,
        value: Any,
        params: ModelParameters = ModelParameters(),
        response_format: Mapping[str, Any] | None = None,
        *,
        index: int = 0,
        prompt_text: str | None = None,
        wait_at_most_s: float | None = None,
    ) -> CallResult:
        """One row, retried per policy, falling back to the next entity if the endpoint allows.

        Row failures come back as ``status='error'``; systemic ones raise. ``prompt_text`` is the
        value's ``prompt_text_of``, when the caller computed it already (for the prefix order).
        ``wait_at_most_s``: the longest the row waits out an outage of the endpoint from now, when
        shorter than ``outage_wait_s`` allows (a served request, bounded by its own timeout).
        """
        if (fault := row_fault(value, self.config.client_config.max_prompt_chars)) is not None:
            return CallResult(index, self.config.name, "error", error=fault, model=self.config.entity.model_name,
                              status_code=None if value is None else 400)
        if prompt_text is None:
            prompt_text = prompt_text_of(value)
        t0 = self._clock()
        deadline = None if wait_at_most_s is None else (t0 + wait_at_most_s, "its request timeout")
        attempts = 0
        errors: list[str] = []
        order = self._order(prompt_text)
        for position, route in enumerate(order):
            # an entity that is down, with another to fall back to: the row goes there instead of waiting
            give_up = deadline if position == len(order) - 1 else (t0, "another served entity can take it")
            result, transient = await self._call_route(route, value, params, response_format, prompt_text, index, t0, give_up)
            attempts += result.attempts
            result.attempts = attempts
            if result.ok or not transient or position == len(order) - 1:
                if errors and not result.ok:
                    result.error = "; then ".join([*errors, result.error or ""])
                return result
            errors.append(f"{route.entity.name}: {result.error}")
            self.fallbacks += 1
        raise AssertionError("unreachable")  # pragma: no cover

    async def _call_route(
        self, route: _Route, value: Any, params: ModelParameters, response_format: Mapping[str, Any] | None,
        prompt_text: str, index: int, t0: float, give_up: tuple[float, str] | None = None,
    ) -> tuple[CallResult, bool]:
        # Most rows succeed at once: the first attempt runs without a tenacity ``AsyncRetrying``
        # (building and iterating one costs about a tenth of a served request's CPU). A retryable
        # failure hands over to the policy with that attempt replayed as its first, so what is
        # retried, the waits and the stops are exactly tenacity's.
        started = self._clock()
        try:
            response = await self._attempt(route, value, params, response_format, prompt_text, first=True, give_up=give_up)
        except SYSTEMIC_ERRORS:
            raise
        except RetryableEndpointError as exc:
            return await self._retry_route(route, value, params, response_format, prompt_text, index, t0, started, exc, give_up)
        except EndpointOutageError as exc:  # the endpoint was down already for outage_wait_s: nothing sent
            return self._failed_result(index, route, exc, t0, 0, "waited for the endpoint"), True
        except EndpointError as exc:
            return self._failed_result(index, route, exc, t0, 1, "gave up"), False
        return self._ok_result(index, route, response, t0, 1), False

    async def _retry_route(
        self, route: _Route, value: Any, params: ModelParameters, response_format: Mapping[str, Any] | None,
        prompt_text: str, index: int, t0: float, started: float, first_failure: RetryableEndpointError,
        give_up: tuple[float, str] | None = None,
    ) -> tuple[CallResult, bool]:
        """The retry policy from a failed first attempt (``first_failure``, made at ``started``) on."""
        cc = self.config.client_config
        before_sleep = log_retry(self.config.name, route.limiter, _throttled)  # with spans: each retry an event too
        retrying = make_retrying(
            max_attempts=cc.max_attempts, rate_limit_wait_s=cc.rate_limit_wait_s, clock=self._clock, sleep=self._sleep,
            budget=self.budget, initial_backoff=cc.retry_backoff_s, started=started, recent_faults=self.recent_faults,
            before_sleep=before_sleep if self.spans is None else self.spans.retry_events(before_sleep),
        )
        attempts = 0
        replay: RetryableEndpointError | None = first_failure
        try:
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    if replay is not None:  # attempt 1 was made already: tenacity judges its outcome
                        failure, replay = replay, None
                        raise failure
                    response = await self._attempt(route, value, params, response_format, prompt_text, give_up=give_up)
        except SYSTEMIC_ERRORS:
            raise
        except EndpointOutageError as exc:  # raised in the breaker before the last attempt was sent
            return self._failed_result(index, route, exc, t0, attempts - 1, "waited for the endpoint"), True
        except EndpointError as exc:
            why = "gave up"
            if isinstance(retrying.retry, retry_within_budget) and retrying.retry.exhausted:
                why = "the endpoint's retry budget is spent (too many failures across rows), gave up"
                log_budget_stop(_throttled, self.config.name, exc, attempts)
            return self._failed_result(index, route, exc, t0, attempts, why), isinstance(exc, RetryableEndpointError)
        return self._ok_result(index, route, response, t0, attempts), False

    def _failed_result(self, index: int, route: _Route, exc: EndpointError, t0: float, attempts: int, why: str) -> CallResult:
        return failed_result(index, self.config.name, route.entity.model_name, exc, why,
                             latency_ms=(self._clock() - t0) * 1000.0, attempts=attempts)

    def _ok_result(self, index: int, route: _Route, response: ModelResponse, t0: float, attempts: int) -> CallResult:
        return answered_result(index, self.config.name, route.entity.model_name, route.entity.pricing, response,
                               latency_ms=(self._clock() - t0) * 1000.0, attempts=attempts)

    @property
    def runs_batches(self) -> bool:
        """The endpoint runs a whole batch in-process at once (a vllm_pool in offline mode)."""
        return len(self.routes) == 1 and self.routes[0].backend.capabilities.runs_whole_batches

    async def call_batch(self, values: Sequence[Any], params: ModelParameters,
                         response_format: Mapping[str, Any] | None, context: BatchContext | None = None) -> list[CallResult]:
        """Every row through the backend's ``invoke_batch`` at once: no HTTP, no limiter, no retries
        (an in-process engine has no transient faults; a row's failure is data, an engine failure raises)."""
        route = self.routes[0]
        t0 = self._clock()
        faults = [row_fault(v, self.config.client_config.max_prompt_chars) for v in values]
        sent = [i for i, fault in enumerate(faults) if fault is None]
        outcomes = await route.backend.invoke_batch(self.config.task, [values[i] for i in sent], params, response_format, context)
        self.requests_sent += len(sent)
        results = [CallResult(i, self.config.name, "error", error=fault, model=route.entity.model_name) for i, fault in enumerate(faults)]
        for i, outcome in zip(sent, outcomes):
            if isinstance(outcome, Exception):
                results[i] = CallResult(i, self.config.name, "error", error=redact(str(outcome)), model=route.entity.model_name,
                                        latency_ms=(self._clock() - t0) * 1000.0, attempts=1)
            else:
                results[i] = self._ok_result(i, route, outcome, t0, 1)
        return results


RowBatch = tuple[str, Sequence[Any], ModelParameters | Mapping[str, Any] | None, Mapping[str, Any] | None]
"""``(endpoint, values, params, response_format)``: rows for ``map_many`` / ``submit_many``."""


class AIQueryClient:
    """Sends rows to the endpoints of a registry.

    ``transport`` replaces the network (e.g. ``ai_query.transport.MockTransport(handler)``) and ``clock`` /
    ``sleep`` replace time, so tests are hermetic without patching anything; ``tracer_provider`` spans (``_tracing``).
    """

    def __init__(
        self,
        registry: EndpointRegistry | None = None,
        *,
        transport: Transport | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        quota_broker: tuple[str, int] | None = None,
        quota_share: float = 1.0,
        quota_clock: Callable[[], float] = time.time,
        tracer_provider: Any = None,
    ) -> None:
        self.registry = registry if registry is not None else EndpointRegistry.default()
        self._tracer = request_tracer(tracer_provider)  # once: None means no span and no cost per request
        self.quota_broker = quota_broker
        self.quota_share = quota_share
        self._quota_clock = quota_clock
        self._transport = transport
        self._clock = clock
        self._sleep = sleep
        self._endpoints: dict[str, EndpointClient] = {}
        self._loop_thread: LoopThread | None = None
        self._lock = threading.Lock()

    def endpoint(self, name: str) -> EndpointClient:
        """The per-endpoint client (created on first use; raises ``UnknownEndpointError``)."""
        client = self._endpoints.get(name)
        if client is None:
            config = self.registry.get(name)
            if self._transport is None:  # aiohttp unless a transport was injected, made on first use
                self._transport = make_transport("aiohttp")
            client = EndpointClient(config, self._transport, clock=self._clock, sleep=self._sleep,
                                    quota=self._quota(config), share=self.quota_share, tracer=self._tracer)
            if self.quota_broker is not None and self.quota_share < 1.0:  # one of several workers
                client.concurrency_share = ConcurrencyShare(name, self.quota_broker, config.client_config.max_concurrency,
                                                            [route.limiter for route in client.routes])
            self._endpoints[name] = client
        return client

    def _quota(self, config: EndpointConfig) -> Quota | None:
        """Quota for an endpoint with limits: leased from the broker, or this process's static share."""
        share = QuotaLimits.of(config, self.quota_share)
        if share is None:
            return None
        local = LocalQuota(share, clock=self._quota_clock, sleep=self._sleep)
        if self.quota_broker is None:
            return local
        return BrokeredQuota(config.name, self.quota_broker, local, sleep=self._sleep)

    async def acall(
        self, endpoint: str, value: Any, params: ModelParameters | Mapping[str, Any] | None = None,
        response_format: Mapping[str, Any] | None = None,
    ) -> CallResult:
        """One request; see ``amap`` for many."""
        params = params if isinstance(params, ModelParameters) else ModelParameters.from_mapping(params)
        client = self.endpoint(endpoint)
        params = client.with_default_max_tokens(params)
        share = client.concurrency_share
        if share is None:
            return await client.call(value, params, response_format)
        share.enter()
        try:
            return await client.call(value, params, response_format)
        finally:
            await share.exit()

    async def amap(
        self,
        endpoint: str,
        values: Sequence[Any],
        params: ModelParameters | Mapping[str, Any] | None = None,
        response_format: Mapping[str, Any] | None = None,
        *,
        on_result: Callable[[CallResult], None] | None = None,
        context: BatchContext | None = None,
    ) -> list[CallResult]:
        """All ``values`` through ``endpoint``; results in input order, each row exactly once.

        A systemic failure (bad key, no such model, the local engine down) cancels the rest and
        raises; any other failure is that row's ``error``. ``context`` (the task running the
        batch) goes to a backend that runs whole batches.
        """
        params = params if isinstance(params, ModelParameters) else ModelParameters.from_mapping(params)
        client = self.endpoint(endpoint)
        params = client.with_default_max_tokens(params)
        if values and client.config.client_config.batch_api is not None and not (context is not None and context.online_only):
            from .batch.provider_batches import amap_in_batches

            return await amap_in_batches(self, endpoint, values, params, response_format, on_result, context)
        if client.runs_batches and values:
            results = await client.call_batch(values, params, response_format, context)
            if on_result is not None:
                for result in results:
                    on_result(result)
            check_exactly_once(results, len(values))
            return results

        if not values:
            return []
        texts = [prompt_text_of(v) for v in values]  # once per row: for the prefix order and the traffic split
        order = prefix_order(texts, client.config.client_config.prefix_ordering)

        async def one(i: int) -> CallResult:
            result = await client.call(values[i], params, response_format, index=i, prompt_text=texts[i])
            if on_result is not None:
                on_result(result)
            return result

        scheduler = WindowScheduler(one, len(values), [route.limiter for route in client.routes], order)
        share = client.concurrency_share
        if share is not None:
            share.enter()
        try:
            results = await scheduler.run()
        finally:
            if share is not None:
                await share.exit()
        check_exactly_once(results, len(values))
        return results

    def _loop(self) -> LoopThread:
        with self._lock:
            if self._loop_thread is None:
                self._loop_thread = LoopThread()
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

    def map_many(
        self,
        batches: Sequence[RowBatch],
        *,
        on_result: Callable[[str, CallResult], None] | None = None,
        context: BatchContext | None = None,
    ) -> list[list[CallResult]]:
        """Several ``(endpoint, values, params, response_format)`` batches at once, concurrently."""
        return self.submit_many(batches, on_result=on_result, context=context).result()

    def submit_many(
        self,
        batches: Sequence[RowBatch],
        *,
        on_result: Callable[[str, CallResult], None] | None = None,
        context: BatchContext | None = None,
    ) -> concurrent.futures.Future[list[list[CallResult]]]:
        """``map_many`` without waiting: the rows start now; the future holds their results.

        A caller can submit its next batch while this one is still in flight, so the endpoint
        never idles between them. The limiters are FIFO, but ``amap`` starts rows a window at a
        time, so the next batch's first window queues beside this one's rows not started yet:
        this batch finishes somewhat later than alone, the two together sooner. Cancelling the
        future cancels the rows still in flight.
        """

        async def run_all() -> list[list[CallResult]]:
            async def one(endpoint: str, values: Sequence[Any], params: Any, fmt: Any) -> list[CallResult]:
                callback = (lambda r: on_result(endpoint, r)) if on_result is not None else None
                return await self.amap(endpoint, values, params, fmt, on_result=callback, context=context)

            return list(await asyncio.gather(*(one(*b) for b in batches)))

        return asyncio.run_coroutine_threadsafe(run_all(), self._loop().loop)

    def call(self, endpoint: str, value: Any, params: ModelParameters | Mapping[str, Any] | None = None,
             response_format: Mapping[str, Any] | None = None) -> CallResult:
        """Synchronous ``acall``."""
        return self._loop().run(self.acall(endpoint, value, params, response_format))

    def close(self) -> None:
        """Close the HTTP client and stop the background loop."""
        if self._loop_thread is not None:
            closables = [c.concurrency_share for c in self._endpoints.values() if c.concurrency_share is not None]
            for closable in [*closables, *([self._transport] if self._transport is not None else [])]:
                try:
                    self._loop_thread.run(closable.aclose())
                except Exception:  # noqa: BLE001 - closing must not mask the caller's error
                    pass
            self._loop_thread.stop()
            self._loop_thread = None
        self._endpoints.clear()
