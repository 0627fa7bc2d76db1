"""Provider batch APIs (OpenAI's Batch API, Anthropic's Message Batches): half the price, hours later.

**The same requests and the same answers as online.** A batch line's body is what the served
entity's backend ``build`` makes for the online call, and a result line goes through the same
backend ``parse`` (an error line through the same status mapping), so a row answered in a batch
has the value, usage, finish reason and error text its online answer would have. Only the
request id differs (the provider's id of the line) and the price (the batch rate).

**Engine-free and blocking**: the job driver calls this between chunks, through
``ai_query.transport.request_blocking`` (the same transport, errors and proxies as every row).

**Limits** (``LIMITS``): a batch holds at most so many requests and bytes (OpenAI: 50,000 and 200
MB per input file; Anthropic: 100,000 and 256 MB); ``split`` cuts the lines in order.

A batch's life: ``submit`` -> ``poll`` (``BatchState``: ended or not, lines done) -> ``results``
(finished lines only: a cancelled or expired batch keeps what it did) or ``cancel``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .._errors import AIQueryError, ConfigError, EndpointError, RetryableEndpointError
from .._schemas import ModelParameters, ModelResponse
from ..config import ServedEntity
from ..transport import Request, TransportError, request_blocking
from ._http_common import raise_for_status
from ._registry import backend_for

LIMITS = {"openai": (50_000, 200 * 1024 * 1024), "anthropic": (100_000, 256 * 1024 * 1024)}
"""Provider -> (requests, bytes) a batch may hold."""

_TASK_PATHS = {"llm/v1/chat": "/v1/chat/completions", "llm/v1/completions": "/v1/completions"}
_ENDED = {"completed", "expired", "cancelled", "failed"}


@dataclass(frozen=True)
class BatchLine:
    """One row's request: ``custom_id`` maps its result back; ``body`` as the online call sends it."""

    custom_id: str
    task: str
    body: Mapping[str, Any]
    prompt_text: str


@dataclass(frozen=True)
class BatchState:
    """What a poll saw: ``status`` in the provider's words, ``ended`` when results are final."""

    id: str
    status: str
    ended: bool
    total: int
    done: int
    errors: str | None = None


def provider_of(entity: ServedEntity) -> str | None:
    """``"openai"`` / ``"anthropic"`` when the entity's provider has a batch API, else ``None``."""
    external = entity.external_model
    return external.provider if external is not None and external.provider in LIMITS else None


