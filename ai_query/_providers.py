"""Provider adapters: how one request of a task is put on the wire and how the answer is read.

Each served-entity kind gets a ``Provider``: ``build()`` turns (task, input, parameters) into an
HTTP request, ``parse()`` turns the HTTP answer into a ``ModelResponse`` or raises the
``EndpointError`` subclass that tells the retry policy what to do. Providers do no I/O of their
own, so the same code serves Spark tasks, batch jobs and the serving endpoint.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

from .config import AnthropicConfig, LocalModel, ServedEntity, ServingEndpointConfig
from ._errors import (
    EndpointError,
    LocalEngineError,
    PermanentEndpointError,
    RateLimitedError,
    RetryableEndpointError,
    SystemicEndpointError,
)
from ._files import anthropic_content
from ._schemas import ModelParameters, ModelResponse, Usage
from .config import resolve_secret

_PATHS = {"llm/v1/chat": "/chat/completions", "llm/v1/completions": "/completions", "llm/v1/embeddings": "/embeddings"}


@dataclass(frozen=True)
class HTTPRequest:
    method: str
    url: str
    headers: Mapping[str, str]
    json: Mapping[str, Any]


class Provider(Protocol):
    """Builds requests for, and parses answers from, one served entity."""

    entity: ServedEntity

    async def build(self, task: str, value: Any, params: ModelParameters, response_format: Mapping[str, Any] | None) -> HTTPRequest: ...

    def parse(self, task: str, status: int, headers: Mapping[str, str], body: bytes, prompt_text: str) -> ModelResponse: ...


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` / ``Retry-After`` (seconds or an HTTP date)."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(0.0, float(millis) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def _error_detail(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        text = body.decode("utf-8", "replace").strip()
        return text[:300] or "(empty body)"
    if isinstance(data, Mapping):
        err = data.get("error", data.get("message", data))
        if isinstance(err, Mapping):
            err = err.get("message", err)
        return str(err)[:300]
    return str(data)[:300]


def raise_for_status(status: int, headers: Mapping[str, str], body: bytes, endpoint_hint: str) -> None:
    """Map an HTTP status to the error the retry policy acts on; 2xx passes."""
    if 200 <= status < 300:
        return
    request_id = headers.get("x-request-id")
    detail = _error_detail(body)
    message = f"HTTP {status} from {endpoint_hint}: {detail}"
    if status in (429, 529) or (status == 503 and "retry-after" in headers):
        raise RateLimitedError(message, status_code=status, request_id=request_id, retry_after=parse_retry_after(headers))
    if status in (408, 409, 425) or status >= 500:
        raise RetryableEndpointError(message, status_code=status, request_id=request_id)
    if status in (401, 403):
        raise SystemicEndpointError(
            f"{message}. Check the API key (the secret the endpoint config references) and its permissions.",
            status_code=status,
            request_id=request_id,
        )
    if status == 404:
        raise SystemicEndpointError(
            f"{message}. Check the base URL and the model name in the endpoint config.", status_code=status, request_id=request_id
        )
    raise PermanentEndpointError(message, status_code=status, request_id=request_id)


def _json_native(value: Any) -> bool:
    """Made only of what JSON has (exact types, so no subclass with its own encoding slips through)."""
    kind = type(value)
    if kind is str or kind is int or kind is float or kind is bool or value is None:
        return True
    if kind is list or kind is tuple:
        return all(_json_native(v) for v in value)
    if kind is dict:
        return all(type(k) is str and _json_native(v) for k, v in value.items())
    return False


def _check_request(task: str, value: Any) -> None:
    """A request JSON cannot carry (BINARY, a DATE inside a struct) is this row's error, not a crash of the batch."""
    if _json_native(value):  # the common case (strings, chat messages), without encoding it once for nothing
        return
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise PermanentEndpointError(
            f"the request cannot be sent to a {task} endpoint as JSON ({exc}); give a STRING request, "
            "e.g. CAST(col AS STRING) or CONCAT('...', col)"
        ) from None


def llm_v1_body(task: str, value: Any, params: ModelParameters, response_format: Mapping[str, Any] | None) -> dict[str, Any]:
    """The request body of the ``llm/v1/*`` schemas (OpenAI's, without ``model``)."""
    _check_request(task, value)
    body: dict[str, Any] = {}
    if task == "llm/v1/chat":
        body["messages"] = value if isinstance(value, list) else [{"role": "user", "content": value}]
    elif task == "llm/v1/completions":
        body["prompt"] = value
    else:
        body["input"] = value
    if task != "llm/v1/embeddings":
        body.update(params.as_dict())
        if response_format is not None:
            body["response_format"] = dict(response_format)
    return body


def _bearer(credential: tuple[str | None, str | None]) -> str | None:
    ref, plain = credential
    return resolve_secret(ref) if ref is not None else plain


