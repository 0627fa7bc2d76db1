"""Any server that speaks the OpenAI REST API (OpenAI, vLLM, many gateways): ``external_model``
with ``provider = "openai"``. ``gpu_workers`` builds its local-model backend on this one."""

from __future__ import annotations

from typing import Any, Mapping

from ..config import OpenAIConfig
from .._schemas import ModelParameters, ModelResponse
from ._http_common import PATHS, ExternalModelBackend, json_headers, llm_v1_body, parse_openai_shape
from ._protocol import HTTPRequest


class OpenAICompatibleBackend(ExternalModelBackend):
    """``POST {openai_api_base}/chat/completions`` (or ``/completions``, ``/embeddings``) with a bearer key."""

    _config: OpenAIConfig

    async def base_url(self) -> str:
        return self._config.openai_api_base

    def _headers(self) -> dict[str, str]:
        headers = json_headers("authorization", self._config.credential(), "Bearer ")
        if self._config.openai_organization:
            headers["openai-organization"] = self._config.openai_organization
        return headers

    async def build(self, task: str, value: Any, params: ModelParameters, response_format: Mapping[str, Any] | None) -> HTTPRequest:
        body = {"model": self._model, **llm_v1_body(task, value, params, response_format)}
        return HTTPRequest("POST", (await self.base_url()) + PATHS[task], self._headers(), body)

    def probe_request(self) -> HTTPRequest | None:
        """``GET {openai_api_base}/models``: free on OpenAI, vLLM and most gateways; it checks the key."""
        return HTTPRequest("GET", self._config.openai_api_base.rstrip("/") + "/models", self._headers(), {})

    def parse(self, task: str, status: int, headers: Mapping[str, str], body: bytes, prompt_text: str) -> ModelResponse:
        return parse_openai_shape(self.entity, task, status, headers, body, prompt_text, self._model)
