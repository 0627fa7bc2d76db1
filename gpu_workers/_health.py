"""Is a local server up: ``/health`` answers 200, and ``/v1/models`` lists the model it was started for.

Requests go through the core's transport (loopback never goes through a proxy). A request that
nothing answered is a status of 0, never an exception: callers poll.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any


def _http_get(url: str, timeout: float) -> tuple[int, bytes]:
    """A GET through the core's transport (loopback never goes through a proxy); 0 when nothing answered."""
    from ai_query.transport import Request, TransportError, request_blocking

    try:
        response = request_blocking(Request("GET", url, timeout=timeout))
    except TransportError:
        return 0, b""
    return response.status_code, response.content


def _root_url(base_url: str) -> str:
    return base_url[: -len("/v1")] if base_url.endswith("/v1") else base_url


def _healthy(state: Mapping[str, Any], *, attempts: int = 1, timeout: float = 2.0) -> bool:
    for i in range(attempts):
        status, _ = _http_get(_root_url(state["base_url"]) + "/health", timeout)
        if status == 200:
            return True
        if i + 1 < attempts:
            time.sleep(1.0)
    return False


def _serves_model(base_url: str, served_model_name: str) -> bool:
    """Ready: ``/health`` answers 200 and ``/models`` lists ``served_model_name``."""
    status, _ = _http_get(_root_url(base_url) + "/health", 2.0)
    if status != 200:
        return False
    status, body = _http_get(base_url + "/models", 5.0)
    try:
        return status == 200 and any(m.get("id") == served_model_name for m in json.loads(body).get("data", []))
    except (ValueError, KeyError, TypeError, AttributeError):
        return False