def _parse_openai_shape(
    entity: ServedEntity, task: str, status: int, headers: Mapping[str, str], body: bytes, prompt_text: str, model: str
) -> ModelResponse:
    """Read an OpenAI-shaped answer (also the ``llm/v1/*`` serving-endpoint schemas)."""
    raise_for_status(status, headers, body, f"served entity {entity.name!r}")
    try:
        data = json.loads(body)
        if task == "llm/v1/embeddings":
            value: Any = [float(x) for x in data["data"][0]["embedding"]]
            completion_text = ""
            finish = None
        else:
            choice = data["choices"][0]
            value = choice["message"]["content"] if task == "llm/v1/chat" else choice["text"]
            if value is None:
                value = ""
            if not isinstance(value, str):
                raise TypeError(f"content is {type(value).__name__}")
            completion_text = value
            finish = choice.get("finish_reason")
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise _malformed(entity, task, status, headers, body, exc) from exc
    usage = Usage.from_payload(data.get("usage"), prompt_text, completion_text)
    return ModelResponse(
        value=value,
        usage=usage,
        model=data.get("model") or model,
        request_id=headers.get("x-request-id") or data.get("id"),
        finish_reason=finish,
        raw=data,
    )


def _malformed(entity: ServedEntity, task: str, status: int, headers: Mapping[str, str], body: bytes, exc: Exception) -> RetryableEndpointError:
    return RetryableEndpointError(
        f"HTTP {status} from served entity {entity.name!r} with a body that is not a valid {task} response "
        f"({type(exc).__name__}: {exc}): {body[:200]!r}",
        status_code=status,
        request_id=headers.get("x-request-id"),
    )


class OpenAICompatibleProvider:
    """Any server that speaks the OpenAI REST API (OpenAI, vLLM, many gateways)."""

    def __init__(self, entity: ServedEntity) -> None:
        assert entity.external_model is not None and entity.external_model.openai_config is not None
        self.entity = entity
        self._config = entity.external_model.openai_config
        self._model = entity.external_model.name

    async def base_url(self) -> str:
        return self._config.openai_api_base

    async def model(self) -> str:
        return self._model

    def _headers(self) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        key = _bearer(self._config.credential())
        if key:
            headers["authorization"] = f"Bearer {key}"
        if self._config.openai_organization:
            headers["openai-organization"] = self._config.openai_organization
        return headers

    async def build(self, task: str, value: Any, params: ModelParameters, response_format: Mapping[str, Any] | None) -> HTTPRequest:
        body = {"model": await self.model(), **llm_v1_body(task, value, params, response_format)}
        return HTTPRequest("POST", (await self.base_url()) + _PATHS[task], self._headers(), body)

    def parse(self, task: str, status: int, headers: Mapping[str, str], body: bytes, prompt_text: str) -> ModelResponse:
        return _parse_openai_shape(self.entity, task, status, headers, body, prompt_text, self._model)


class ServingEndpointProvider:
    """A serving endpoint: ``POST {workspace}/serving-endpoints/{name}/invocations`` with a bearer token.

    Bodies and answers follow the ``llm/v1/chat``, ``llm/v1/completions`` and ``llm/v1/embeddings``
    schemas (OpenAI-shaped, without a ``model`` field: the URL names the endpoint).
    """

    def __init__(self, entity: ServedEntity) -> None:
        assert entity.external_model is not None and isinstance(entity.external_model.config, ServingEndpointConfig)
        self.entity = entity
        self._config: ServingEndpointConfig = entity.external_model.config
        self._name = entity.external_model.name

    async def build(self, task: str, value: Any, params: ModelParameters, response_format: Mapping[str, Any] | None) -> HTTPRequest:
        body = llm_v1_body(task, value, params, response_format)
        headers = {"content-type": "application/json"}
        token = _bearer(self._config.credential())
        if token:
            headers["authorization"] = f"Bearer {token}"
        url = f"{self._config.databricks_workspace_url}/serving-endpoints/{self._name}/invocations"
        return HTTPRequest("POST", url, headers, body)

    def parse(self, task: str, status: int, headers: Mapping[str, str], body: bytes, prompt_text: str) -> ModelResponse:
        return _parse_openai_shape(self.entity, task, status, headers, body, prompt_text, self._name)


