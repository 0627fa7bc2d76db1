"""The wire formats the simulator speaks: request parsing, answers, errors and rate-limit headers.

- ``openai``: ``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``; errors
  ``{"error": {"message", "type", "param", "code"}}``; rate-limit headers ``x-ratelimit-*``.
- ``anthropic``: ``POST /v1/messages``; errors ``{"type": "error", "error": {"type", "message"}}``,
  529 when overloaded; rate-limit headers ``anthropic-ratelimit-*``.
- ``serving``: ``POST /serving-endpoints/{name}/invocations``; errors ``{"error_code", "message"}``.
  It answers in the OpenAI-like shapes of the ``llm/v1/chat``, ``llm/v1/completions`` and
  ``llm/v1/embeddings`` schemas and picks the schema from the body's keys (``messages``,
  ``prompt``, ``input``).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import math
import re
import struct
import time
from dataclasses import dataclass
from typing import Any, Mapping

from .._errors import BadRequestError
from .._files import parse_data_uri
from ._limits import FixedWindowQuota

_WORD = re.compile(r"\S+")
_PIECE = re.compile(r"\s*\S+")


def count_tokens(text: str) -> int:
    """The simulator's tokenizer: one token per whitespace-separated word (at least 1 for non-empty)."""
    return len(text.split()) or (1 if text else 0)


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_DECODER = json.JSONDecoder()


def dumps(payload: Any) -> bytes:
    return _ENCODER.encode(payload).encode()


def loads(raw: bytes) -> Any:
    """A request body as JSON (``ValueError`` when it is not UTF-8 JSON)."""
    return _DECODER.decode(raw.decode())


@dataclass(slots=True)
class Call:
    """What one request asks for, whatever its format."""

    task: str  # "chat" | "completions" | "embeddings"
    prompts: list[str]
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    dimensions: int | None = None
    base64: bool = False


@dataclass(slots=True)
class Answer:
    """One generated text: ``finish`` is ``"stop"``, ``"length"`` or ``"stop_sequence"``."""

    text: str
    finish: str
    stop_sequence: str | None
    tokens: int


def generate(text: str, max_tokens: int, stop: tuple[str, ...]) -> Answer:
    """Cut ``text`` at the first stop sequence, then at ``max_tokens`` words."""
    finish, stop_sequence = "stop", None
    if stop:
        cut = min(((text.find(s), s) for s in stop if s and s in text), default=None)
        if cut is not None:
            text, finish, stop_sequence = text[: cut[0]], "stop_sequence", cut[1]
    tokens = count_tokens(text)
    if tokens > max_tokens:
        end = 0
        for i, match in enumerate(_WORD.finditer(text)):
            if i == max_tokens:
                break
            end = match.end()
        text, finish, stop_sequence = text[:end], "length", None
        tokens = count_tokens(text)
    return Answer(text, finish, stop_sequence, tokens)


def embed(text: str, dim: int) -> list[float]:
    """A unit vector from a hash of ``text``: equal inputs, equal vectors."""
    raw = hashlib.shake_256(text.encode()).digest(dim)
    values = [b - 127.5 for b in raw]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [round(v / norm, 6) for v in values]


def _pieces(text: str) -> list[str]:
    """Stream chunks: one per token, each with the whitespace before it."""
    return _PIECE.findall(text) or ([text] if text else [])


