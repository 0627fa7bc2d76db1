"""The exception tree of ai-query. Every error the project raises derives from ``AIQueryError``::

    AIQueryError
    ├── ConfigError                 an endpoint config or job spec is invalid (names the field and the fix)
    │   └── UnknownEndpointError    no endpoint of that name in the registry (lists the known ones)
    ├── SecretNotFoundError         a {{secrets/scope/key}} reference cannot be resolved
    ├── ArgumentError               a bad ai_query argument (returnType, modelParameters, a named argument)
    ├── EndpointError               a call to a model endpoint failed
    │   ├── RetryableEndpointError  429, 5xx, timeouts, resets, an unparseable 200: worth another attempt
    │   │   ├── RateLimitedError    429 (or 503) with an optional Retry-After
    │   │   ├── EndpointTimeoutError  no answer within request_timeout_s (a sign of load)
    │   │   └── ReplicaUnavailableError  one replica of a vllm_pool is down: the row goes to another
    │   └── PermanentEndpointError  400, 422, ...: this row will never succeed as sent
    │       └── SystemicEndpointError  401, 403, 404: no row can succeed; the job stops early
    ├── RowFailedError              a row failed and ``failOnError`` is true
    ├── LocalEngineError            the embedded local engine could not be prepared or started
    ├── DeltaCommitError            a Delta commit was refused or failed (names the table and the fix)
    │   └── (spark_udfs) DeltaWriteError   a Spark write to a Delta table: mode, schema, options, commit
    └── (spark_udfs) DeltaReadError        a Delta table cannot be read by the delta-rs data source

Row failures are data (``errorMessage``); only systemic failures and ``failOnError`` raise.
"""

from __future__ import annotations


class AIQueryError(Exception):
    """Root of every error raised by ai-query."""


class ConfigError(AIQueryError):
    """An endpoint config or job spec is invalid."""


class UnknownEndpointError(ConfigError):
    """``ai_query`` named an endpoint the registry does not know."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = sorted(known)
        listed = ", ".join(repr(k) for k in self.known) or "(none)"
        super().__init__(
            f"unknown endpoint {name!r}: known endpoints are {listed}. "
            "Add it to your endpoints file (AIQ_ENDPOINTS or register(spark, endpoints=...)) or fix the name."
        )


class SecretNotFoundError(AIQueryError):
    """A ``{{secrets/scope/key}}`` reference could not be resolved."""


class ArgumentError(AIQueryError):
    """A bad argument to ``ai_query`` or a task function, found before any task runs."""


class EndpointError(AIQueryError):
    """A call to a model endpoint failed."""

    def __init__(self, message: str, *, status_code: int | None = None, request_id: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.request_id = request_id


class RetryableEndpointError(EndpointError):
    """A transient failure: 429, 5xx, timeout, connection reset, or an unparseable 200 body."""


class RateLimitedError(RetryableEndpointError):
    """The endpoint asked us to slow down (429, or 503 with Retry-After)."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = 429,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status_code=status_code, request_id=request_id)
        self.retry_after = retry_after


class EndpointTimeoutError(RetryableEndpointError):
    """The endpoint did not answer within ``request_timeout_s``: like a 429, a sign of load."""


class ReplicaUnavailableError(RetryableEndpointError):
    """A replica of a ``vllm_pool`` could not be reached (crashed, restarting); the retry goes to
    another replica and spends none of the endpoint's retry budget."""


class PermanentEndpointError(EndpointError):
    """The endpoint rejected this request; sending it again will not help."""


class SystemicEndpointError(PermanentEndpointError):
    """No request to this endpoint can succeed (bad key, no permission, no such model)."""


class RowFailedError(AIQueryError):
    """A row failed while ``failOnError`` is true."""


class LocalEngineError(AIQueryError):
    """The embedded local engine could not be prepared or started."""


class DeltaCommitError(AIQueryError):
    """A Delta commit was refused (a bad app transaction) or failed (the store, a conflict)."""
