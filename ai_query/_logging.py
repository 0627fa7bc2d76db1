"""Logging: one logger per package, rare events at INFO with a throttle, secrets never in a record.

Loggers: ``ai_query`` (and ``ai_query.client``, ``ai_query.limits``, ``ai_query.serving``, ...),
``spark_udfs``, ``batch_runner``, ``gpu_workers``. Nothing here configures handlers: an
application decides where records go (``logging.basicConfig(level="INFO")`` shows what a user
needs); ``ai-query serve`` and ``ai-query run`` configure their own.

**What goes where.** INFO carries what a user acts on while a job runs: an endpoint throttles
(429 waits), its circuit breaker opens or closes, the retry budget stops retries, the limiter
cuts concurrency. Everything else is DEBUG. The endpoint exchange is the hot path (benchmarked):
it logs only those rare events, never one line per request, and each through ``Throttled``, so a
429 storm of 10,000 refusals is a handful of lines that count what they stand for ("... 812 more
since the last line"). Structured fields ride on ``extra=`` (``endpoint``, ``attempt``,
``status``, ``wait_s``) for JSON formatters and log shippers.

**Secrets.** Providers echo keys in their errors (``_redact``); such text can reach a log line
through a message or an argument. ``RedactingFilter`` scrubs the formatted message, the string
fields and a traceback's text of every record. A filter on a logger sees only the records made
on that very logger (not its children's, which propagate to the handlers directly), so every
logger of ours is made with ``get_logger``, which puts the filter on it.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any, Callable, Hashable

from ._redact import redact

PACKAGE_LOGGERS = ("ai_query", "spark_udfs", "batch_runner", "gpu_workers")
"""The root logger of each package; modules log on children of these (``ai_query.client``)."""

_SECRETS_IN_TEXT = [
    (re.compile(r"(?i)(bearer\s+)[^\s\"',]+"), r"\1********"),
    (re.compile(r"(?i)(\"?[a-z_]*(?:_plaintext|api_key|token)\"?\s*[:=]\s*\"?)(?!\{\{secrets/)([^\s\"',}]+)"), r"\1********"),
]
_FIELDS = ("endpoint", "error")
"""``extra=`` fields that may hold text from outside (an endpoint name is ours; an error is not)."""


def mask_text(text: str) -> str:
    """``text`` with credential assignments masked and every secret ``redact`` knows scrubbed."""
    for pattern, replacement in _SECRETS_IN_TEXT:
        text = pattern.sub(replacement, text)
    return redact(text)


class RedactingFilter(logging.Filter):
    """Masks bearer tokens, credential values and known secrets in every record that passes through
    it: the message with its arguments, string ``extra`` fields, and a traceback's text (formatted
    once here, masked, and reused by every handler)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_text(message)
        if masked != message:
            record.msg, record.args = masked, None
        for name in _FIELDS:
            value = record.__dict__.get(name)
            if isinstance(value, str):
                record.__dict__[name] = mask_text(value)
        if record.exc_info:
            raw = record.exc_text or logging.Formatter().formatException(record.exc_info)
            record.exc_text = mask_text(raw)
            if record.exc_text != raw:
                # Formatters that render the exception object themselves (pyspark's JSONFormatter,
                # python-json-logger) would print its message unmasked: keep only the masked text.
                record.exc_info = None
        return True


_FILTER = RedactingFilter()


def get_logger(name: str) -> logging.Logger:
    """The logger ``name`` (one of ours), with ``RedactingFilter`` on it."""
    logger = logging.getLogger(name)
    if type(logger) is not logging.Logger and type(logger).__module__.startswith("pyspark."):
        # pyspark's ``PySparkLogger.getLogger`` swaps the process-wide logger class for a moment
        # (not thread-safe: two Spark errors raised at once can leave it swapped), so a logger made
        # meanwhile comes out as a PySparkLogger with its own JSON handler on stderr. Ours stay
        # plain loggers whose records go where the application's handlers say.
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.__class__ = logging.Logger
    if not any(isinstance(f, RedactingFilter) for f in logger.filters):
        logger.addFilter(_FILTER)
    return logger


def install_redaction(handlers_of: tuple[str, ...] = ("",)) -> None:
    """``RedactingFilter`` on every logger of our packages made so far and on the handlers of the
    loggers ``handlers_of`` (the root by default): records of third-party loggers (uvicorn's,
    aiohttp's) that reach those handlers are masked too."""
    for name in list(logging.root.manager.loggerDict):
        if name.split(".")[0] in PACKAGE_LOGGERS:
            get_logger(name)
    for name in PACKAGE_LOGGERS:
        get_logger(name)
    for name in handlers_of:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in logger.filters):
            logger.addFilter(_FILTER)
        for handler in logger.handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(_FILTER)


class Throttled:
    """At most one INFO record per key every ``every_s`` seconds; the events in between are counted
    and the next record says how many it stands for (``suppressed`` in its ``extra``).

    >>> throttled = Throttled(get_logger("ai_query.client"))
    >>> throttled.info(("429", "my-endpoint"), "endpoint %r throttles: waiting %.1f s", "my-endpoint", 2.0,
    ...                endpoint="my-endpoint", status=429, wait_s=2.0)
    """

    def __init__(self, logger: logging.Logger, every_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.every_s = every_s
        self._clock = clock
        self._last: dict[Hashable, float] = {}
        self._skipped: dict[Hashable, int] = {}

    def info(self, key: Hashable, msg: str, *args: Any, **fields: Any) -> bool:
        """Log ``msg % args`` at INFO with ``fields`` as ``extra`` unless ``key`` logged less than
        ``every_s`` ago; True if a record was made."""
        if not self.logger.isEnabledFor(logging.INFO):
            return False
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.every_s:
            self._skipped[key] = self._skipped.get(key, 0) + 1
            return False
        self._last[key] = now
        skipped = self._skipped.pop(key, 0)
        if skipped:
            msg += f" ({skipped} more since the last line)"
        self.logger.info(msg, *args, extra={**fields, "suppressed": skipped})
        return True
