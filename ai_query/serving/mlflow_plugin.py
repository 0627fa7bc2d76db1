"""MLflow deployments plugin for the ai-query serving endpoint (entry-point group ``mlflow.deployments``).

>>> from mlflow.deployments import get_deploy_client
>>> client = get_deploy_client("ai-query:http://127.0.0.1:8080")     # doctest: +SKIP
>>> client.create_endpoint(config={"name": "chat", "config": {"served_entities": [...]}})  # doctest: +SKIP
>>> client.predict(endpoint="chat", inputs={"messages": [{"role": "user", "content": "Hello"}]})  # doctest: +SKIP

Targets: ``ai-query`` (the server at ``$AIQ_SERVING_URL``, default ``http://127.0.0.1:8080``),
``ai-query:http://HOST:PORT`` or ``ai-query://HOST:PORT``. The bearer token is read from
``$AIQ_SERVING_TOKEN``. The client is MLflow's own Databricks deployments client (the same
``create_endpoint``, ``update_endpoint``, ``update_endpoint_config``, ``update_endpoint_rate_limits``,
``update_endpoint_tags``, ``get_endpoint``, ``list_endpoints``, ``delete_endpoint``, ``predict``
and ``predict_stream``, with the same request bodies), pointed at this server instead of a workspace.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any, Iterator

# Imported as a module: the plugin loader refuses a plugin module with two client classes in it.
from mlflow.deployments import databricks as _databricks
from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_TIMEOUT
from mlflow.utils.rest_utils import augmented_raise_for_status

TARGET = "ai-query"
DEFAULT_URL = "http://127.0.0.1:8080"


def server_url(target_uri: str) -> str:
    """The server's base URL named by a target URI."""
    rest = target_uri[len(TARGET):] if target_uri.startswith(TARGET) else target_uri
    if rest.startswith("://"):
        return "http" + rest.rstrip("/")
    if rest.startswith(":"):
        rest = rest[1:]
    return (rest or os.environ.get("AIQ_SERVING_URL") or DEFAULT_URL).rstrip("/")


class AIQueryDeploymentClient(_databricks.DatabricksDeploymentClient):
    """MLflow's serving-endpoints client, talking to an ``ai-query serve`` server."""

    def __init__(self, target_uri: str) -> None:
        super().__init__(target_uri)
        self.base_url = server_url(target_uri)

    def _request(self, method: str, prefix: str, route: str | None, json_body: Any, timeout: Any, stream: bool = False):
        import requests

        url = self.base_url + posixpath.join(prefix, "serving-endpoints", route or "")
        headers = {}
        token = os.environ.get("AIQ_SERVING_TOKEN")
        if token:
            headers["Authorization"] = f"Bearer {token}"
        kwargs: dict[str, Any] = {"params": json_body} if method.lower() == "get" else {"json": json_body}
        response = requests.request(method, url, headers=headers, stream=stream,
                                    timeout=MLFLOW_HTTP_REQUEST_TIMEOUT.get() if timeout is None else timeout, **kwargs)
        augmented_raise_for_status(response)
        return response

    def _call_endpoint(self, *, method: str, prefix: str = "/api/2.0", route: str | None = None,
                       json_body: dict[str, Any] | None = None, timeout: int | None = None,
                       retry_timeout_seconds: int | None = None) -> _databricks.DatabricksEndpoint:
        return _databricks.DatabricksEndpoint(self._request(method, prefix, route, json_body, timeout).json())

    def _call_endpoint_stream(self, *, method: str, prefix: str = "/api/2.0", route: str | None = None,
                              json_body: dict[str, Any] | None = None, timeout: int | None = None,
                              retry_timeout_seconds: int | None = None) -> Iterator[str]:
        response = self._request(method, prefix, route, json_body, timeout, stream=True)
        response.encoding = "utf-8"
        return (line.strip() for line in response.iter_lines(decode_unicode=True) if line.strip())


def run_local(name, model_uri, flavor=None, config=None):  # noqa: ANN001 - MLflow's plugin interface
    raise NotImplementedError("run 'ai-query serve' and create the endpoint with create_endpoint() instead")


def target_help() -> str:
    return (
        "ai-query: the ai-query serving endpoint. Targets: 'ai-query' (the server at $AIQ_SERVING_URL, "
        f"default {DEFAULT_URL}), 'ai-query:http://HOST:PORT'. The bearer token comes from $AIQ_SERVING_TOKEN. "
        "Endpoint configs are serving-endpoint JSON (served_entities with external_model, local_model, "
        "or entity_name + entity_version of an MLflow registered model)."
    )


__all__ = ["AIQueryDeploymentClient", "run_local", "target_help"]
