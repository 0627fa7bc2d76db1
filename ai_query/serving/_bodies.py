"""Request and response bodies of the serving endpoint: ``llm/v1/*`` and OpenAI's, one shape.

A request body becomes what a Spark row becomes: a value (chat messages, a prompt, a text to
embed), ``ModelParameters`` and an optional ``response_format``, handed to the same
``EndpointClient.call`` that ``ai_query`` uses; the ``CallResult`` is rendered back in the
OpenAI shape (``choices``, ``usage``, ``logprobs`` when the backend sent them).

Databricks' query fields are taken too: ``extra_params`` (more parameters, merged with the
top-level ones; names outside the ``llm/v1`` set only for an endpoint that may serve a custom
model) and ``usage_context`` (string key/values, stored in the usage table's ``usage_context``).
A custom model's MLflow scoring bodies are read by ``_scoring``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..batch.results import CallResult
from .._errors import ArgumentError
from .._schemas import _PARAMETER_TYPES, ModelParameters
from ._json import dumps

# Fields OpenAI clients send that change nothing here (``n`` is checked to be 1).
_IGNORED = frozenset({"model", "stream", "stream_options", "user", "n", "store", "metadata", "client_request_id",
                      "encoding_format", "dimensions"})
_INPUT_KEY = {"llm/v1/chat": "messages", "llm/v1/completions": "prompt", "llm/v1/embeddings": "input"}
_ALLOWED = {task: frozenset({key, "response_format", "extra_params", "usage_context", *_IGNORED, *_PARAMETER_TYPES})
            for task, key in _INPUT_KEY.items()}


@dataclass(frozen=True)
class ParsedRequest:
    """The values to send (one call each), their parameters and response format."""

    values: tuple[Any, ...]
    params: ModelParameters
    response_format: Mapping[str, Any] | None
    stream: bool = False
    include_usage: bool = False
    usage_context: Mapping[str, str] | None = None
    """Databricks' ``usage_context``: recorded with the request in the usage table."""
    scoring: bool = False
    """An MLflow scoring-protocol request: answered ``{"predictions": [...]}``."""


def parse_request(task: str, body: Any, *, custom: bool = False) -> ParsedRequest:
    """Read a ``task`` request body (decoded JSON: objects are dicts); ``ArgumentError`` names what is wrong.

    ``custom``: the endpoint may serve a custom model, whose own parameter names ``extra_params`` may carry."""
    if not isinstance(body, dict):
        shape = {"llm/v1/chat": '{"messages": [{"role": "user", "content": ...}]}',
                 "llm/v1/embeddings": '{"input": ...}'}.get(task, '{"prompt": ...}')
        raise ArgumentError(f"the request body must be a JSON object like {shape}, got {type(body).__name__}")
    key = _INPUT_KEY[task]
    if key not in body:
        if "inputs" in body or "dataframe_records" in body or "dataframe_split" in body:
            raise ArgumentError(f"this endpoint serves {task}: send {key!r} (the {task} schema), not MLflow's inputs/dataframe_* fields")
        raise ArgumentError(f"{key!r} is required for {task}")
    raw = body[key]
    if task == "llm/v1/chat":
        if not isinstance(raw, list) or not raw or not all(isinstance(m, dict) and "role" in m for m in raw):
            raise ArgumentError("'messages' must be a non-empty list of {\"role\": ..., \"content\": ...}")
        values: tuple[Any, ...] = ([dict(m) for m in raw],)
    else:
        items = raw if isinstance(raw, list) else [raw]
        if not items or not all(isinstance(x, str) for x in items):
            raise ArgumentError(f"{key!r} must be a string or a non-empty list of strings")
        values = tuple(items)
    if body.get("n", 1) != 1:
        raise ArgumentError("only n=1 is supported")
    unknown = sorted(body.keys() - _ALLOWED[task])
    if unknown:
        raise ArgumentError(f"unknown field(s) {', '.join(map(repr, unknown))}; supported parameters are {', '.join(sorted(_PARAMETER_TYPES))}")
    extra = body.get("extra_params") or {}
    if not isinstance(extra, dict):
        raise ArgumentError("'extra_params' must be an object of parameters, e.g. {\"top_k\": 40}")
    if not custom and (beyond := sorted(set(extra) - set(_PARAMETER_TYPES))):
        raise ArgumentError(f"extra_params: unknown parameter(s) {', '.join(map(repr, beyond))}; this endpoint takes "
                            f"{', '.join(sorted(_PARAMETER_TYPES))}")
    params = ModelParameters.from_mapping({**extra, **{k: v for k, v in body.items() if k in _PARAMETER_TYPES}}, custom=custom)
    usage_context = body.get("usage_context")
    if usage_context is not None and (not isinstance(usage_context, dict)
                                      or not all(isinstance(k, str) and isinstance(v, str) for k, v in usage_context.items())):
        raise ArgumentError("'usage_context' must be an object of strings, e.g. {\"project\": \"triage\", \"end_user\": \"ann\"}")
    response_format = body.get("response_format")
    if response_format is not None and not isinstance(response_format, dict):
        raise ArgumentError("'response_format' must be an object, e.g. {\"type\": \"json_schema\", \"json_schema\": {...}}")
    if response_format is not None and response_format.get("type") == "text":
        response_format = None
    stream = body.get("stream", False) is True
    options = body.get("stream_options") or {}
    return ParsedRequest(values, params, response_format, stream, bool(isinstance(options, dict) and options.get("include_usage")),
                         usage_context)


def _usage(results: Sequence[CallResult]) -> dict[str, int]:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def response_id(task: str, results: Sequence[CallResult]) -> str:
    prefix = {"llm/v1/chat": "chatcmpl-", "llm/v1/completions": "cmpl-", "llm/v1/embeddings": "emb-"}[task]
    first = results[0].request_id if results else None
    return first or prefix + uuid.uuid4().hex


def render_response(task: str, results: Sequence[CallResult]) -> dict[str, Any]:
    """The OpenAI-shaped body of successful results (one per value of the request)."""
    model = results[0].model
    if task == "llm/v1/embeddings":
        return {"object": "list", "model": model,
                "data": [{"object": "embedding", "index": i, "embedding": r.value} for i, r in enumerate(results)],
                "usage": _usage(results)}
    choices = []
    for i, r in enumerate(results):
        if task == "llm/v1/chat":
            choice: dict[str, Any] = {"index": i, "message": {"role": "assistant", "content": r.value}}
        else:
            choice = {"index": i, "text": r.value}
        choice["finish_reason"] = r.finish_reason or "stop"
        choice["logprobs"] = r.logprobs
        choices.append(choice)
    return {"id": response_id(task, results), "object": "chat.completion" if task == "llm/v1/chat" else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices, "usage": _usage(results)}


def sse_chunks(body: Mapping[str, Any], include_usage: bool) -> list[bytes]:
    """A chat completion as OpenAI's ``chat.completion.chunk`` server-sent events, ending in ``[DONE]``.

    The answer was produced by the batch path (one call, not token by token), so the content
    arrives in one chunk; clients read a stream of any chunking the same way.
    """
    base = {"id": body["id"], "object": "chat.completion.chunk", "created": body["created"], "model": body["model"]}
    choice = body["choices"][0]
    events = [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}]},
        {**base, "choices": [{"index": 0, "delta": {"content": choice["message"]["content"]}, "finish_reason": None,
                              "logprobs": choice.get("logprobs")}]},
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"], "logprobs": None}]},
    ]
    if include_usage:
        events.append({**base, "choices": [], "usage": body["usage"]})
    return [b"data: " + dumps(e) + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]
