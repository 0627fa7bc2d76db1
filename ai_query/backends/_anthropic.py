"""The Anthropic Messages API: ``external_model`` with ``provider = "anthropic"``."""

from __future__ import annotations

import json
from typing import Any, Mapping

from ..config import AnthropicConfig
from .._files import anthropic_content
from .._schemas import ModelParameters, ModelResponse, Usage
from ._http_common import ExternalModelBackend, json_headers, malformed_answer, raise_for_status
from ._protocol import HTTPRequest


class AnthropicBackend(ExternalModelBackend):
    """Chat (and completions, sent as one user message) map to ``POST {anthropic_api_base}/v1/messages``."""

    _config: AnthropicConfig

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
        headers = {**json_headers("x-api-key", self._config.credential()), "anthropic-version": self._config.anthropic_version}
        return HTTPRequest("POST", f"{self._config.anthropic_api_base}/v1/messages", headers, body)

    def probe_request(self) -> HTTPRequest | None:
        """``GET {anthropic_api_base}/v1/models``: free, and it checks the key."""
        headers = {**json_headers("x-api-key", self._config.credential()), "anthropic-version": self._config.anthropic_version}
        return HTTPRequest("GET", f"{self._config.anthropic_api_base.rstrip('/')}/v1/models", headers, {})

    def parse(self, task: str, status: int, headers: Mapping[str, str], body: bytes, prompt_text: str) -> ModelResponse:
        raise_for_status(status, headers, body, f"served entity {self.entity.name!r}")
        try:
            data = json.loads(body)
            parts = data["content"]
            text = "".join(p.get("text", "") for p in parts if isinstance(p, Mapping) and p.get("type") == "text")
            usage_raw = data.get("usage")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise malformed_answer(self.entity, task, status, headers, body, exc) from exc
        finish = {"end_turn": "stop", "max_tokens": "length", "stop_sequence": "stop"}.get(data.get("stop_reason"), data.get("stop_reason"))
        return ModelResponse(
            value=text,
            usage=Usage.from_payload(usage_raw, prompt_text, text),
            model=data.get("model") or self._model,
            request_id=headers.get("request-id") or data.get("id"),
            finish_reason=finish,
            raw=data,
        )
