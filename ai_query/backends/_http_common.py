"""What the HTTP backends share: status -> error mapping, ``Retry-After``, the ``llm/v1/*`` bodies
and the OpenAI-shaped answer (also the serving-endpoint schemas and vLLM's server).

Backends do no I/O of their own: they build requests and read answers, so the same code serves
Spark tasks, batch jobs and the serving endpoint.
"""

from __future__ import annotations

import email.utils
import json
import time
from typing import Any, Mapping

from ..config import ServedEntity, resolve_secret
from .._redact import redact
from .._errors import PermanentEndpointError, RateLimitedError, RetryableEndpointError, SystemicEndpointError
from .._schemas import ModelParameters, ModelResponse, Usage
from ._protocol import BackendBase, Capabilities

PATHS = {"llm/v1/chat": "/chat/completions", "llm/v1/completions": "/completions", "llm/v1/embeddings": "/embeddings"}


class ExternalModelBackend(BackendBase):
    """The base of the ``external_model`` backends: one provider config, one model name."""

    capabilities = Capabilities(limiter="aimd", accepts_files=True)

    def __init__(self, entity: ServedEntity) -> None:
        assert entity.external_model is not None and entity.external_model.config is not None
        self.entity = entity
        self._config: Any = entity.external_model.config
        self._model = entity.external_model.name


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
    """The provider's message in an error body, scrubbed of secrets before it is cut to length
    (a key cut in half would no longer match what ``redact`` knows)."""
    try:
        data = json.loads(body)
    except ValueError:
        text = redact(body[:8000].decode("utf-8", "replace").strip())
        return text[:300] or "(empty body)"
    if isinstance(data, Mapping):
        err = data.get("error", data.get("message", data))
        if isinstance(err, Mapping):
            err = err.get("message", err)
        return redact(str(err))[:300]
    return redact(str(data))[:300]


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
            f"{message.rstrip('.')}. Check the API key (the secret the endpoint config references) and its permissions.",
            status_code=status,
            request_id=request_id,
        )
    if status == 404:
        raise SystemicEndpointError(
            f"{message.rstrip('.')}. Check the base URL and the model name in the endpoint config.", status_code=status, request_id=request_id
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


def bearer(credential: tuple[str | None, str | None]) -> str | None:
    ref, plain = credential
    return resolve_secret(ref) if ref is not None else plain


def json_headers(key_header: str, credential: tuple[str | None, str | None], prefix: str = "") -> dict[str, str]:
    """JSON content type, and the credential (when there is one) in ``key_header``."""
    key = bearer(credential)
    return {"content-type": "application/json", **({key_header: prefix + key} if key else {})}


def parse_openai_shape(
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
        raise malformed_answer(entity, task, status, headers, body, exc) from exc
    usage = Usage.from_payload(data.get("usage"), prompt_text, completion_text)
    return ModelResponse(
        value=value,
        usage=usage,
        model=data.get("model") or model,
        request_id=headers.get("x-request-id") or data.get("id"),
        finish_reason=finish,
        raw=data,
    )


def malformed_answer(entity: ServedEntity, task: str, status: int, headers: Mapping[str, str], body: bytes, exc: Exception) -> RetryableEndpointError:
    return RetryableEndpointError(
        f"HTTP {status} from served entity {entity.name!r} with a body that is not a valid {task} response "
        f"({type(exc).__name__}: {exc}): {redact(body[:2000].decode('utf-8', 'replace'))[:200]!r}",
        status_code=status,
        request_id=headers.get("x-request-id"),
    )
