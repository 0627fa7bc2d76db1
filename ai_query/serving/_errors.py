"""The one error of the serving endpoint's request handling: an HTTP answer to send."""

from __future__ import annotations

from typing import Mapping


class ServingError(Exception):
    """An error answer: HTTP ``status``, a Databricks-style ``error_code`` (``PERMISSION_DENIED``,
    ``RESOURCE_DOES_NOT_EXIST``, ...), a message for the caller, and extra headers (``Retry-After``)."""

    def __init__(self, status: int, error_code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message
        self.headers = dict(headers or {})
