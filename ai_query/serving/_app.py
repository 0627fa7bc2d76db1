"""The serving endpoint's ASGI app (Starlette): queries, the management API, auth and rate limits.

Routes::

    POST   /serving-endpoints/{name}/invocations          llm/v1/chat | completions | embeddings
    POST   /v1/chat/completions  /v1/completions  /v1/embeddings   OpenAI-compatible (model = endpoint)
    GET    /v1/models
    GET    /api/2.0/serving-endpoints                     list          POST  create
    GET    /api/2.0/serving-endpoints/{name}              get           DELETE delete
    PUT    /api/2.0/serving-endpoints/{name}/config       update config (old config serves until the new is ready)
    PUT    /api/2.0/serving-endpoints/{name}/rate-limits
    PATCH  /api/2.0/serving-endpoints/{name}/tags
    GET    /api/2.0/serving-endpoints/get-model-optimization-info/{model}/{version}
    GET    /health
    GET    /metrics                                       Prometheus (``_metrics``)

Every query goes through ``EndpointClient.call``, the code path of a Spark row.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Mapping

from .._logging import get_logger
from .._errors import AIQueryError, ArgumentError, ConfigError, RateLimitedError, ServingError
from ..backends import local_model_folder
from ..backends import check_params, model_contract
from ..backends._mlflow import import_mlflow
from .._schemas import _PARAMETER_TYPES, ModelParameters
from ._auth import Principal, TokenAuthenticator
from ._json import dumps, loads
from ._metrics import ServingMetrics, create_metrics, prometheus_missing
from ._ratelimit import RateLimiter, retry_after_header
from ._store import EndpointStore
from ._tables import ServingTables
from ._bodies import ParsedRequest, parse_request, render_response, sse_chunks
from ._scoring import is_scoring, parse_scoring, render_predictions

log = get_logger("ai_query.serving")

_OPENAI_TASKS = {"/v1/chat/completions": "llm/v1/chat", "/v1/completions": "llm/v1/completions", "/v1/embeddings": "llm/v1/embeddings"}
_QUERY_HEADERS = frozenset({b"authorization", b"x-client-request-id"})
MAX_REQUEST_BYTES = 16 * 1024 * 1024
"""Default request body limit (``ai-query serve --max-request-mb``): a larger body is refused 413
before anything is forwarded to a model (the largest legitimate bodies, a few images as base64, fit)."""
LOCAL_CHUNK_TOKENS_PER_S = 250
"""Provisioned-throughput increment of a local model: new tokens/s of one fp32 engine on 2 CPU cores
(ENVIRONMENT.md); ``get-model-optimization-info`` reports it as ``throughput_chunk_size``."""


def _encode(data: Any) -> bytes:
    return dumps(data)


def _failure_body(exc: ServingError, openai_style: bool) -> dict[str, Any]:
    if openai_style:
        kind = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                429: "rate_limit_error"}.get(exc.status, "api_error")
        return {"error": {"message": exc.message, "type": kind, "code": exc.error_code}}
    return {"error_code": exc.error_code, "message": exc.message}


def _json(data: Any, status: int = 200, headers: Mapping[str, str] | None = None):
    from starlette.responses import Response

    return Response(_encode(data), status_code=status, media_type="application/json", headers=headers)


def _failure_response(exc: ServingError, openai_style: bool):
    return _json(_failure_body(exc, openai_style), exc.status, exc.headers)


def _status_of_failed_row(status_code: int | None) -> tuple[int, str]:
    if status_code == 429:
        return 429, "REQUEST_LIMIT_EXCEEDED"
    if status_code is not None and 400 <= status_code < 500:
        return 400, "BAD_REQUEST"
    if status_code == 503:  # the model's endpoint is down (an outage the request waited out in vain)
        return 503, "TEMPORARILY_UNAVAILABLE"
    return 502, "UPSTREAM_ERROR"


class ServingApp:
    """State of one server: endpoints, auth, rate limits, tables; ``asgi`` is the app to run."""

    def __init__(self, store: EndpointStore, auth: TokenAuthenticator, *, tables: ServingTables | None = None,
                 limiter: RateLimiter | None = None, on_started: Callable[[], None] | None = None,
                 max_request_bytes: int = MAX_REQUEST_BYTES, metrics: ServingMetrics | None = None) -> None:
        if isinstance(max_request_bytes, bool) or not isinstance(max_request_bytes, int) or max_request_bytes < 1:
            raise ConfigError(f"the request size limit must be a whole number of bytes >= 1, got {max_request_bytes!r}")
        self.max_request_bytes = max_request_bytes
        self.store = store
        self.auth = auth
        self.tables = tables or ServingTables(None)
        self.limiter = limiter or RateLimiter()
        self.on_started = on_started
        self.metrics = metrics if metrics is not None else create_metrics()
        """None without prometheus-client: ``/metrics`` answers 501 naming the package."""
        """Called once the app has started (endpoints deployed): a worker tells its supervisor."""
        self._starlette = self._build()

    async def asgi(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The ASGI app. Queries take a short path of their own (no router, no middleware stack,
        no request objects: they are the hot path); everything else goes to Starlette."""
        if scope["type"] == "http":
            self.store.refresh()  # what other workers changed (nothing to do with one process)
            declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
            if declared is not None and (not declared.isdigit() or int(declared) > self.max_request_bytes):
                await self._refuse(send, self._too_large() if declared.isdigit() else
                                   ServingError(400, "MALFORMED_REQUEST", f"Content-Length {declared.decode('latin-1')!r} is not a number"))
                return
            receive = self._limited(receive)
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            task = _OPENAI_TASKS.get(path)
            name = None
            if task is None and path.startswith("/serving-endpoints/") and path.endswith("/invocations"):
                name = path[len("/serving-endpoints/"):-len("/invocations")]
            if task is not None or (name and "/" not in name):
                await self._serve_query(scope, receive, send, name, task)
                return
        await self._starlette(scope, receive, send)

    def _too_large(self) -> ServingError:
        limit = self.max_request_bytes
        shown = next((f"{limit / unit:g} {name}" for unit, name in ((1 << 20, "MB"), (1 << 10, "KB"), (1, "bytes")) if limit >= unit))
        return ServingError(413, "REQUEST_TOO_LARGE",
                            f"the request body is larger than this server's limit of {shown} ({limit} bytes); send a smaller "
                            "body (fewer inputs per request), or start the server with a higher --max-request-mb")

    def _limited(self, receive: Any) -> Any:
        """``receive`` that raises the 413 ``ServingError`` once the body passes the limit (chunked bodies too)."""
        seen = 0

        async def limited() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_request_bytes:
                raise self._too_large()
            return message

        return limited

    @staticmethod
    async def _refuse(send: Any, exc: ServingError) -> None:
        body = _encode(_failure_body(exc, False))
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": exc.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _serve_query(self, scope: dict[str, Any], receive: Any, send: Any, name: str | None, task: str | None) -> None:
        chunks = []
        try:
            while True:
                message = await receive()
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
        except ServingError as exc:  # over the size limit: nothing was forwarded
            await self._refuse(send, exc)
            return
        # only the headers a query reads (names arrive lower-cased)
        headers = {k.decode(): v.decode("latin-1") for k, v in scope["headers"] if k in _QUERY_HEADERS}
        where = ["", ""]  # the endpoint (once known to exist) and the entity that answered: metric labels
        started, status = time.perf_counter(), 500  # a bug of ours (uvicorn answers 500) counts as 500
        try:
            status, extra, body, events = await self._query(headers, b"".join(chunks), name, task, where)
        except ServingError as exc:
            status, extra, body, events = exc.status, exc.headers, _encode(_failure_body(exc, task is not None)), None
        finally:
            if self.metrics is not None:
                self.metrics.finished(where[0], where[1], status, time.perf_counter() - started, bool(where[0]))
        media = b"text/event-stream" if events is not None else b"application/json"
        out_headers = [(b"content-type", media), *[(k.lower().encode(), v.encode()) for k, v in extra.items()]]
        if events is None:
            out_headers.append((b"content-length", str(len(body)).encode()))
            await send({"type": "http.response.start", "status": status, "headers": out_headers})
            await send({"type": "http.response.body", "body": body})
            return
        await send({"type": "http.response.start", "status": status, "headers": [*out_headers, (b"cache-control", b"no-cache")]})
        for event in events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    # -- plumbing ---------------------------------------------------------------------------
    def _build(self):
        from starlette.applications import Starlette
        from starlette.routing import Route

        from starlette.exceptions import HTTPException

        def handler(fn, openai_style=False):
            async def endpoint(request):
                try:
                    return await fn(request)
                except ServingError as exc:
                    return _failure_response(exc, openai_style)
                except AIQueryError as exc:  # a config the store refused: the caller's to fix
                    return _failure_response(ServingError(400, "INVALID_PARAMETER_VALUE", str(exc)), openai_style)
                except Exception:  # a bug of ours: still the JSON shape, the details in the log only
                    log.exception("%s %s failed", request.method, request.url.path)
                    return _failure_response(ServingError(500, "INTERNAL_ERROR", f"{request.method} {request.url.path} failed "
                                                          "inside the server; see the server log"), openai_style)
            return endpoint

        async def http_error(request, exc: HTTPException):
            method, path = request.method, request.url.path
            if exc.status_code == 405:  # every method of every route on this path (Starlette names the first route's)
                from starlette.routing import Match

                methods = {m for r in routes if r.matches(request.scope)[0] is not Match.NONE for m in (r.methods or ())}
                allowed = ", ".join(sorted(methods - {"HEAD"})) or (exc.headers or {}).get("Allow", "")
                error = ServingError(405, "METHOD_NOT_ALLOWED", f"{method} is not allowed on {path}; it takes {allowed}",
                                     {"Allow": allowed})
            elif exc.status_code == 404:
                error = ServingError(404, "ENDPOINT_NOT_FOUND", f"no API answers {method} {path}; the routes are listed in "
                                     "the README (e.g. POST /serving-endpoints/NAME/invocations, GET /api/2.0/serving-endpoints)")
            else:
                error = ServingError(exc.status_code, "BAD_REQUEST", f"{method} {path}: {exc.detail}")
            return _failure_response(error, False)

        async def post_only(request):  # POSTs to these paths take the fast path in ``asgi``; this only answers 405
            raise HTTPException(405, headers={"Allow": "POST"})

        api = "/api/2.0/serving-endpoints"
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics_page, methods=["GET"]),
            Route("/v1/models", handler(self.models, True), methods=["GET"]),
            Route(api, handler(self.list_endpoints), methods=["GET"]),
            Route(api, handler(self.create_endpoint), methods=["POST"]),
            Route(api + "/get-model-optimization-info/{model}/{version}", handler(self.optimization_info), methods=["GET"]),
            Route(api + "/{name}", handler(self.get_endpoint), methods=["GET"]),
            Route(api + "/{name}", handler(self.delete_endpoint), methods=["DELETE"]),
            Route(api + "/{name}/config", handler(self.update_config), methods=["PUT"]),
            Route(api + "/{name}/rate-limits", handler(self.put_rate_limits), methods=["PUT"]),
            Route(api + "/{name}/tags", handler(self.patch_tags), methods=["PATCH"]),
            *[Route(path, post_only, methods=["POST"]) for path in (*_OPENAI_TASKS, "/serving-endpoints/{name}/invocations")],
        ]

        @asynccontextmanager
        async def lifespan(app) -> AsyncIterator[None]:
            await self.store.start()
            self.tables.start()
            if self.on_started is not None:
                self.on_started()
            try:
                yield
            finally:
                await self.tables.close()
                await self.store.close()

        return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})

    def _principal(self, request) -> Principal:
        return self.auth.authenticate(request.headers.get("authorization"))

    @staticmethod
    async def _body(request) -> Any:
        raw = await request.body()
        if not raw:
            return {}
        try:
            return loads(raw)
        except ValueError as exc:
            raise ServingError(400, "MALFORMED_REQUEST", f"the request body is not valid JSON: {exc}") from None

    @classmethod
    async def _object_body(cls, request, shape: str) -> Mapping[str, Any]:
        """The body as a JSON object; 400 naming what came instead and the ``shape`` expected."""
        body = await cls._body(request)
        if not isinstance(body, Mapping):
            got = {str: "a string", list: "a list", bool: "a boolean", int: "a number", float: "a number"}.get(type(body), "null")
            raise ServingError(400, "MALFORMED_REQUEST", f"the body of {request.method} {request.url.path} must be a JSON object "
                               f"like {shape}, got {got}: {dumps(body).decode()[:80]}")
        return body

    # -- queries ----------------------------------------------------------------------------
    async def health(self, request):
        return _json({"status": "ok", "pid": os.getpid()})  # pid: which worker answered

    async def metrics_page(self, request):
        from starlette.responses import Response

        if self.metrics is None:
            return _failure_response(ServingError(501, "NOT_IMPLEMENTED", prometheus_missing() or ""), False)
        body, content_type = self.metrics.exposition()
        return Response(body, media_type=content_type)

    async def _query(self, headers: Mapping[str, str], raw: bytes, name: str | None, task: str | None, where: list[str]
                     ) -> tuple[int, dict[str, str], bytes, list[bytes] | None]:
        """One query: (status, headers, JSON body, or server-sent events for a stream); ``where`` gets
        the endpoint's name once it exists and the entity that answered (the metrics' labels)."""
        principal = self.auth.authenticate(headers.get("authorization"))
        try:
            body = loads(raw) if raw else {}
        except ValueError as exc:
            raise ServingError(400, "MALFORMED_REQUEST", f"the request body is not valid JSON: {exc}") from None
        if name is None:  # OpenAI-compatible: the model is the endpoint
            name = body.get("model") if isinstance(body, dict) else None
            if not isinstance(name, str) or not name:
                raise ServingError(400, "INVALID_PARAMETER_VALUE", "'model' is required: the serving endpoint's name (GET /v1/models lists them)")
        record = self.store.get(name)
        if self.metrics is not None:
            where[0] = name
            self.metrics.started(name)
        principal.require("CAN_QUERY", name, record.creator)
        dep = self.store.deployment(name)
        if not dep.ready:
            why = f"its deployment failed: {dep.error}" if dep.error else "it is still being deployed"
            raise ServingError(503, "TEMPORARILY_UNAVAILABLE", f"serving endpoint {name!r} is not ready: {why}", {"Retry-After": "1"})
        config = dep.config
        try:
            self.limiter.admit(name, config.rate_limits, principal.user)
        except RateLimitedError as exc:
            if self.metrics is not None:
                self.metrics.rate_limited(name)
            raise ServingError(429, "REQUEST_LIMIT_EXCEEDED", str(exc), {"Retry-After": retry_after_header(exc.retry_after)}) from None
        if task is not None and task != config.task:
            raise ServingError(400, "INVALID_PARAMETER_VALUE", f"serving endpoint {name!r} serves {config.task}, not {task}")
        custom = any(e.may_be_custom for e in config.served_entities)
        try:
            parsed = await self._scoring_request(config, body) if custom and is_scoring(body) else \
                parse_request(config.task, body, custom=custom)
        except ArgumentError as exc:
            raise ServingError(400, "INVALID_PARAMETER_VALUE", str(exc)) from None
        client = dep.client
        wait = config.client_config.request_timeout_s  # a served request waits out an outage this long at most
        try:
            if len(parsed.values) == 1:
                results = [await client.call(parsed.values[0], parsed.params, parsed.response_format, wait_at_most_s=wait)]
            else:
                results = list(await asyncio.gather(*(client.call(v, parsed.params, parsed.response_format, index=i,
                                                                  wait_at_most_s=wait)
                                                      for i, v in enumerate(parsed.values))))
        except AIQueryError as exc:  # systemic: bad backend key, missing secret, engine down
            log.warning("serving endpoint %r: %s", name, exc)
            raise ServingError(502, "UPSTREAM_ERROR", f"serving endpoint {name!r} cannot reach its model: {exc}") from None
        failed = next((r for r in results if not r.ok), None)
        if self.metrics is not None:
            where[1] = next((r.model for r in ([failed] if failed else results) if r.model), "")
            self.metrics.tokens(name, results)
        status, code = (200, "") if failed is None else _status_of_failed_row(failed.status_code)
        if self.tables.enabled:
            client_request_id = headers.get("x-client-request-id") or (body.get("client_request_id") if isinstance(body, dict) else None)
            for value, result in zip(parsed.values, results):
                self.tables.record(result, value, requester=principal.user, client_request_id=client_request_id,
                                   status_code=status, streaming=parsed.stream, usage_context=parsed.usage_context)
        if failed is not None:
            raise ServingError(status, code, f"serving endpoint {name!r}: {failed.error}",
                               {"Retry-After": "1"} if status in (429, 503) else None)
        if parsed.scoring:
            return 200, {}, _encode(render_predictions(results)), None
        out = render_response(config.task, results)
        if parsed.stream and config.task == "llm/v1/chat":
            return 200, {}, b"", sse_chunks(out, parsed.include_usage)
        return 200, {}, _encode(out), None

    @staticmethod
    async def _scoring_request(config: Any, body: Mapping[str, Any]) -> ParsedRequest:
        """An MLflow scoring-protocol body for a custom model; its params checked against the signature."""
        scoring = parse_scoring(body)
        contract = await asyncio.to_thread(model_contract, config.entity)  # None: a model behind HTTP judges its params
        if contract is not None:
            check_params(scoring.params, contract.params, repr(config.entity.model_name),
                         llm_names=() if contract.takes_records else _PARAMETER_TYPES)
        return ParsedRequest(scoring.records, ModelParameters.from_mapping(scoring.params, custom=True), None, scoring=True)

    async def models(self, request):
        principal = self._principal(request)
        data = [{"id": r.name, "object": "model", "created": r.creation_timestamp // 1000, "owned_by": r.creator}
                for r in self.store.records.values() if principal.level(r.name, r.creator) is not None]
        return _json({"object": "list", "data": data})

    # -- management -------------------------------------------------------------------------
    def _render(self, principal: Principal, name: str, needed: str = "CAN_QUERY") -> dict[str, Any]:
        record = self.store.get(name)
        level = principal.require(needed, name, record.creator)
        return self.store.render(record, level)

    async def list_endpoints(self, request):
        principal = self._principal(request)
        out = []
        for record in self.store.records.values():
            level = principal.level(record.name, record.creator)
            if level is not None:
                out.append(self.store.render(record, level))
        return _json({"endpoints": out})

    async def create_endpoint(self, request):
        principal = self._principal(request)
        body = await self._object_body(request, '{"name": ..., "config": {"served_entities": [...]}}')
        name = body.get("name")
        principal.require("CAN_MANAGE", str(name))
        record = self.store.create(body, principal.user)
        return _json(self.store.render(record, "CAN_MANAGE"))

    async def get_endpoint(self, request):
        return _json(self._render(self._principal(request), request.path_params["name"]))

    async def delete_endpoint(self, request):
        principal = self._principal(request)
        name = request.path_params["name"]
        record = self.store.get(name)
        principal.require("CAN_MANAGE", name, record.creator)
        self.store.delete(name)
        self.limiter.forget(name)
        return _json({})

    async def update_config(self, request):
        principal = self._principal(request)
        name = request.path_params["name"]
        principal.require("CAN_MANAGE", name, self.store.get(name).creator)
        body = await self._object_body(request, '{"served_entities": [...]}')
        record = self.store.update_config(name, body)
        await asyncio.sleep(0)  # an update with nothing to warm finishes before we answer
        return _json(self.store.render(record, principal.level(name, record.creator)))

    async def put_rate_limits(self, request):
        principal = self._principal(request)
        name = request.path_params["name"]
        principal.require("CAN_MANAGE", name, self.store.get(name).creator)
        body = await self._object_body(request, '{"rate_limits": [{"calls": 100, "key": "user", "renewal_period": "minute"}]}')
        if not isinstance(body.get("rate_limits", []), list):
            raise ServingError(400, "INVALID_PARAMETER_VALUE", f"rate_limits must be a list of {{calls, key, renewal_period}}, "
                               f"got {dumps(body['rate_limits']).decode()[:80]}")
        limits = self.store.put_rate_limits(name, body)
        self.limiter.forget(name)
        return _json({"rate_limits": limits})

    async def patch_tags(self, request):
        principal = self._principal(request)
        name = request.path_params["name"]
        principal.require("CAN_MANAGE", name, self.store.get(name).creator)
        body = await self._object_body(request, '{"add_tags": [{"key": "team", "value": "a"}], "delete_tags": ["old"]}')
        delete = body.get("delete_tags", [])
        if isinstance(delete, list) and not all(isinstance(k, str) for k in delete):
            raise ServingError(400, "INVALID_PARAMETER_VALUE", f"delete_tags must be a list of tag keys (strings), got "
                               f"{dumps(delete).decode()[:80]}")
        return _json({"tags": self.store.patch_tags(name, body)})

    async def optimization_info(self, request):
        self._principal(request)
        model, version = request.path_params["model"], request.path_params["version"]
        return _json(await asyncio.to_thread(optimization_info, model, version))


def optimization_info(model: str, version: str) -> dict[str, Any]:
    """Whether ``model`` (a local model alias, or an MLflow registered model) can take provisioned throughput."""
    folder = local_model_folder(model)
    if folder is not None:
        try:
            model_type = json.loads((folder / "config.json").read_text()).get("model_type", "unknown")
        except (OSError, ValueError):
            raise ServingError(404, "RESOURCE_DOES_NOT_EXIST", f"local model {model!r} is not prepared: run 'ai-query prepare {model}'") from None
        generative = model_type not in ("bert",)
        return {"optimizable": generative, "model_type": model_type,
                **({"throughput_chunk_size": LOCAL_CHUNK_TOKENS_PER_S} if generative else {})}
    try:
        import_mlflow()  # not while a model loads in another thread: see import_mlflow
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
    except ImportError:  # pragma: no cover - mlflow-skinny is a dependency
        raise ServingError(404, "RESOURCE_DOES_NOT_EXIST", f"model {model!r} is not a local model and mlflow is not installed") from None
    try:
        mv = MlflowClient().get_model_version(model, version)
    except MlflowException as exc:
        raise ServingError(404, "RESOURCE_DOES_NOT_EXIST", f"model {model!r} version {version!r} is not registered: {exc.message}") from None
    # Only models served by an engine that batches tokens (transformers / vLLM) can be provisioned in tokens/s.
    flavors = _flavors(mv.source)
    optimizable = "transformers" in flavors
    return {"optimizable": optimizable, "model_type": "transformers" if optimizable else "pyfunc",
            **({"throughput_chunk_size": LOCAL_CHUNK_TOKENS_PER_S} if optimizable else {})}


def _flavors(source: str) -> set[str]:
    try:
        from mlflow.models import Model

        return set(Model.load(source).flavors)
    except Exception:  # noqa: BLE001 - an unreadable model is simply not optimizable
        return set()
