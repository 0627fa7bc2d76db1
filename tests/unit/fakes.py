"""Test doubles injected through the public seams (transport, clock, sleep): no patching."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, Callable, Iterator

from ai_query import AIQueryClient, EndpointRegistry
from ai_query.transport import MockTransport, Request, Response


class FakeClock:
    """A clock that only moves when something sleeps on it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def chat_body(text: str, prompt_tokens: int = 5, completion_tokens: int = 3, usage: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "model": "fake-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
    }
    if usage:
        body["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": prompt_tokens + completion_tokens}
    return body


def registry(max_attempts: int = 4, rate_limit_wait_s: float = 600.0, task: str = "llm/v1/chat",
             initial: int = 4, maximum: int = 16) -> EndpointRegistry:
    return EndpointRegistry.from_data({
        "name": "fake",
        "config": {"served_entities": [{"name": "m", "external_model": {
            "name": "fake-model", "provider": "openai", "task": task,
            "openai_config": {"openai_api_key": "{{secrets/test/key}}", "openai_api_base": "http://fake.test/v1"}}}]},
        "client_config": {"max_attempts": max_attempts, "rate_limit_wait_s": rate_limit_wait_s,
                          "initial_concurrency": initial, "max_concurrency": maximum},
    })


def transport(handler: Callable[[Request], Response]) -> MockTransport:
    return MockTransport(handler)


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(status, content=json.dumps(body).encode(), headers={"content-type": "application/json", **(headers or {})})


def echo_registry() -> EndpointRegistry:
    """One chat endpoint ``fake`` whose key is the secret ``test/key`` (set ``AIQ_SECRET_TEST_KEY``)."""
    return EndpointRegistry.from_data({"name": "fake", "config": {"served_entities": [{"name": "m", "external_model": {
        "name": "fake-model", "provider": "openai", "task": "llm/v1/chat",
        "openai_config": {"openai_api_key": "{{secrets/test/key}}", "openai_api_base": "http://fake.invalid/v1"}}}]}})


@contextlib.contextmanager
def echo_client(monkeypatch: Any) -> Iterator[tuple[AIQueryClient, list[str]]]:
    """A client on ``echo_registry`` answering ``echo: <prompt>``, and the prompts it was sent."""
    monkeypatch.setenv("AIQ_SECRET_TEST_KEY", "sk-test")
    prompts: list[str] = []

    def handler(request: Request) -> Response:
        prompt = json.loads(request.content)["messages"][0]["content"]
        prompts.append(prompt)
        return json_response(200, chat_body(f"echo: {prompt}"))

    client = AIQueryClient(echo_registry(), transport=MockTransport(handler))
    try:
        yield client, prompts
    finally:
        client.close()