def _sse(payload: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + dumps(payload) + b"\n\n"


# -- field checks shared by the formats ------------------------------------------------------
def _int_field(body: Mapping[str, Any], name: str, *, minimum: int = 1) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise BadRequestError(f"'{name}' must be an integer >= {minimum}; got {value!r}")
    return value


def _number_field(body: Mapping[str, Any], name: str, low: float, high: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise BadRequestError(f"'{name}' must be a number between {low} and {high}; got {value!r}")


def _stop_field(body: Mapping[str, Any], name: str) -> tuple[str, ...]:
    value = body.get(name)
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise BadRequestError(f"'{name}' must be a string or a list of strings; got {value!r}")


def _media_of(part: dict[str, Any], where: str) -> str:
    """An image / file part (OpenAI ``image_url`` / ``file``, Anthropic ``image`` / ``document``) as a
    placeholder: ``[image/png 1234 bytes sha256:0123abcd]``, decoded and hashed so tests can check
    that the bytes arrived intact."""
    kind = part.get("type")
    try:
        if kind == "image_url":
            uri = part["image_url"]["url"]
        elif kind == "file":
            uri = part["file"]["file_data"]
        elif kind in ("image", "document"):
            source = part["source"]
            if source.get("type") != "base64":
                raise BadRequestError(f"{where}: only base64 {kind} sources are supported here")
            uri = f"data:{source['media_type']};base64,{source['data']}"
        else:
            raise BadRequestError(f"{where}: unknown content part type {kind!r}")
        if not isinstance(uri, str):
            raise BadRequestError(f"{where}: a {kind} part needs a base64 data URI (data:<type>;base64,...)")
        media, data = parse_data_uri(uri)
    except (KeyError, TypeError, ValueError) as exc:  # binascii.Error is a ValueError
        raise BadRequestError(f"{where}: invalid {kind} part: {exc}") from exc
    return f"[{media} {len(data)} bytes sha256:{hashlib.sha256(data).hexdigest()[:8]}]"


def _text_of(content: Any, where: str) -> str:
    """A message's text: a string, or the text parts of a list of content parts/blocks."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict):
                raise BadRequestError(f"{where}: content parts must be objects; got {part!r}")
            if part.get("type") == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise BadRequestError(f"{where}: a text part needs a string 'text'")
                texts.append(text)
            else:
                texts.append(_media_of(part, where))
        return "\n".join(texts)
    raise BadRequestError(f"{where}: 'content' must be a string or a list of content parts; got {type(content).__name__}")


def _openai_messages(body: Mapping[str, Any]) -> str:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequestError("'messages' is a required property and must be a non-empty list")
    parts = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequestError(f"messages[{i}] must be an object with a 'role'")
        parts.append(_text_of(message.get("content"), f"messages[{i}]"))
    return "\n".join(parts)


def _string_list(value: Any, name: str) -> list[str]:
    if isinstance(value, str):
        values = [value]
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        values = value
    else:
        raise BadRequestError(f"'{name}' is a required property: a string or a non-empty list of strings")
    return values


def _openai_call(task: str, body: Mapping[str, Any], *, embeddings_base64: bool = True) -> Call:
    if task == "embeddings":
        inputs = _string_list(body.get("input"), "input")
        if any(not s for s in inputs):
            raise BadRequestError("'input' cannot contain an empty string")
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64") or (encoding == "base64" and not embeddings_base64):
            allowed = "'float' or 'base64'" if embeddings_base64 else "'float'"
            raise BadRequestError(f"'encoding_format' must be {allowed}; got {encoding!r}")
        return Call("embeddings", inputs, dimensions=_int_field(body, "dimensions"), base64=encoding == "base64")
    if task == "chat":
        prompts = [_openai_messages(body)]
    else:
        prompts = _string_list(body.get("prompt"), "prompt")
    max_tokens = _int_field(body, "max_completion_tokens") or _int_field(body, "max_tokens")
    _number_field(body, "temperature", 0.0, 2.0)
    _number_field(body, "top_p", 0.0, 1.0)
    n = body.get("n", 1)
    if n != 1:
        raise BadRequestError(f"the simulator answers n=1 only; got n={n!r}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequestError(f"'stream' must be true or false; got {stream!r}")
    options = body.get("stream_options") or {}
    include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    return Call(task, prompts, max_tokens, _stop_field(body, "stop"), stream, include_usage)


def _openai_usage(task: str, prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    if task == "embeddings":
        return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def _finish_openai(answer: Answer) -> str:
    return "length" if answer.finish == "length" else "stop"


def _duration(seconds: float) -> str:
    """OpenAI's reset spelling: ``"250ms"``, ``"1.5s"``, ``"6m0s"``."""
    millis = math.ceil(seconds * 1000)
    if millis < 1000:
        return f"{millis}ms"
    minutes, rest = divmod(millis, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def seconds_header(seconds: float) -> str:
    """``Retry-After`` in seconds, rounded up to the millisecond (``"1"``, ``"0.25"``)."""
    return f"{math.ceil(seconds * 1000) / 1000:g}"


class WireFormat:
    """One provider's dialect. Subclasses fill in the parts that differ."""

    name = "openai"
    overloaded_status = 503
    id_prefix = {"chat": "chatcmpl-", "completions": "cmpl-", "embeddings": "emb-"}

    def authorized(self, headers: Mapping[str, str], api_key: str) -> bool:
        return headers.get("Authorization") == "Bearer " + api_key

    def precheck(self, headers: Mapping[str, str]) -> tuple[int, str] | None:
        """A format-level refusal (missing version header) before the body is read."""
        return None

    def parse(self, task: str | None, body: Any) -> Call:
        if not isinstance(body, dict):
            raise BadRequestError("the request body must be a JSON object")
        return _openai_call(task or "chat", body)

    # -- answers --------------------------------------------------------------------------
    def answer(self, call: Call, answers: list[Answer], vectors: list[list[float]], prompt_tokens: int, rid: str, model: str) -> dict[str, Any]:
        completion_tokens = sum(a.tokens for a in answers)
        usage = _openai_usage(call.task, prompt_tokens, completion_tokens)
        if call.task == "embeddings":
            data = []
            for i, vector in enumerate(vectors):
                value: Any = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode() if call.base64 else vector
                data.append({"object": "embedding", "index": i, "embedding": value})
            return {"object": "list", "data": data, "model": model, "usage": usage}
        if call.task == "chat":
            a = answers[0]
            choices: list[dict[str, Any]] = [{"index": 0, "message": {"role": "assistant", "content": a.text}, "logprobs": None, "finish_reason": _finish_openai(a)}]
            return {"id": self.id_prefix["chat"] + rid, "object": "chat.completion", "created": 0, "model": model, "choices": choices, "usage": usage}
        choices = [{"index": i, "text": a.text, "logprobs": None, "finish_reason": _finish_openai(a)} for i, a in enumerate(answers)]
        return {"id": self.id_prefix["completions"] + rid, "object": "text_completion", "created": 0, "model": model, "choices": choices, "usage": usage}

    def stream_events(self, call: Call, answers: list[Answer], prompt_tokens: int, rid: str, model: str) -> list[bytes]:
        """The SSE frames of a streamed answer: one per token, then finish, usage and ``[DONE]``."""
        chat = call.task == "chat"
        base: dict[str, Any] = {
            "id": self.id_prefix[call.task] + rid,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": 0,
            "model": model,
        }
        if call.include_usage:
            base["usage"] = None

        def frame(index: int, piece: str | None, finish: str | None, role: bool = False) -> bytes:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else ({} if piece is None else {"content": piece})
                choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": index, "text": piece or "", "logprobs": None, "finish_reason": finish}
            return _sse({**base, "choices": [choice]})

        frames = []
        for i, a in enumerate(answers):
            if chat:
                frames.append(frame(i, None, None, role=True))
            frames.extend(frame(i, piece, None) for piece in _pieces(a.text))
            frames.append(frame(i, None, _finish_openai(a)))
        if call.include_usage:
            usage = _openai_usage(call.task, prompt_tokens, sum(a.tokens for a in answers))
            frames.append(_sse({**base, "choices": [], "usage": usage}))
        frames.append(b"data: [DONE]\n\n")
        return frames

    def malformed_stream(self, rid: str) -> list[bytes]:
        return [b'data: {"id":"chatcmpl-' + rid.encode() + b'","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"ec\n\n']

    # -- errors ---------------------------------------------------------------------------
    _openai_types = {
        400: ("invalid_request_error", None),
        401: ("invalid_request_error", "invalid_api_key"),
        403: ("invalid_request_error", "permission_denied"),
        404: ("invalid_request_error", "not_found"),
        429: ("requests", "rate_limit_exceeded"),
        503: ("server_error", "service_unavailable"),
    }

    def error(self, status: int, message: str, code: str | None = None) -> dict[str, Any]:
        kind, default_code = self._openai_types.get(status, ("server_error", None))
        if status == 429 and code in ("requests", "tokens"):
            kind, code = code, None  # which quota refused it, as OpenAI's error type says
        return {"error": {"message": message, "type": kind, "param": None, "code": code or default_code}}

    bad_key_message = "Incorrect API key provided. Send it as 'Authorization: Bearer <key>'."

    # -- rate-limit headers ---------------------------------------------------------------
    def quota_headers(self, quota: FixedWindowQuota, reset_s: float, headers: dict[str, str]) -> None:
        reset = _duration(reset_s)
        if quota.rpm_limit is not None:
            headers["x-ratelimit-limit-requests"] = str(quota.rpm_limit)
            headers["x-ratelimit-remaining-requests"] = str(quota.remaining_requests)
            headers["x-ratelimit-reset-requests"] = reset
        if quota.tpm_limit is not None:
            headers["x-ratelimit-limit-tokens"] = str(quota.tpm_limit)
            headers["x-ratelimit-remaining-tokens"] = str(quota.remaining_tokens)
            headers["x-ratelimit-reset-tokens"] = reset


class AnthropicFormat(WireFormat):
    name = "anthropic"
    overloaded_status = 529
    id_prefix = {"chat": "msg_"}
    _types = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        500: "api_error",
        529: "overloaded_error",
    }
    bad_key_message = "invalid x-api-key"

    def authorized(self, headers: Mapping[str, str], api_key: str) -> bool:
        # x-api-key is the documented header; newer SDKs may send the key as a bearer token.
        return headers.get("x-api-key") == api_key or headers.get("Authorization") == "Bearer " + api_key

    def precheck(self, headers: Mapping[str, str]) -> tuple[int, str] | None:
        if not headers.get("anthropic-version"):
            return 400, "anthropic-version: header is required"
        return None

    def parse(self, task: str | None, body: Any) -> Call:
        if not isinstance(body, dict):
            raise BadRequestError("the request body must be a JSON object")
        if not isinstance(body.get("model"), str):
            raise BadRequestError("model: Field required")
        if body.get("max_tokens") is None:
            raise BadRequestError("max_tokens: Field required")
        max_tokens = _int_field(body, "max_tokens")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequestError("messages: Field required (a non-empty list)")
        parts = []
        system = body.get("system")
        if system is not None:
            parts.append(_text_of(system, "system"))
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
                raise BadRequestError(f"messages.{i}.role: Input should be 'user' or 'assistant'")
            parts.append(_text_of(message.get("content"), f"messages.{i}"))
        _number_field(body, "temperature", 0.0, 1.0)
        _number_field(body, "top_p", 0.0, 1.0)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequestError(f"stream: Input should be a valid boolean; got {stream!r}")
        return Call("chat", ["\n".join(parts)], max_tokens, _stop_field(body, "stop_sequences"), stream)

    @staticmethod
    def _stop_reason(a: Answer) -> str:
        return {"length": "max_tokens", "stop_sequence": "stop_sequence"}.get(a.finish, "end_turn")

    def answer(self, call: Call, answers: list[Answer], vectors: list[list[float]], prompt_tokens: int, rid: str, model: str) -> dict[str, Any]:
        a = answers[0]
        return {
            "id": "msg_" + rid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": a.text}],
            "stop_reason": self._stop_reason(a),
            "stop_sequence": a.stop_sequence,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": a.tokens},
        }

    def stream_events(self, call: Call, answers: list[Answer], prompt_tokens: int, rid: str, model: str) -> list[bytes]:
        a = answers[0]
        message = {
            "id": "msg_" + rid, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": prompt_tokens, "output_tokens": 0},
        }
        frames = [
            _sse({"type": "message_start", "message": message}, "message_start"),
            _sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}, "content_block_start"),
        ]
        frames.extend(
            _sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}, "content_block_delta")
            for piece in _pieces(a.text)
        )
        frames.append(_sse({"type": "content_block_stop", "index": 0}, "content_block_stop"))
        delta = {"stop_reason": self._stop_reason(a), "stop_sequence": a.stop_sequence}
        frames.append(_sse({"type": "message_delta", "delta": delta, "usage": {"output_tokens": a.tokens}}, "message_delta"))
        frames.append(_sse({"type": "message_stop"}, "message_stop"))
        return frames

    def malformed_stream(self, rid: str) -> list[bytes]:
        return [b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_' + rid.encode() + b'","con\n\n']

    def error(self, status: int, message: str, code: str | None = None) -> dict[str, Any]:
        return {"type": "error", "error": {"type": self._types.get(status, "api_error"), "message": message}}

    def quota_headers(self, quota: FixedWindowQuota, reset_s: float, headers: dict[str, str]) -> None:
        reset = datetime.datetime.fromtimestamp(time.time() + reset_s, datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        if quota.rpm_limit is not None:
            headers["anthropic-ratelimit-requests-limit"] = str(quota.rpm_limit)
            headers["anthropic-ratelimit-requests-remaining"] = str(quota.remaining_requests)
            headers["anthropic-ratelimit-requests-reset"] = reset
        if quota.tpm_limit is not None:
            headers["anthropic-ratelimit-tokens-limit"] = str(quota.tpm_limit)
            headers["anthropic-ratelimit-tokens-remaining"] = str(quota.remaining_tokens)
            headers["anthropic-ratelimit-tokens-reset"] = reset


class ServingFormat(WireFormat):
    name = "serving"
    _codes = {
        400: "BAD_REQUEST",
        401: "UNAUTHENTICATED",
        403: "PERMISSION_DENIED",
        404: "RESOURCE_DOES_NOT_EXIST",
        429: "REQUEST_LIMIT_EXCEEDED",
        500: "INTERNAL_ERROR",
        503: "TEMPORARILY_UNAVAILABLE",
        504: "DEADLINE_EXCEEDED",
    }
    bad_key_message = "Invalid access token. Send it as 'Authorization: Bearer <token>'."

    def parse(self, task: str | None, body: Any) -> Call:
        if not isinstance(body, dict):
            raise BadRequestError("the request body must be a JSON object")
        if "messages" in body:
            task = "chat"
        elif "prompt" in body:
            task = "completions"
        elif "input" in body:
            task = "embeddings"
        else:
            raise BadRequestError(
                "the body matches no schema: send 'messages' (llm/v1/chat), 'prompt' (llm/v1/completions) or 'input' (llm/v1/embeddings)"
            )
        return _openai_call(task, body, embeddings_base64=False)

    def error(self, status: int, message: str, code: str | None = None) -> dict[str, Any]:
        return {"error_code": self._codes.get(status, "INTERNAL_ERROR"), "message": message}


OPENAI = WireFormat()
ANTHROPIC = AnthropicFormat()
SERVING = ServingFormat()
