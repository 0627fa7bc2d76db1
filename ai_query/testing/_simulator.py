"""A real HTTP server on 127.0.0.1 that answers like an OpenAI, Anthropic or serving-endpoint provider.

>>> with ProviderSimulator(api_key="sk-sim", latency_s=0.05, rpm_limit=600) as sim:
...     sim.base_url            # http://127.0.0.1:PORT/v1, for OpenAI clients
...     sim.url                 # http://127.0.0.1:PORT, for Anthropic clients and serving endpoints
...     sim.stats.requests      # server-side counters

Routes: ``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``, ``GET /v1/models``
(OpenAI); ``POST /v1/messages`` (Anthropic); ``POST /serving-endpoints/{name}/invocations``
(Databricks-style serving endpoints); the OpenAI Batch API and Anthropic Message Batches
(``_batch_apis``, knobs in ``batch_api``); ``GET /_sim/stats`` and ``POST /_sim/reset`` (counters, for
another process). ``GET /v1/models`` and ``GET /api/2.0/serving-endpoints/{name}`` are free, as at
the providers: they check the key and the name but are not counted in ``stats.requests``.

**Answers are deterministic.** A generative answer is ``"echo: " + prompt`` (directives removed),
where the prompt is the message contents joined by newlines (Anthropic: the system prompt first),
cut at the first stop sequence, then at ``max_tokens`` (else ``default_max_tokens``) words
(``finish_reason: "length"``, Anthropic ``stop_reason: "max_tokens"``). Tokens are
whitespace-separated words (:func:`count_tokens`) of the prompt as sent, directives included, so
tests can predict usage exactly. An embedding is a unit vector drawn from a hash of its input.

**Pipeline of one request**, in order: count it; auth (401); format checks (Anthropic's
``anthropic-version``, 400); serving-endpoint name (404); the concurrency cap (429 with
``Retry-After: concurrency_retry_after_s``); the body (400); the quota (429 with ``Retry-After`` =
seconds until the next window); then, admitted: a random fault from ``error_rates``, else the
prompt's directives; the latency; the answer.

**Quota rule** (``rpm_limit`` / ``tpm_limit`` per ``window_s``, fixed or sliding windows, what a
request is charged, the rate-limit headers): see ``_limits``.

**Faults** and **directives** (failures injected per request or per prompt): see ``_faults``.

**Echoed keys** (``echo_key=True``), as providers do: a 401 body says ``Incorrect API key provided:
<key>``, any other error body adds ``(request headers: authorization: Bearer <key>)`` (Anthropic:
``x-api-key: <key>``). Nothing of ours may pass it on (``ai_query/_redact.py``).
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import math
import random
import threading
import time
import uuid
from collections import Counter
from typing import Any, Mapping, Sequence

from aiohttp import web

from ._batch_apis import BatchAPIs
from ._latency import Latency
from ._faults import DIRECTIVE, FAULT_KINDS, _check, _is_count, _is_number, abort, directives, fault_table
from ._limits import FixedWindowQuota, SlidingWindowQuota
from ._stats import SimulatorStats
from .._errors import BadRequestError
from ._provider_formats import ANTHROPIC, OPENAI, SERVING, Answer, Call, WireFormat, count_tokens, dumps, embed, generate, loads, seconds_header

__all__ = ["ProviderSimulator", "SimulatorStats", "Latency", "count_tokens", "FAULT_KINDS"]

_RECEIVED_AT = web.RequestKey("aiq_received_at", float)
_SENT_CREDENTIAL: contextvars.ContextVar[tuple[str, str, str] | None] = contextvars.ContextVar("aiq_sent_credential", default=None)
"""(header name, key, header value) of the request being answered, when ``echo_key`` is on (one handler task each)."""
_JSON = "application/json"
_CONFIG_KNOBS = ("served_model", "embedding_dim", "per_token_latency_s", "max_concurrency", "concurrency_retry_after_s", "rpm_limit",
                 "tpm_limit", "window_s", "quota_window", "default_max_tokens", "tpm_refund_unused", "hang_s", "echo_key", "seed")


class ProviderSimulator:
    """A provider on 127.0.0.1 speaking the OpenAI, Anthropic and serving-endpoint wire formats.

    Start it with ``with ProviderSimulator(...) as sim:`` (or ``start()`` / ``stop()``); the server
    runs on its own event loop in a daemon thread. Every knob is keyword-only and checked here.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        served_model: str = "sim-model",
        endpoint_names: Sequence[str] | None = None,
        embedding_dim: int = 8,
        latency_s: float | None = None,
        latency: Latency | tuple | str | None = None,
        per_token_latency_s: float = 0.0,
        max_concurrency: int | None = None,
        concurrency_retry_after_s: float = 0.05,
        rpm_limit: int | None = None,
        tpm_limit: int | None = None,
        window_s: float = 60.0,
        quota_window: str = "fixed",
        default_max_tokens: int = 256,
        tpm_refund_unused: bool = False,
        error_rates: Mapping[Any, float] | None = None,
        hang_s: float = 30.0,
        echo_key: bool = False,
        seed: int = 0,
        served_log: bool = False,
        batch_api: Mapping[str, Any] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        """
        Args:
            api_key: the key every request must carry (``Authorization: Bearer``, Anthropic
                ``x-api-key``); ``None`` accepts any.
            served_model: the model name in every answer and in ``GET /v1/models``.
            endpoint_names: serving-endpoint names served under ``/serving-endpoints/{name}``
                (default: ``[served_model]``; ``["*"]`` serves any name).
            embedding_dim: length of embedding vectors (a request's ``dimensions`` overrides it).
            latency_s: a fixed latency per admitted request; or ``latency``: a :class:`Latency`,
                ``("uniform", (low_s, high_s))``, ``("lognormal", (mean_s, p99_s))`` or ``"kind:params"``.
            per_token_latency_s: added per completion token (streams pace their chunks with it).
            max_concurrency: requests in flight above this are refused 429 with
                ``Retry-After: concurrency_retry_after_s``.
            rpm_limit, tpm_limit, window_s: requests and tokens admitted per fixed window of
                ``window_s`` seconds (named per minute after the usual 60 s window).
            quota_window: ``"fixed"`` (consecutive windows from the start) or ``"sliding"`` (any
                span of ``window_s``: a request counts for ``window_s`` after its admission).
            default_max_tokens: the ``max_tokens`` of a generative request that sends none (it
                caps the answer and sets the quota charge).
            tpm_refund_unused: give unused ``max_tokens`` back to the window after a success.
            error_rates: shares of admitted requests that get a fault, by kind in
                :data:`FAULT_KINDS`, e.g. ``{"500": 0.05, "503": 0.05, "reset": 0.02}``.
            hang_s: how much longer a ``"timeout"`` fault holds its answer.
            echo_key: every error body repeats the credential the request carried (see the module docstring).
            seed: seeds the fault and latency draws; the same seed gives the same sequences.
            served_log: keep one record per answer served (its request id as the client sees it,
                when, its tokens); read it with :meth:`served_answers`. Off by default (memory).
            batch_api: knobs of the (always served) batch APIs: see ``_batch_apis.BatchAPIs``.
            host, port: where to listen (port 0: a free port, read ``sim.port`` after start).
        """
        _check(api_key is None or (isinstance(api_key, str) and api_key), f"api_key={api_key!r} must be a non-empty string or None")
        _check(isinstance(served_model, str) and bool(served_model), f"served_model={served_model!r} must be a non-empty string")
        names = tuple(endpoint_names) if endpoint_names is not None else (served_model,)
        _check(all(isinstance(n, str) and n for n in names) and bool(names), f"endpoint_names={endpoint_names!r} must be non-empty names")
        _check(_is_count(embedding_dim), f"embedding_dim={embedding_dim!r} must be an integer >= 1")
        _check(latency_s is None or latency is None, "give latency_s (fixed) or latency (a distribution), not both")
        if latency is None:
            _check(latency_s is None or (_is_number(latency_s) and latency_s >= 0), f"latency_s={latency_s!r} must be seconds >= 0")
            latency = Latency(float(latency_s or 0.0))
        self.latency = Latency.parse(latency)
        _check(_is_number(per_token_latency_s) and per_token_latency_s >= 0, f"per_token_latency_s={per_token_latency_s!r} must be seconds >= 0")
        _check(max_concurrency is None or _is_count(max_concurrency), f"max_concurrency={max_concurrency!r} must be an integer >= 1 or None")
        _check(_is_number(concurrency_retry_after_s) and concurrency_retry_after_s >= 0, f"concurrency_retry_after_s={concurrency_retry_after_s!r} must be seconds >= 0")
        _check(rpm_limit is None or _is_count(rpm_limit), f"rpm_limit={rpm_limit!r} must be an integer >= 1 or None")
        _check(tpm_limit is None or _is_count(tpm_limit), f"tpm_limit={tpm_limit!r} must be an integer >= 1 or None")
        _check(_is_number(window_s) and window_s > 0, f"window_s={window_s!r} must be seconds > 0 (e.g. 60, or 1 in tests)")
        _check(quota_window in ("fixed", "sliding"), f"quota_window={quota_window!r} must be 'fixed' or 'sliding'")
        _check(_is_count(default_max_tokens), f"default_max_tokens={default_max_tokens!r} must be an integer >= 1")
        _check(_is_number(hang_s) and hang_s >= 0, f"hang_s={hang_s!r} must be seconds >= 0")
        _check(isinstance(seed, int), f"seed={seed!r} must be an integer")
        _check(isinstance(port, int) and 0 <= port <= 65535, f"port={port!r} must be 0 (any free port) or a port number")

        self.api_key = api_key
        self._served_log: list[dict[str, Any]] | None = [] if served_log else None
        self.served_model = served_model
        self.endpoint_names = names
        self.embedding_dim = embedding_dim
        self.per_token_latency_s = float(per_token_latency_s)
        self.max_concurrency = max_concurrency
        self.concurrency_retry_after_s = float(concurrency_retry_after_s)
        self.rpm_limit = rpm_limit
        self.tpm_limit = tpm_limit
        self.window_s = float(window_s)
        self.default_max_tokens = default_max_tokens
        self.tpm_refund_unused = bool(tpm_refund_unused)
        self.error_rates = {str(k): float(v) for k, v in (error_rates or {}).items()}
        self._faults = fault_table(error_rates)
        self.hang_s = float(hang_s)
        self.echo_key = bool(echo_key)
        self.seed = seed
        self.batches = BatchAPIs(self, **dict(batch_api or {}))
        self.host = host
        self._port = port
        self.port: int | None = None

        self.stats = SimulatorStats()
        self.quota_window = quota_window
        self._quota = (SlidingWindowQuota if quota_window == "sliding" else FixedWindowQuota)(rpm_limit, tpm_limit, self.window_s)
        self._limited = rpm_limit is not None or tpm_limit is not None
        self._any_endpoint = "*" in names
        self._endpoints = frozenset(names)
        self._seen: Counter = Counter()
        self._in_flight = 0
        self._ids = itertools.count(1)
        self._id_prefix = uuid.uuid4().hex[:8]
        self._fault_rng = random.Random()
        self._latency_rng = random.Random()
        self._no_latency = self.latency.kind == "fixed" and self.latency.mean_s == 0
        self._reset_state()

        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._started = threading.Event()
        self._startup_error: BaseException | None = None

    # -- addresses ------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``: the Anthropic base URL and the serving-endpoint workspace URL."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, ``http://127.0.0.1:PORT/v1``."""
        return self.url + "/v1"

    @property
    def anthropic_base_url(self) -> str:
        return self.url

    def invocations_url(self, name: str | None = None) -> str:
        """``POST`` URL of a serving endpoint (default: the first of ``endpoint_names``)."""
        name = name or next((n for n in self.endpoint_names if n != "*"), self.served_model)
        return f"{self.url}/serving-endpoints/{name}/invocations"

    @property
    def stats_url(self) -> str:
        return self.url + "/_sim/stats"

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> "ProviderSimulator":
        if self._thread is not None:
            raise RuntimeError("this ProviderSimulator was already started; make a new one")
        self._thread = threading.Thread(target=self._run, name="provider-simulator", daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("the provider simulator did not start within 10 s")
        if self._startup_error is not None:
            raise RuntimeError(f"the provider simulator could not listen on {self.host}:{self._port}: {self._startup_error}") from self._startup_error
        return self

    def _run(self) -> None:
        try:
            import uvloop  # a faster loop when it is installed; the simulator does not need it

            loop = uvloop.new_event_loop()
        except ImportError:
            loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/api/2.0/serving-endpoints/{name}", self._endpoint_info)
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/serving-endpoints/{name}/invocations", self._invocations)
        self.batches.add_routes(app.router)
        app.router.add_get("/_sim/stats", self._stats_route)
        app.router.add_post("/_sim/reset", self._reset_route)
        # handler_cancellation: a client that gives up (timeout) frees its slot at once.
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, handler_cancellation=True, shutdown_timeout=1.0)
        try:
            loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, self.host, self._port, backlog=4096, reuse_address=True)
            loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        except BaseException as exc:  # reported by start()
            self._startup_error = exc
            self._started.set()
            loop.close()
            return
        self._reset_state()  # windows start when the server does
        self._started.set()
        loop.run_forever()
        loop.run_until_complete(self._runner.cleanup())
        loop.close()

    def stop(self) -> None:
        if self._loop is not None and not self._loop.is_closed() and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> "ProviderSimulator":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _on_loop(self, fn: Any) -> Any:
        """Run ``fn`` on the server's loop (the only writer of the counters) and wait for it."""
        loop = self._loop
        if loop is None or not loop.is_running() or threading.current_thread() is self._thread:
            return fn()

        async def call() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), loop).result(10)

    def reset(self) -> None:
        """Zero the counters, forget seen prompts, restart the quota windows and re-seed the draws."""
        self._on_loop(self._reset_state)

    def _reset_state(self) -> None:
        self.stats.clear()
        self.stats.peak_concurrency = self.stats.peak_offered = self._in_flight
        self._seen.clear()
        self._quota.restart()
        self._fault_rng.seed(f"faults/{self.seed}")
        self._latency_rng.seed(f"latency/{self.seed}")

    def snapshot(self) -> dict[str, Any]:
        """A consistent JSON-ready copy of the counters, plus ``in_flight``, ``elapsed_s`` and ``config``."""
        return self._on_loop(self._snapshot_now)

    def served_answers(self) -> list[dict[str, Any]]:
        """One record per answer served (``served_log=True``): ``request_id`` (as in the answer's
        ``x-request-id`` / ``request-id`` header), ``received_at`` (when its request arrived) and
        ``at`` (when the answer was sent; both ``time.monotonic()`` of this process),
        ``prompt_tokens``, ``completion_tokens``. An answer is logged (and counted) even when its
        client has gone away meanwhile, as a provider bills a generation it finished."""
        if self._served_log is None:
            raise RuntimeError("start the simulator with served_log=True to keep a log of the answers served")
        return self._on_loop(lambda: list(self._served_log or ()))

    def _snapshot_now(self) -> dict[str, Any]:
        out = self.stats.as_dict()
        out.update(self.batches.counters)
        out["in_flight"] = self._in_flight
        out["elapsed_s"] = round(time.monotonic() - self._quota.epoch, 6)
        out["config"] = self.config()
        return out

    def config(self) -> dict[str, Any]:
        """The knobs, as JSON (the API key is not shown)."""
        out = {k: getattr(self, k) for k in _CONFIG_KNOBS}
        out.update(endpoint_names=list(self.endpoint_names), auth=self.api_key is not None, latency=self.latency.describe(),
                   error_rates=dict(self.error_rates))
        return out

    # -- routes ---------------------------------------------------------------------------
    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, OPENAI, "chat")

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, OPENAI, "completions")

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, OPENAI, "embeddings")

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, ANTHROPIC, "chat")

    async def _invocations(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, SERVING, None, request.match_info["name"])

    async def _models(self, request: web.Request) -> web.Response:
        # OpenAI and Anthropic both list models here (Anthropic's key comes as x-api-key)
        if self.api_key is not None and not ANTHROPIC.authorized(request.headers, self.api_key):
            sent = request.headers.get("x-api-key") or request.headers.get("Authorization", "").removeprefix("Bearer ")
            message = f"Incorrect API key provided: {sent}." if self.echo_key else OPENAI.bad_key_message
            return web.Response(body=dumps(OPENAI.error(401, message)), status=401, content_type=_JSON)
        model = {"id": self.served_model, "object": "model", "created": 0, "owned_by": "ai-query-simulator"}
        return web.Response(body=dumps({"object": "list", "data": [model]}), content_type=_JSON)

    async def _endpoint_info(self, request: web.Request) -> web.Response:
        """A serving endpoint's description (free, not counted in ``stats.requests``), as Databricks answers it."""
        name = request.match_info["name"]
        if self.api_key is not None and not SERVING.authorized(request.headers, self.api_key):
            return web.Response(body=dumps(SERVING.error(401, SERVING.bad_key_message)), status=401, content_type=_JSON)
        if not self._any_endpoint and name not in self._endpoints:
            message = f"Serving endpoint '{name}' does not exist. This simulator serves: {', '.join(sorted(self._endpoints))}."
            return web.Response(body=dumps(SERVING.error(404, message, "RESOURCE_DOES_NOT_EXIST")), status=404, content_type=_JSON)
        body = {"name": name, "state": {"ready": "READY"}, "config": {"served_entities": [{"name": self.served_model}]}}
        return web.Response(body=dumps(body), content_type=_JSON)

    async def _stats_route(self, request: web.Request) -> web.Response:
        return web.Response(body=dumps(self._snapshot_now()), content_type=_JSON)

    async def _reset_route(self, request: web.Request) -> web.Response:
        self._reset_state()
        return web.Response(body=b'{"reset":true}', content_type=_JSON)

    # -- the pipeline ---------------------------------------------------------------------
    def _error(self, fmt: WireFormat, status: int, message: str, headers: dict[str, str], code: str | None = None) -> web.Response:
        stats = self.stats
        stats.by_status[status] += 1
        if status == 429:
            stats.rate_limited += 1
        sent = _SENT_CREDENTIAL.get()
        if sent is not None:
            header, key, value = sent
            message = f"Incorrect API key provided: {key}." if status == 401 else f"{message} (request headers: {header}: {value})"
        return web.Response(body=dumps(fmt.error(status, message, code)), status=status, headers=headers, content_type=_JSON)

    async def _serve(self, request: web.Request, fmt: WireFormat, task: str | None, endpoint: str | None = None) -> web.StreamResponse:
        stats = self.stats
        stats.requests += 1
        stats.last_request_s = time.monotonic() - self._quota.epoch
        if stats.first_request_s is None:
            stats.first_request_s = stats.last_request_s
        rid = f"{self._id_prefix}{next(self._ids):08x}"
        request[_RECEIVED_AT] = time.monotonic()
        headers = {"x-request-id": "req-" + rid}
        if fmt is ANTHROPIC:
            headers["request-id"] = "req_" + rid
        if self.echo_key:
            header = "x-api-key" if fmt is ANTHROPIC and "x-api-key" in request.headers else "authorization"
            value = request.headers.get(header, "")
            _SENT_CREDENTIAL.set((header, value.removeprefix("Bearer "), value) if value else None)
        if self.api_key is not None and not fmt.authorized(request.headers, self.api_key):
            return self._error(fmt, 401, fmt.bad_key_message, headers)
        refusal = fmt.precheck(request.headers)
        if refusal is not None:
            return self._error(fmt, refusal[0], refusal[1], headers)
        if endpoint is not None and not self._any_endpoint and endpoint not in self._endpoints:
            served = ", ".join(sorted(self._endpoints))
            return self._error(fmt, 404, f"Serving endpoint '{endpoint}' does not exist. This simulator serves: {served}.", headers)
        stats.peak_offered = max(stats.peak_offered, self._in_flight + 1)
        if self.max_concurrency is not None and self._in_flight >= self.max_concurrency:
            stats.concurrency_rejections += 1
            headers["retry-after"] = seconds_header(self.concurrency_retry_after_s)
            return self._error(fmt, 429, f"Too many concurrent requests (the limit is {self.max_concurrency}). Retry shortly.", headers)
        self._in_flight += 1
        if self._in_flight > stats.peak_concurrency:
            stats.peak_concurrency = self._in_flight
        try:
            return await self._admit_and_answer(request, fmt, task, rid, headers)
        finally:
            self._in_flight -= 1

    async def _admit_and_answer(self, request: web.Request, fmt: WireFormat, task: str | None, rid: str, headers: dict[str, str]) -> web.StreamResponse:
        stats = self.stats
        try:
            call = fmt.parse(task, loads(await request.read()))
        except ValueError:
            return self._error(fmt, 400, "The request body is not valid JSON.", headers)
        except BadRequestError as exc:
            return self._error(fmt, exc.status, exc.message, headers, exc.code)

        prompts = call.prompts
        prompt_tokens = sum(map(count_tokens, prompts))
        generative = call.task != "embeddings"
        max_tokens = (call.max_tokens or self.default_max_tokens) if generative else 0
        cost = prompt_tokens + max_tokens * len(prompts)

        quota = self._quota
        if self.tpm_limit is not None and cost > self.tpm_limit:
            return self._error(
                fmt, 400,
                f"Request too large: it needs {cost} tokens (prompt {prompt_tokens} + max_tokens) but the limit is {self.tpm_limit} "
                f"tokens per {self.window_s:g} s. Lower max_tokens or shorten the prompt.",
                headers,
            )
        refused, reset_s = quota.admit(cost)
        if self._limited:
            fmt.quota_headers(quota, reset_s, headers)
        if refused is not None:
            if refused == "requests":
                stats.rpm_rejections += 1
                limit, used = self.rpm_limit, quota.requests
            else:
                stats.tpm_rejections += 1
                limit, used = self.tpm_limit, quota.tokens
            headers["retry-after"] = seconds_header(reset_s)
            headers["retry-after-ms"] = str(math.ceil(reset_s * 1000))
            message = (
                f"Rate limit reached for {refused} per {self.window_s:g} s: limit {limit}, used {used}, "
                f"requested {1 if refused == 'requests' else cost}. Please try again in {seconds_header(reset_s)}s."
            )
            return self._error(fmt, 429, message, headers, refused)
        window = quota.window
        paid = (window, quota.ticket)  # the window for the counters, the admission for a refund
        stats.admitted += 1
        stats.admitted_tokens += cost
        stats.admitted_by_second[int(time.monotonic() - quota.epoch)] += 1
        stats.admitted_by_window[window] += 1
        stats.admitted_tokens_by_window[window] += cost

        # What happens to it: a random fault, else the prompt's directives, else the answer.
        delay = 0.0 if self._no_latency else self.latency.sample(self._latency_rng)
        fault = None
        if self._faults:
            draw = self._fault_rng.random()
            for threshold, kind in self._faults:
                if draw < threshold:
                    fault = kind
                    stats.faults[kind] += 1
                    break
        outcome: tuple[str, int] | None = None
        reply = None
        key = prompts[0] if len(prompts) == 1 else "\n".join(prompts)
        if fault is None and "[[" in key:
            try:
                outcome, reply, extra = directives(key, self._seen)
            except ValueError as exc:
                return self._error(fmt, 400, str(exc), headers)
            delay += extra
            if outcome is not None:
                stats.directives[outcome[0]] += 1
            elif reply is not None:
                stats.directives["reply"] += 1

        answers: list[Answer] = []
        if generative:
            for prompt in prompts:
                text = reply if reply is not None else "echo: " + (DIRECTIVE.sub("", prompt).strip() if "[[" in prompt else prompt.strip())
                answers.append(generate(text, max_tokens, call.stop))
            if self.per_token_latency_s and not call.stream:
                delay += self.per_token_latency_s * sum(a.tokens for a in answers)
        if fault == "timeout":
            delay += self.hang_s
        if delay > 0:
            await asyncio.sleep(delay)

        if fault is not None and fault != "timeout":
            if fault == "500":
                return self._error(fmt, 500, "The server had an error while processing your request.", headers)
            if fault == "503":
                return self._error(fmt, fmt.overloaded_status, "The server is overloaded, try again.", headers)
            if fault == "reset":
                return abort(request)
            return await self._malformed(request, fmt, call, answers, prompt_tokens, rid, headers)
        if outcome is not None:
            kind, value = outcome
            if kind == "status":
                return self._error(fmt, value, f"injected status {value}", headers)
            if kind == "flaky":
                return self._error(fmt, fmt.overloaded_status, "The server is overloaded, try again.", headers)
            if kind == "ratelimit":
                headers["retry-after"] = "0"
                return self._error(fmt, 429, "Rate limit reached (injected by [[ratelimit]]).", headers)
            if kind == "reset":
                return abort(request)
            return await self._malformed(request, fmt, call, answers, prompt_tokens, rid, headers)

        completion_tokens = sum(a.tokens for a in answers)
        if call.stream:
            return await self._stream(request, fmt, call, answers, prompt_tokens, rid, headers, paid, max_tokens)
        vectors = [embed(p, call.dimensions or self.embedding_dim) for p in prompts] if not generative else []
        body = dumps(fmt.answer(call, answers, vectors, prompt_tokens, rid, self.served_model))
        self._served(prompt_tokens, completion_tokens, paid, max_tokens * len(prompts) - completion_tokens, request, headers)
        return web.Response(body=body, headers=headers, content_type=_JSON)

    def _served(self, prompt_tokens: int, completion_tokens: int, paid: tuple[int, object], unused: int, request: web.Request,
                headers: Mapping[str, str]) -> None:
        """Count an answer as served (billed) — when it is sent, whether or not the client reads it."""
        if self._served_log is not None:
            self._served_log.append({"request_id": headers.get("request-id") or headers["x-request-id"],
                                     "received_at": request[_RECEIVED_AT], "at": time.monotonic(),
                                     "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens})
        stats = self.stats
        stats.by_status[200] += 1
        stats.ok += 1
        stats.prompt_tokens += prompt_tokens
        stats.completion_tokens += completion_tokens
        if self.tpm_refund_unused and unused > 0:
            window = paid[0]
            given = self._quota.refund(paid[1], unused)
            stats.admitted_tokens -= given
            stats.admitted_tokens_by_window[window] -= given

    async def _malformed(
        self, request: web.Request, fmt: WireFormat, call: Call, answers: list[Answer], prompt_tokens: int, rid: str, headers: dict[str, str]
    ) -> web.StreamResponse:
        """200 with the answer cut in the middle (a ``malformed`` fault): no prefix of a JSON object parses."""
        self.stats.by_status[200] += 1
        if call.stream:
            response = web.StreamResponse(headers=headers)
            response.content_type = "text/event-stream"
            await response.prepare(request)
            await response.write(b"".join(fmt.malformed_stream(rid)))
            await response.write_eof()
            return response
        vectors = [embed(p, call.dimensions or self.embedding_dim) for p in call.prompts] if call.task == "embeddings" else []
        whole = dumps(fmt.answer(call, answers, vectors, prompt_tokens, rid, self.served_model))
        return web.Response(body=whole[: len(whole) // 2], headers=headers, content_type=_JSON)

    async def _stream(
        self, request: web.Request, fmt: WireFormat, call: Call, answers: list[Answer], prompt_tokens: int,
        rid: str, headers: dict[str, str], paid: tuple[int, object], max_tokens: int,
    ) -> web.StreamResponse:
        headers["cache-control"] = "no-cache"
        response = web.StreamResponse(headers=headers)
        response.content_type = "text/event-stream"
        frames = fmt.stream_events(call, answers, prompt_tokens, rid, self.served_model)
        await response.prepare(request)
        if self.per_token_latency_s:
            for frame in frames:
                await response.write(frame)
                await asyncio.sleep(self.per_token_latency_s)
        else:
            await response.write(b"".join(frames))
        await response.write_eof()
        completion_tokens = sum(a.tokens for a in answers)
        self._served(prompt_tokens, completion_tokens, paid, max_tokens * len(answers) - completion_tokens, request, headers)
        return response
