"""Errors of the embedded local engine, under the core's tree (``ai_query.AIQueryError``)::

    LocalEngineError            (ai_query) the local engine could not be prepared or started
    └── LocalServerError        a local model server could not be prepared, started or reached
        └── ModelBuildError     a model artefact could not be built (missing wheel, failed conversion)
"""

from __future__ import annotations

from ai_query import LocalEngineError

__all__ = ["LocalServerError", "ModelBuildError"]


class LocalServerError(LocalEngineError):
    """A local model server could not be prepared, started or reached.

    Start-up failures carry the tail of the server's log in the message and the log's path in
    ``log_path``, because the real cause (out of memory, a bad flag) is only ever written there.
    """

    def __init__(self, message: str, *, log_path: str | None = None) -> None:
        super().__init__(message)
        self.log_path = log_path


class ModelBuildError(LocalServerError):
    """A model artefact could not be built into the cache."""