class AnthropicProvider:
    """The Anthropic Messages API; chat (and completions, sent as one user message) map to messages."""

    def __init__(self, entity: ServedEntity) -> None:
        assert entity.external_model is not None and isinstance(entity.external_model.config, AnthropicConfig)
        self.entity = entity
        self._config: AnthropicConfig = entity.external_model.config
        self._model = entity.external_model.name

    async def build(self, task: str, value: Any, params: ModelParameters, response_format: Mapping[str, Any] | None) -> HTTPRequest:
        messages = value if isinstance(value, list) else [{"role": "user", "content": value}]
        system = [m["content"] for m in messages if isinstance(m, Mapping) and m.get("role") == "system"]
        body: dict[str, Any] = {
            "model": self._model,
            "messages": [{**m, "content": anthropic_content(m.get("content"))} if isinstance(m, Mapping) else m
                         for m in messages if not (isinstance(m, Mapping) and m.get("role") == "system")],
        }
        if system:
            body["system"] = "\n\n".join(str(x) for x in system)
        p = params.as_dict()
        body["max_tokens"] = p.pop("max_tokens", 1024)  # required by the Messages API
        if "stop" in p:
            body["stop_sequences"] = p.pop("stop")
        for key in ("temperature", "top_p", "top_k"):
            if key in p:
                body[key] = p[key]
        headers = {"content-type": "application/json", "anthropic-version": self._config.anthropic_version}
        key = _bearer(self._config.credential())
        if key:
            headers["x-api-key"] = key
        return HTTPRequest("POST", f"{self._config.anthropic_api_base}/v1/messages", headers, body)

    def parse(self, task: str, status: int, headers: Mapping[str, str], body: bytes, prompt_text: str) -> ModelResponse:
        raise_for_status(status, headers, body, f"served entity {self.entity.name!r}")
        try:
            data = json.loads(body)
            parts = data["content"]
            text = "".join(p.get("text", "") for p in parts if isinstance(p, Mapping) and p.get("type") == "text")
            usage_raw = data.get("usage")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise _malformed(self.entity, task, status, headers, body, exc) from exc
        finish = {"end_turn": "stop", "max_tokens": "length", "stop_sequence": "stop"}.get(data.get("stop_reason"), data.get("stop_reason"))
        return ModelResponse(
            value=text,
            usage=Usage.from_payload(usage_raw, prompt_text, text),
            model=data.get("model") or self._model,
            request_id=headers.get("request-id") or data.get("id"),
            finish_reason=finish,
            raw=data,
        )


class LocalModelProvider(OpenAICompatibleProvider):
    """A model served on this machine by ``gpu_workers`` over the OpenAI-compatible API.

    The server is found (or started) on first use in each process; ``gpu_workers`` shares one
    server per model between the driver and the Spark Python workers of the node.
    """

    def __init__(self, entity: ServedEntity) -> None:
        assert entity.local_model is not None
        self.entity = entity
        self._local: LocalModel = entity.local_model
        self._base_url: str | None = None
        self._model = self._local.model
        self._lock: asyncio.Lock | None = None

    async def base_url(self) -> str:
        if self._base_url is None:
            if self._lock is None:
                self._lock = asyncio.Lock()
            async with self._lock:
                if self._base_url is None:
                    loop = asyncio.get_running_loop()
                    self._base_url = await loop.run_in_executor(None, resolve_local_server, self._local)
        return self._base_url

    def _headers(self) -> dict[str, str]:
        return {"content-type": "application/json"}


def resolve_local_server(local: LocalModel) -> str:
    """Base URL of the local server for ``local`` (started by ``gpu_workers`` if needed)."""
    try:
        import gpu_workers
    except ImportError as exc:  # pragma: no cover - the package ships together
        raise LocalEngineError("the local engine needs the gpu_workers package: pip install 'ai-query[local]'") from exc
    try:
        return gpu_workers.ensure_local_server(local.model, local.task, dict(local.options))
    except LocalEngineError:
        raise
    except Exception as exc:
        raise LocalEngineError(f"could not start the local model {local.model!r}: {exc}") from exc


def provider_for(entity: ServedEntity) -> Provider:
    """The provider adapter for a served entity."""
    if entity.local_model is not None:
        return LocalModelProvider(entity)
    if entity.vllm_pool is not None:
        from ._pool import OfflineVLLMProvider, VLLMPoolProvider  # imports this module

        return OfflineVLLMProvider(entity) if entity.vllm_pool.is_offline else VLLMPoolProvider(entity)  # type: ignore[return-value]
    if entity.is_mlflow:
        from ._mlflow_provider import MLflowModelRef, MLflowPyfuncProvider  # imports no mlflow until a model loads

        ref = MLflowModelRef(model_uri=entity.model_uri, entity_name=entity.entity_name, entity_version=entity.entity_version)
        return MLflowPyfuncProvider(entity.name, ref, entity.task)  # type: ignore[return-value]
    assert entity.external_model is not None
    provider = entity.external_model.provider
    if provider == "openai":
        return OpenAICompatibleProvider(entity)
    if provider == "anthropic":
        return AnthropicProvider(entity)
    if provider == "databricks-model-serving":
        return ServingEndpointProvider(entity)
    raise EndpointError(f"no provider adapter for {entity.external_model.provider!r}")  # pragma: no cover
