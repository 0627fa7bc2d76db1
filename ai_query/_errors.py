"""The exception tree of ai-query. Every error the project raises derives from ``AIQueryError``::

    AIQueryError
    ├── ConfigError                 an endpoint config or job spec is invalid (names the field and the fix)
    │   ├── UnknownEndpointError    no endpoint of that name in the registry (lists the known ones)
    │   └── CronError               a cron expression (a job's schedule) that cannot be parsed
    ├── SecretNotFoundError         a {{secrets/scope/key}} reference cannot be resolved
    ├── ArgumentError               a bad ai_query argument (returnType, modelParameters, a named argument)
    │   └── UnsupportedFileError    a file whose type no endpoint takes (a row error)
    ├── EndpointError               a call to a model endpoint failed
    │   ├── RetryableEndpointError  429, 5xx, timeouts, resets, an unparseable 200: worth another attempt
    │   │   ├── RateLimitedError    429 (or 503) with an optional Retry-After; also the serving
    │   │   │                       endpoint's refusal of a caller over its per-key rate limit
    │   │   ├── EndpointTimeoutError  no answer within request_timeout_s (a sign of load)
    │   │   ├── ReplicaUnavailableError  one replica of a vllm_pool is down: the row goes to another
    │   │   └── EndpointUnavailableError  an outage sign met while the endpoint's circuit breaker is
    │   │                       open: retried after the outage, costing the row no attempt
    │   ├── EndpointOutageError     the endpoint stayed down longer than outage_wait_s (a row error)
    │   └── PermanentEndpointError  400, 422, ...: this row will never succeed as sent
    │       └── SystemicEndpointError  401, 403, 404: no row can succeed; the job stops early
    ├── TransportError              the request got no HTTP answer (the transport's own errors)
    │   ├── ConnectFailedError      no connection: refused, unresolvable, TLS handshake failed
    │   ├── ConnectionLostError     an open connection closed, broke or spoke no HTTP mid-answer
    │   └── TransportTimeoutError   no complete answer within the request's timeout
    ├── ServingError                an HTTP error answer of a server of ours (status, error_code, headers)
    │   └── BadRequestError         a request body that does not follow the wire format (400)
    ├── RowFailedError              a row failed and ``failOnError`` is true
    ├── LocalEngineError            the embedded local engine could not be prepared or started
    │   └── (gpu_workers) LocalServerError > ModelBuildError
    ├── DeltaCommitError            a Delta commit was refused or failed (names the table and the fix)
    │   └── (spark_udfs) DeltaWriteError   a Spark write to a Delta table: mode, schema, options, commit
    └── (spark_udfs) DeltaReadError        a Delta table cannot be read by the delta-rs data source

Row failures are data (``errorMessage``); only systemic failures and ``failOnError`` raise.
Through ``spark_udfs`` (``spark.sql``, ``selectExpr``, ``spark_udfs.ai_query``, a failed row) these
are raised as their twins that also carry a Spark error condition and SQLSTATE
(``spark_udfs/_conditions.py``): still the same types here, for every ``except`` clause.

Every message is scrubbed of secrets when the error is made (``ai_query/_redact.py``): a provider
that echoes the key it was sent cannot put it into an error, and so into a row, a log or an answer.

Every error pickles whatever its ``__init__`` takes (``AIQueryError.__reduce__``), so it crosses
process boundaries intact. Spark, though, hands a Python worker's error to the driver as text;
``recover_error`` finds our error in that text and rebuilds it typed, message only.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, TypeVar

from ._redact import redact

E = TypeVar("E", bound="AIQueryError")


class AIQueryError(Exception):
    """Root of every error raised by ai-query."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*(redact(a) if isinstance(a, str) else a for a in args))

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception pickles as ``cls(*args)``, which breaks for any __init__ that takes other
        # arguments than the message (UnknownEndpointError, ServingError): rebuild without __init__
        return _rebuild, (type(self), self.args, self.__dict__)


def _rebuild(cls: type[E], args: tuple[Any, ...], state: dict[str, Any]) -> E:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


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


class CronError(ConfigError, ValueError):
    """A cron expression that cannot be parsed; the message names the field and the fix."""


class ArgumentError(AIQueryError):
    """A bad argument to ``ai_query`` or a task function, found before any task runs."""


class UnsupportedFileError(ArgumentError, ValueError):
    """A file whose type the endpoints cannot take (a row error, not a systemic one)."""


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

    def __init__(self, message: str, *, status_code: int | None = 429, request_id: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message, status_code=status_code, request_id=request_id)
        self.retry_after = retry_after


