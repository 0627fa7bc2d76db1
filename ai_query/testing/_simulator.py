"""A real HTTP server on 127.0.0.1 that answers like an OpenAI-compatible provider.

Responses are deterministic functions of the request, so tests can assert exact values, and the
server keeps counters of requests and tokens served to compare with what the client recorded.
Per-prompt directives inject failures without any patching of the client:

- ``[[status:500]]`` (any status): always answer that status;
- ``[[flaky:N]]``: answer 503 the first N times this exact prompt is seen, then succeed;
- ``[[ratelimit:N]]``: answer 429 with ``Retry-After: 0`` the first N times;
- ``[[malformed:N]]``: answer 200 with a broken JSON body the first N times;
- ``[[reply:TEXT]]``: answer TEXT (``\\n`` allowed) instead of the default echo.

Server-wide knobs: ``latency_s``, ``max_concurrency`` (429 above it), ``api_key`` (401 without it).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

_DIRECTIVE = re.compile(r"\[\[(status|flaky|ratelimit|malformed|reply):(.*?)\]\]", re.S)


def count_tokens(text: str) -> int:
    """The simulator's tokenizer: one token per whitespace-separated word (at least 1 for non-empty)."""
    return len(text.split()) or (1 if text else 0)


@dataclass
class SimulatorStats:
    requests: int = 0
    ok: int = 0
    errors: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    peak_concurrency: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class ProviderSimulator:
    """Start with ``with ProviderSimulator() as sim: sim.base_url`` (``.../v1``)."""

    def __init__(
        self,
        *,
        latency_s: float = 0.0,
        max_concurrency: int | None = None,
        api_key: str | None = None,
        model: str = "sim-model",
        embedding_dim: int = 8,
        port: int = 0,
    ) -> None:
        self.latency_s = latency_s
        self.max_concurrency = max_concurrency
        self.api_key = api_key
        self.model = model
        self.embedding_dim = embedding_dim
        self._port = port
        self.stats = SimulatorStats()
        self._seen: Counter = Counter()
        self._in_flight = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._started = threading.Event()
        self.port: int | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> "ProviderSimulator":
        self._thread = threading.Thread(target=self._run, name="provider-simulator", daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("the provider simulator did not start within 10 s")
        return self

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        app.router.add_post("/v1/completions", self._handle)
        app.router.add_post("/v1/embeddings", self._handle)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self._port, backlog=4096)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    def stop(self) -> None:
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> "ProviderSimulator":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        with self._lock:
            self.stats = SimulatorStats()
            self._seen.clear()

    # -- protocol --------------------------------------------------------------------------
    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
        with self._lock:
            self.stats.errors[status] += 1
        kind = {400: "invalid_request_error", 401: "authentication_error", 429: "rate_limit_error"}.get(status, "server_error")
        return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status, headers=headers)

    async def _handle(self, request: web.Request) -> web.Response:
        with self._lock:
            self.stats.requests += 1
        if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return self._error(401, "Incorrect API key provided.")
        if self.max_concurrency is not None and self._in_flight >= self.max_concurrency:
            return self._error(429, "Too many concurrent requests.", {"retry-after": "0.05"})
        self._in_flight += 1
        self.stats.peak_concurrency = max(self.stats.peak_concurrency, self._in_flight)
        try:
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
            try:
                body = await request.json()
            except ValueError:
                return self._error(400, "The request body is not valid JSON.")
            return self._answer(request.path, body)
        finally:
            self._in_flight -= 1

    def _answer(self, path: str, body: dict[str, Any]) -> web.Response:
        if path.endswith("/chat/completions"):
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                return self._error(400, "'messages' is a required property")
            prompt = "\n".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
        elif path.endswith("/completions"):
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                return self._error(400, "'prompt' is a required property")
        else:
            prompt = body.get("input")
            if isinstance(prompt, list):
                prompt = prompt[0] if prompt else ""
            if not isinstance(prompt, str):
                return self._error(400, "'input' is a required property")

        with self._lock:
            self._seen[prompt] += 1
            seen = self._seen[prompt]
        reply = None
        for kind, arg in _DIRECTIVE.findall(prompt):
            if kind == "status":
                return self._error(int(arg), f"injected status {arg}")
            if kind == "flaky" and seen <= int(arg):
                return self._error(503, "The server is overloaded, try again.")
            if kind == "ratelimit" and seen <= int(arg):
                return self._error(429, "Rate limit reached.", {"retry-after": "0"})
            if kind == "malformed" and seen <= int(arg):
                return web.Response(status=200, body=b'{"id": "cmpl-broken", "choices": [', content_type="application/json")
            if kind == "reply":
                reply = arg.replace("\\n", "\n")

        request_id = "req-" + uuid.uuid4().hex[:16]
        prompt_tokens = count_tokens(prompt)
        if path.endswith("/embeddings"):
            digest = hashlib.sha256(prompt.encode()).digest()
            vector = [round((digest[i % len(digest)] - 128) / 128.0, 6) for i in range(self.embedding_dim)]
            with self._lock:
                self.stats.ok += 1
                self.stats.prompt_tokens += prompt_tokens
            payload: dict[str, Any] = {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": vector}],
                "model": self.model,
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
            }
            return web.json_response(payload, headers={"x-request-id": request_id})

        text = reply if reply is not None else "echo: " + _DIRECTIVE.sub("", prompt).strip()
        max_tokens = body.get("max_tokens")
        words = text.split(" ")
        finish = "stop"
        if isinstance(max_tokens, int) and len(words) > max_tokens:
            text, finish = " ".join(words[:max_tokens]), "length"
        completion_tokens = count_tokens(text)
        with self._lock:
            self.stats.ok += 1
            self.stats.prompt_tokens += prompt_tokens
            self.stats.completion_tokens += completion_tokens
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}
        if path.endswith("/chat/completions"):
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish}
            obj = "text_completion"
        payload = {"id": request_id, "object": obj, "created": 0, "model": self.model, "choices": [choice], "usage": usage}
        return web.json_response(payload, headers={"x-request-id": request_id})
