"""Spark error conditions (error class + SQLSTATE) on ``ai_query``'s argument and row errors.

Spark code reads a failure by ``getCondition()`` / ``getSqlState()`` rather than by its text, and
Databricks documents conditions for its AI functions. pyspark's ``PySparkException`` takes its
conditions from pyspark's own error-classes JSON, which a library cannot extend, so the errors
here keep the condition themselves: each is the ai-query error it was (``ArgumentError``,
``UnknownEndpointError``, ``RowFailedError``: every ``except`` clause written for those still
catches it) and a ``PySparkException`` whose ``getCondition()`` / ``getSqlState()`` come from
``CONDITIONS``. Errors found on the driver are also ``AnalysisException`` (what Spark raises for
its own bad arguments). The text reads as Spark's own errors do::

    [AI_FUNCTION_INVALID_MODEL_PARAMETERS] modelParameters.temperature must be ... SQLSTATE: 22023

A row error is raised in a Python worker, and Spark hands it to the driver as text inside its
own ``PythonException`` (condition ``PYTHON_EXCEPTION``, SQLSTATE 38000); the text holds the line
above, and ``condition_of`` reads it back into the typed error. Conditions named ``AI_FUNCTION_*``
are Databricks' documented ones (its SQLSTATEs); ``AI_QUERY_*`` are ours, with the SQLSTATE
Spark gives the analogous error of its own.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, TypeVar

from pyspark.errors import AnalysisException, PySparkException

from ai_query import AIQueryError, ArgumentError, ConfigError, EndpointError, RowFailedError, SecretNotFoundError, UnknownEndpointError
from ai_query import recover_error

CONDITIONS: dict[str, str] = {
    # Databricks' AI function conditions (https://docs.databricks.com/error-messages/error-classes)
    "AI_FUNCTION_INVALID_MODEL_PARAMETERS": "22023",
    "AI_FUNCTION_UNSUPPORTED_RESPONSE_FORMAT": "0A000",
    "AI_FUNCTION_UNSUPPORTED_RETURN_TYPE": "0A000",  # the class Databricks raises for a bad returnType; 0A000 as its family
    "AI_FUNCTION_INVALID_MAX_WORDS": "22032",
    "AI_FUNCTION_HTTP_REQUEST_ERROR": "08000",
    "AI_FUNCTION_HTTP_PARSE_CAST_ERROR": "2203G",
    # ours
    "AI_QUERY_INVALID_ARGUMENT": "22023",  # a bad argument value (invalid parameter value)
    "AI_QUERY_WRONG_ARGUMENTS": "4274K",  # too many, missing, repeated or misplaced arguments (Spark's named-argument state)
    "AI_QUERY_SQL_SYNTAX": "42601",  # an unterminated quote, comment or parenthesis (Spark's PARSE_SYNTAX_ERROR state)
    "AI_QUERY_ENDPOINT_NOT_FOUND": "42704",  # undefined object
    "AI_QUERY_FILES_DATATYPE_MISMATCH": "42K09",  # Spark's DATATYPE_MISMATCH state
    "AI_QUERY_TEMPORARY_FUNCTION_REQUIRED": "42K0F",  # Spark's INVALID_TEMP_OBJ_REFERENCE state
    "AI_QUERY_INVALID_CONFIGURATION": "42000",  # an endpoints file or secret that cannot serve the call
    "AI_QUERY_FAILED": "58000",  # any other failure of ai-query on the driver
}

F = TypeVar("F", bound=Callable[..., Any])
_TEXT = re.compile(r"^\[([A-Z][A-Z0-9_.]*)\] (.*) SQLSTATE: ([0-9A-Z]{5})$", re.S)


class AIFunctionException(PySparkException):
    """A ``PySparkException`` whose condition is one of ``CONDITIONS`` (not pyspark's JSON)."""

    def _set_condition(self, condition: str, message: str) -> None:
        if condition not in CONDITIONS:
            raise ValueError(f"internal error: unknown error condition {condition!r}")
        self._errorClass = condition
        self._message = message
        self._messageParameters = {"message": message}
        self._contexts = []

    def getSqlState(self) -> str:  # noqa: N802 - pyspark's name
        return CONDITIONS[self._errorClass]  # type: ignore[index]

    def getBreakingChangeInfo(self) -> None:  # noqa: N802 - pyspark's name; no breaking change behind ours
        return None

    def getMessage(self) -> str:  # noqa: N802 - pyspark's name
        return f"[{self._errorClass}] {self._message} SQLSTATE: {self.getSqlState()}"

    def __str__(self) -> str:
        return self.getMessage()


def _init(error: AIFunctionException, condition: str) -> None:
    found = _TEXT.match(error.args[0])  # a text read back from a Spark failure: its condition is in it
    if found:
        condition, error.args = found.group(1), (found.group(2),)
    error._set_condition(condition, error.args[0])


class AIQueryArgumentException(ArgumentError, AIFunctionException, AnalysisException):
    """A bad argument of an AI function call (``ArgumentError``), with its condition."""

    def __init__(self, message: str, condition: str = "AI_QUERY_INVALID_ARGUMENT") -> None:
        ArgumentError.__init__(self, message)
        _init(self, condition)


class AIQueryEndpointNotFoundException(UnknownEndpointError, AIFunctionException, AnalysisException):
    """An endpoint the registry does not know (``UnknownEndpointError``): AI_QUERY_ENDPOINT_NOT_FOUND."""

    def __init__(self, name: str, known: list[str]) -> None:
        UnknownEndpointError.__init__(self, name, known)
        self._set_condition("AI_QUERY_ENDPOINT_NOT_FOUND", self.args[0])


class AIQueryRowException(RowFailedError, AIFunctionException):
    """A row that failed while ``failOnError`` is true (``RowFailedError``), with its condition."""

    def __init__(self, message: str, condition: str = "AI_FUNCTION_HTTP_REQUEST_ERROR") -> None:
        RowFailedError.__init__(self, message)
        _init(self, condition)


class AIQueryDriverException(AIQueryError, AIFunctionException):
    """Any other ai-query error met while preparing a statement (a preflight call, a secret); its
    class is made per ai-query type (``as_spark_error``), so it pickles as that type's twin."""

    def __reduce__(self) -> tuple[Any, ...]:
        base = next(c for c in type(self).__bases__ if c is not AIQueryDriverException)
        return _rebuild_twin, (base, self.args, self.__dict__)


def _rebuild_twin(base: type, args: tuple[Any, ...], state: dict[str, Any]) -> AIQueryError:
    twin = _twin_class(base).__new__(_twin_class(base))
    twin.args = args
    twin.__dict__.update(state)
    return twin


@functools.lru_cache(maxsize=None)
def _twin_class(base: type) -> type:
    return type(base.__name__, (base, AIQueryDriverException), {"__module__": __name__})


def argument_error(condition: str, message: str) -> AIQueryArgumentException:
    """The argument error to raise: ``message`` (one paragraph: the value and the fix) under ``condition``."""
    return AIQueryArgumentException(message, condition)


def as_spark_error(error: AIQueryError) -> AIQueryError:
    """``error`` as an ``AIFunctionException`` of the same ai-query type (itself if it is one already)."""
    if isinstance(error, AIFunctionException):
        return error
    if isinstance(error, ArgumentError):
        return _with_state(AIQueryArgumentException, error, "AI_QUERY_INVALID_ARGUMENT")
    if isinstance(error, UnknownEndpointError):
        return _with_state(AIQueryEndpointNotFoundException, error, "AI_QUERY_ENDPOINT_NOT_FOUND")
    if isinstance(error, RowFailedError):
        return _with_state(AIQueryRowException, error, "AI_FUNCTION_HTTP_REQUEST_ERROR")
    if isinstance(error, (ConfigError, SecretNotFoundError)):
        condition = "AI_QUERY_INVALID_CONFIGURATION"
    elif isinstance(error, EndpointError):
        condition = "AI_FUNCTION_HTTP_REQUEST_ERROR"
    else:
        condition = "AI_QUERY_FAILED"
    return _with_state(_twin_class(type(error)), error, condition)


def _with_state(cls: type, error: AIQueryError, condition: str) -> Any:
    twin = cls.__new__(cls)
    twin.args = error.args
    twin.__dict__.update(error.__dict__)
    twin._set_condition(condition, str(error))
    return twin


def condition_of(error: BaseException) -> AIQueryError | None:
    """The ai-query error, with its condition, behind a Spark failure (a ``PythonException`` whose
    text holds a failed row's error) or the error itself; ``None`` if it holds none of ours."""
    if isinstance(error, AIFunctionException) and isinstance(error, AIQueryError):
        return error
    if isinstance(error, AIQueryError):
        return as_spark_error(error)
    for cls in (AIQueryRowException, AIQueryArgumentException):
        found = recover_error(str(error), cls)
        if found is not None:
            return found
    return None


def raises_conditions(fn: F) -> F:
    """``fn`` raising its ai-query errors as ``AIFunctionException``s (the driver's entry points)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AIQueryError as exc:
            if isinstance(exc, AIFunctionException):
                raise
            raise as_spark_error(exc).with_traceback(exc.__traceback__) from exc.__cause__

    return wrapper  # type: ignore[return-value]