class ProviderBatches:
    """The batch API of one served entity (OpenAI or Anthropic ``external_model``)."""

    def __init__(self, entity: ServedEntity, *, max_requests: int | None = None, max_bytes: int | None = None,
                 timeout_s: float = 60.0, attempts: int = 5) -> None:
        provider = provider_of(entity)
        if provider is None:
            raise ConfigError(
                f"served entity {entity.name!r} has no provider batch API (batch mode needs an external_model with provider "
                "'openai' or 'anthropic'); run this job without [batch_api], or point it at such an endpoint"
            )
        self.entity = entity
        self.provider = provider
        self.backend: Any = backend_for(entity)
        limit_requests, limit_bytes = LIMITS[provider]
        self.max_requests = min(max_requests or limit_requests, limit_requests)
        self.max_bytes = min(max_bytes or limit_bytes, limit_bytes)
        self.timeout_s = timeout_s
        self.attempts = attempts
        self._headers: dict[str, str] = {}
        self._base = ""

    # -- lines ----------------------------------------------------------------------------
    def lines(self, task: str, requests: Sequence[Any], params: Sequence[Any], prompt_texts: Sequence[str],
              response_format: Mapping[str, Any] | None = None) -> list[BatchLine]:
        """One line per request, its body built by the online backend (same model, parameters,
        response format, headers); ``params``: a ``ModelParameters`` or a mapping per request."""
        if task not in _TASK_PATHS:
            raise ConfigError(f"batch mode sends chat and completions requests; endpoint task {task!r} has no batch API: run it online")

        async def build_all() -> list[BatchLine]:
            out = []
            for value, p, text in zip(requests, params, prompt_texts):
                built = await self.backend.build(task, value, p if isinstance(p, ModelParameters) else ModelParameters.from_mapping(p),
                                                 response_format)
                if not self._base:
                    self._headers = {k: v for k, v in built.headers.items() if k != "content-type"}
                    self._base = built.url[: -len("/chat/completions" if task == "llm/v1/chat" else "/completions")] \
                        if self.provider == "openai" else built.url[: -len("/v1/messages")]
                out.append(BatchLine(uuid.uuid4().hex, task, built.json, text))
            return out

        return asyncio.run(build_all())

    def split(self, lines: Sequence[BatchLine]) -> list[list[BatchLine]]:
        """``lines`` in order, cut so each batch stays within the provider's requests and bytes."""
        batches: list[list[BatchLine]] = []
        current: list[BatchLine] = []
        size = 0
        for line in lines:
            n = len(self._encode(line))
            if current and (len(current) >= self.max_requests or size + n > self.max_bytes):
                batches.append(current)
                current, size = [], 0
            current.append(line)
            size += n
        if current:
            batches.append(current)
        return batches

    def _encode(self, line: BatchLine) -> bytes:
        if self.provider == "openai":
            item: dict[str, Any] = {"custom_id": line.custom_id, "method": "POST", "url": _TASK_PATHS[line.task], "body": line.body}
        else:
            item = {"custom_id": line.custom_id, "params": line.body}
        return json.dumps(item, separators=(",", ":")).encode() + b"\n"

    # -- HTTP -----------------------------------------------------------------------------
    def _send(self, method: str, path: str, *, body: Any = None, content: bytes | None = None,
              content_type: str | None = None) -> Any:
        if not self._base:
            self._prime()
        url = path if path.startswith("http") else self._base + path
        headers = dict(self._headers)
        if body is not None:
            request = Request.json(method, url, body, headers=headers, timeout=self.timeout_s)
        else:
            if content_type:
                headers["content-type"] = content_type
            request = Request(method, url, headers=headers, content=content or b"", timeout=self.timeout_s)
        where = f"the {self.provider} batch API of served entity {self.entity.name!r} ({method} {url})"
        for attempt in range(1, self.attempts + 1):  # a poll or upload hit by a 429 / 5xx / reset is tried again
            try:
                response = request_blocking(request)
                raise_for_status(response.status_code, response.headers, response.content, where)
                return response.content
            except (RetryableEndpointError, TransportError) as exc:
                # a lost answer to a POST may hide a batch the provider created: not sent twice
                if attempt == self.attempts or (isinstance(exc, TransportError) and method != "GET"):
                    raise
                wait = getattr(exc, "retry_after", None)
                time.sleep(min(30.0, wait if wait is not None else 0.5 * 2 ** (attempt - 1)))
        raise AssertionError("unreachable")

    def _prime(self) -> None:
        self.lines("llm/v1/chat", ["x"], [None], ["x"])

    def submit(self, lines: Sequence[BatchLine], completion_window: str = "24h", metadata: Mapping[str, str] | None = None) -> str:
        """Upload and create one batch (``lines`` within the limits: see ``split``); returns its id.

        ``metadata`` goes with an OpenAI batch (``find`` looks it up); Message Batches have none."""
        data = b"".join(self._encode(line) for line in lines)
        if self.provider == "anthropic":
            items = [json.loads(x) for x in data.splitlines()]
            return str(json.loads(self._send("POST", "/v1/messages/batches", body={"requests": items}))["id"])
        boundary = "aiq" + uuid.uuid4().hex
        form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"batch.jsonl\"\r\n"
                f"Content-Type: application/jsonl\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
        file_id = json.loads(self._send("POST", "/files", content=form, content_type=f"multipart/form-data; boundary={boundary}"))["id"]
        endpoint = _TASK_PATHS[lines[0].task]
        body = {"input_file_id": file_id, "endpoint": endpoint, "completion_window": completion_window}
        if metadata:
            body["metadata"] = dict(metadata)
        return str(json.loads(self._send("POST", "/batches", body=body))["id"])

    def find(self, key: str, value: str, *, pages: int = 20) -> str | None:
        """The id of a batch created with ``metadata[key] == value`` (newest first, up to ``pages`` of
        100), or ``None``: none, or a provider whose batches carry no metadata (Anthropic)."""
        if self.provider != "openai":
            return None
        after = None
        for _ in range(pages):
            data = json.loads(self._send("GET", "/batches?limit=100" + (f"&after={after}" if after else "")))
            for item in data.get("data") or []:
                if (item.get("metadata") or {}).get(key) == value:
                    return str(item["id"])
            if not data.get("has_more") or not data.get("last_id"):
                return None
            after = data["last_id"]
        return None

    def poll(self, batch_id: str) -> BatchState:
        if self.provider == "anthropic":
            data = json.loads(self._send("GET", f"/v1/messages/batches/{batch_id}"))
            counts = data["request_counts"]
            total = sum(counts.values())
            return BatchState(batch_id, data["processing_status"], data["processing_status"] == "ended", total,
                              total - counts["processing"])
        data = json.loads(self._send("GET", f"/batches/{batch_id}"))
        counts = data.get("request_counts") or {}
        errors = data.get("errors") or {}
        text = "; ".join(str(e.get("message")) for e in errors.get("data") or []) or None
        return BatchState(batch_id, data["status"], data["status"] in _ENDED, counts.get("total", 0),
                          counts.get("completed", 0) + counts.get("failed", 0), text)

    def cancel(self, batch_id: str) -> None:
        path = f"/v1/messages/batches/{batch_id}/cancel" if self.provider == "anthropic" else f"/batches/{batch_id}/cancel"
        self._send("POST", path, body={})

    def results(self, batch_id: str, lines: Mapping[str, BatchLine]) -> dict[str, ModelResponse | EndpointError]:
        """The ended batch's finished lines by ``custom_id``: an answer (parsed as online) or the line's error.

        Lines the batch never did (cancelled, expired) are absent: the caller sends them again.
        """
        out: dict[str, ModelResponse | EndpointError] = {}
        if self.provider == "anthropic":
            data = json.loads(self._send("GET", f"/v1/messages/batches/{batch_id}"))
            if not data.get("results_url"):
                raise AIQueryError(f"message batch {batch_id} has no results_url yet; poll until it has ended")
            for raw in self._send("GET", data["results_url"]).splitlines():
                item = json.loads(raw)
                line, result = lines.get(item["custom_id"]), item["result"]
                if line is None or result["type"] not in ("succeeded", "errored"):
                    continue
                if result["type"] == "succeeded":
                    message = result["message"]
                    out[line.custom_id] = self._parse(line, 200, {"request-id": message.get("id", "")}, message)
                else:
                    error = result.get("error") or {}
                    out[line.custom_id] = self._parse(line, int(error.get("status", 500)), {}, error)
            return out
        data = json.loads(self._send("GET", f"/batches/{batch_id}"))
        for file_id in (data.get("output_file_id"), data.get("error_file_id")):
            if file_id:
                out.update(self.read_output(self._send("GET", f"/files/{file_id}/content"), lines))
        return out

    def read_output(self, data: bytes, lines: Mapping[str, BatchLine]) -> dict[str, ModelResponse | EndpointError]:
        """The lines of an OpenAI batch output or error file (vLLM's ``run_batch`` writes the same)."""
        out: dict[str, ModelResponse | EndpointError] = {}
        for raw in data.splitlines():
            if not raw.strip():
                continue
            item = json.loads(raw)
            line, response = lines.get(item["custom_id"]), item.get("response")
            if line is None:
                continue
            if response is None:  # expired or not run: the line's error, no answer
                error = item.get("error") or {}
                if error.get("code") in ("batch_expired", "batch_cancelled"):
                    continue
                out[line.custom_id] = self._parse(line, 400, {}, {"error": error})
                continue
            headers = {"x-request-id": response.get("request_id") or item.get("id") or ""}
            out[line.custom_id] = self._parse(line, int(response["status_code"]), headers, response.get("body"))
        return out

    def _parse(self, line: BatchLine, status: int, headers: Mapping[str, str], body: Any) -> ModelResponse | EndpointError:
        try:
            return self.backend.parse(line.task, status, headers, json.dumps(body).encode(), line.prompt_text)  # type: ignore[no-any-return]
        except EndpointError as exc:
            return exc


__all__ = ["LIMITS", "BatchLine", "BatchState", "ProviderBatches", "provider_of"]