class EndpointTimeoutError(RetryableEndpointError):
    """The endpoint did not answer within ``request_timeout_s``: like a 429, a sign of load."""


class ReplicaUnavailableError(RetryableEndpointError):
    """A replica of a ``vllm_pool`` could not be reached (crashed, restarting); the retry goes to
    another replica and spends none of the endpoint's retry budget."""


class EndpointUnavailableError(RetryableEndpointError):
    """An attempt met an outage sign (no connection, 502/503/504) while the endpoint's circuit
    breaker is open (``breaker_open``) or while a streak of such failures grows towards opening
    it: the endpoint's failure, not the row's. The row tries again (waiting in the breaker when
    it is open, else after the usual backoff) without counting the attempt towards
    ``max_attempts`` or spending retry budget."""

    def __init__(self, message: str, *, status_code: int | None = None, request_id: str | None = None,
                 breaker_open: bool = True) -> None:
        super().__init__(message, status_code=status_code, request_id=request_id)
        self.breaker_open = breaker_open


class EndpointOutageError(EndpointError):
    """The endpoint has not answered for ``outage_wait_s`` (or the row's own deadline came first):
    the row fails with a message that says since when and how to resume. Not retried."""


class PermanentEndpointError(EndpointError):
    """The endpoint rejected this request; sending it again will not help."""


class SystemicEndpointError(PermanentEndpointError):
    """No request to this endpoint can succeed (bad key, no permission, no such model)."""


class TransportError(AIQueryError):
    """A request got no HTTP answer. Transports raise only these (``ai_query/transport/_errors_table.py``
    maps each library's exceptions onto them), so a failure reads the same in a batch row and in a
    served response whichever transport carried it; the endpoint client turns them into
    ``RetryableEndpointError`` (a timeout into ``EndpointTimeoutError``)."""


class ConnectFailedError(TransportError):
    """No connection could be made: refused, unresolvable, unroutable, or the TLS handshake failed."""


class ConnectionLostError(TransportError):
    """A connection closed or broke before the answer was complete, or the answer was not HTTP."""


class TransportTimeoutError(TransportError):
    """No complete answer within the request's timeout."""


class ServingError(AIQueryError):
    """An error answer of a server of ours: HTTP ``status``, a Databricks-style ``error_code``
    (``PERMISSION_DENIED``, ``RESOURCE_DOES_NOT_EXIST``, ...), a message for the caller, and extra
    headers (``Retry-After``)."""

    def __init__(self, status: int, error_code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message: str = self.args[0]
        self.headers = dict(headers or {})


class BadRequestError(ServingError):
    """A request body that does not follow the wire format: answered 400 (or ``status``), in the
    error shape of the API the server speaks (``code`` and ``param`` as that API names them)."""

    def __init__(self, message: str, status: int = 400, code: str | None = None, *, param: str | None = None) -> None:
        super().__init__(status, code or "BAD_REQUEST", message)
        self.code = code
        self.param = param


class RowFailedError(AIQueryError):
    """A row failed while ``failOnError`` is true."""


class LocalEngineError(AIQueryError):
    """The embedded local engine could not be prepared or started."""


class DeltaCommitError(AIQueryError):
    """A Delta commit was refused (a bad app transaction) or failed (the store, a conflict)."""


def _subclasses(root: type) -> dict[str, type]:
    found = {root.__name__: root}
    for sub in root.__subclasses__():
        for name, cls in _subclasses(sub).items():
            found.setdefault(name, cls)
    return found


def recover_error(text: str, expected: type[E]) -> E | None:
    """Our error of type ``expected`` (or a subclass) named in ``text``, rebuilt typed; else ``None``.

    Spark hands a Python worker's failure to the driver as text, a traceback whose last line names
    the error: ``ai_query._errors.ConfigError: <message>`` or ``spark_udfs._delta.DeltaWriteError:
    <message>``. The last such line is the error that ended the task; its first line of message is
    kept (no worker traceback). Classes are known by name (``expected``'s subclasses loaded now).
    """
    classes = _subclasses(expected)
    names = "|".join(re.escape(name) for name in sorted(classes, key=len, reverse=True))
    found = re.findall(rf"(?<![\w])(?:[A-Za-z_]\w*\.)*({names}): *([^\n]*)", text)
    if not found:
        return None
    name, message = found[-1]
    cls = classes[name]
    try:
        return cls(message.strip())  # type: ignore[return-value]
    except TypeError:  # an __init__ that takes more than the message: the message alone, still typed
        error = cls.__new__(cls)
        Exception.__init__(error, redact(message.strip()))
        return error  # type: ignore[return-value]
