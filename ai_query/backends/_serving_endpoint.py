"""A Databricks-style serving endpoint: ``external_model`` with ``provider = "databricks-model-serving"``."""

from __future__ import annotations

from typing import Any, Mapping

from ..config import ServingEndpointConfig
from .._schemas import ModelParameters, ModelResponse
from ._http_common import ExternalModelBackend, json_headers, llm_v1_body, parse_openai_shape
from ._protocol import HTTPRequest


class ServingEndpointBackend(ExternalModelBackend):
    """``POST {workspace}/serving-endpoints/{name}/invocations`` with a bearer token.

    Bodies and answers follow the ``llm/v1/chat``, ``llm/v1/completions`` and ``llm/v1/embeddings``
    schemas (OpenAI-shaped, without a ``model`` field: the URL names the endpoint).
    """

    _config: ServingEndpointConfig

    async def build(self, task: str, value: Any, params: ModelParameters, response_format: Mapping[str, Any] | None) -> HTTPRequest:
        url = f"{self._config.databricks_workspace_url}/serving-endpoints/{self._model}/invocations"
        headers = json_headers("authorization", self._config.credential(), "Bearer ")
        return HTTPRequest("POST", url, headers, llm_v1_body(task, value, params, response_format))

    def probe_request(self) -> HTTPRequest | None:
        """``GET {workspace}/api/2.0/serving-endpoints/{name}``: the endpoint's description (free); 404 if it does not exist."""
        url = f"{self._config.databricks_workspace_url.rstrip('/')}/api/2.0/serving-endpoints/{self._model}"
        return HTTPRequest("GET", url, json_headers("authorization", self._config.credential(), "Bearer "), {})

    def parse(self, task: str, status: int, headers: Mapping[str, str], body: bytes, prompt_text: str) -> ModelResponse:
        return parse_openai_shape(self.entity, task, status, headers, body, prompt_text, self._model)
