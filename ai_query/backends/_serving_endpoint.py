"""A Databricks-style serving endpoint: ``external_model`` with ``provider = "databricks-model-serving"``.

A struct request (a ``dict``: ``named_struct(...)`` in SQL) is a custom model's record of input
features: it goes as MLflow's scoring protocol, ``{"dataframe_records": [record], "params":
{...}}``, and the answer's ``predictions[0]`` is the row's value (typed by Spark's result type).
Other requests follow the ``llm/v1/*`` schemas.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..config import ServingEndpointConfig
import json

from .._schemas import ModelParameters, ModelResponse, Usage
from ._custom import json_record, json_value
from ._http_common import ExternalModelBackend, json_headers, llm_v1_body, malformed_answer, parse_openai_shape, raise_for_status
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
        if isinstance(value, Mapping):  # a custom model's record
            body: dict[str, Any] = {"dataframe_records": [json_record(value)]}
            if params.values:
                body["params"] = json_value(params.as_dict())
            return HTTPRequest("POST", url, headers, body)
        return HTTPRequest("POST", url, headers, llm_v1_body(task, value, params, response_format))

    def probe_request(self) -> HTTPRequest | None:
        """``GET {workspace}/api/2.0/serving-endpoints/{name}``: the endpoint's description (free); 404 if it does not exist."""
        url = f"{self._config.databricks_workspace_url.rstrip('/')}/api/2.0/serving-endpoints/{self._model}"
        return HTTPRequest("GET", url, json_headers("authorization", self._config.credential(), "Bearer "), {})

    def parse(self, task: str, status: int, headers: Mapping[str, str], body: bytes, prompt_text: str) -> ModelResponse:
        # a custom model answers {"predictions": [...]} (looked for in the head only: llm answers are the hot path)
        if 200 <= status < 300 and b'"predictions"' in body[:48]:
            return self._prediction(task, status, headers, body, prompt_text)
        return parse_openai_shape(self.entity, task, status, headers, body, prompt_text, self._model)

    def _prediction(self, task: str, status: int, headers: Mapping[str, str], body: bytes, prompt_text: str) -> ModelResponse:
        """A custom model's answer to one record: ``{"predictions": [value]}``."""
        raise_for_status(status, headers, body, f"served entity {self.entity.name!r}")
        try:
            [value] = json.loads(body)["predictions"]
        except (ValueError, KeyError, TypeError) as exc:
            raise malformed_answer(self.entity, "custom model (predictions)", status, headers, body, exc) from exc
        text = value if isinstance(value, str) else json.dumps(value)
        return ModelResponse(value=value, usage=Usage.estimate(prompt_text, text), model=self._model,
                             request_id=headers.get("x-request-id"))
