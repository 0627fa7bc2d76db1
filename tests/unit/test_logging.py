"""Our loggers: secrets scrubbed from every record, rare events throttled at INFO with counts.

Mutations caught: ``get_logger`` without ``addFilter`` (the secret reaches the handler);
``RedactingFilter`` skipping ``extra`` fields (the error field keeps the key); ``Throttled``
without its throttle (a line per event) or dropping the count of the events it held back.
"""

from __future__ import annotations

import io
import logging

import pytest

from ai_query import RedactingFilter, Throttled, get_logger
from ai_query._redact import remember_secret

SECRET = "sk-unit-logging-secret-00112233445566"


@pytest.mark.parametrize("name", ["ai_query.client", "ai_query.limits", "spark_udfs", "batch_runner", "gpu_workers.pool"])
def test_a_known_secret_never_reaches_a_handler_from_any_package_logger(name, caplog):
    remember_secret(SECRET)
    logger = get_logger(name)
    with caplog.at_level(logging.DEBUG, logger=name):
        logger.info("provider said: Incorrect API key provided: %s", SECRET, extra={"endpoint": "e", "error": f"key {SECRET}"})
        try:
            raise RuntimeError(f"echo {SECRET}")
        except RuntimeError:
            logger.exception("failed")
    assert len(caplog.records) == 2
    assert SECRET not in caplog.text
    assert SECRET not in caplog.records[0].error and "[REDACTED]" in caplog.records[0].getMessage()
    assert all(SECRET not in (r.exc_text or "") for r in caplog.records)


class _ExceptionObjectFormatter(logging.Formatter):
    """Renders the exception object itself, as pyspark's ``JSONFormatter`` and python-json-logger do."""

    def format(self, record: logging.LogRecord) -> str:
        exc = record.exc_info[1] if record.exc_info else None
        return f"{record.getMessage()} | {exc!s} | {record.exc_text or ''}"


def test_a_formatter_that_renders_the_exception_object_never_sees_the_secret():
    """Mutation caught: the filter masking ``exc_text`` but keeping ``exc_info`` (the CI failure of stop 21)."""
    remember_secret(SECRET)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_ExceptionObjectFormatter())
    logger = get_logger("ai_query.test_exception_object")
    logger.addHandler(handler)
    try:
        try:
            raise RuntimeError(f"echo {SECRET}")
        except RuntimeError:
            logger.error("failed", exc_info=True)
    finally:
        logger.removeHandler(handler)
    assert "echo [REDACTED]" in stream.getvalue() and SECRET not in stream.getvalue()


def test_a_logger_made_while_pyspark_swapped_the_logger_class_is_still_ours():
    """pyspark's ``PySparkLogger.getLogger`` swaps the process-wide logger class without a lock; a
    logger of ours made meanwhile must not come out with pyspark's own JSON handler on stderr.
    Mutation caught: ``get_logger`` without its class check (the logger keeps the stderr handler)."""
    pyspark_logger = pytest.importorskip("pyspark.logger")
    logging.setLoggerClass(pyspark_logger.PySparkLogger)
    try:
        logger = get_logger("ai_query.test_made_while_swapped")
    finally:
        logging.setLoggerClass(logging.Logger)
    assert type(logger) is logging.Logger and logger.handlers == []
    assert any(isinstance(f, RedactingFilter) for f in logger.filters)


def test_every_package_logger_carries_the_filter_once():
    for name in ("ai_query", "ai_query.client", "spark_udfs", "batch_runner"):
        get_logger(name)
        get_logger(name)
        assert sum(isinstance(f, RedactingFilter) for f in logging.getLogger(name).filters) == 1


def test_throttled_logs_one_line_per_key_and_interval_and_counts_what_it_held_back(caplog):
    now = [0.0]
    throttled = Throttled(get_logger("ai_query.client"), every_s=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="ai_query.client"):
        made = []
        for t in (0.0, 1.0, 2.0, 9.9, 10.0, 10.5):
            now[0] = t
            made.append(throttled.info(("429", "a"), "endpoint %r throttles", "a", endpoint="a", status=429, wait_s=1.0))
        now[0] = 10.6
        made.append(throttled.info(("429", "b"), "endpoint %r throttles", "b", endpoint="b"))  # another key: its own clock
    assert made == [True, False, False, False, True, False, True]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["endpoint 'a' throttles", "endpoint 'a' throttles (3 more since the last line)", "endpoint 'b' throttles"]
    assert [r.suppressed for r in caplog.records] == [0, 3, 0]
    assert (caplog.records[0].endpoint, caplog.records[0].status, caplog.records[0].wait_s) == ("a", 429, 1.0)


def test_throttled_does_nothing_when_info_is_off(caplog):
    throttled = Throttled(get_logger("ai_query.client"), clock=lambda: 0.0)
    with caplog.at_level(logging.WARNING, logger="ai_query.client"):
        assert throttled.info("k", "never") is False
    assert caplog.records == []


def test_the_breaker_opening_and_closing_is_one_info_line_each(caplog):
    """Mutation caught: the ``_throttled.info`` call in ``CircuitBreaker.failed`` (or ``answered``) removed."""
    from ai_query.limits.breaker import CircuitBreaker

    now = [100.0]
    breaker = CircuitBreaker("flaky-logging", threshold=3, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="ai_query.limits"):
        for i in range(5):  # the third opens it; the next two meet it open: no more lines
            breaker.failed(f"HTTP 503 ({i})", row=i)
        breaker.answered()
        breaker.answered()  # closed already: nothing to say
    lines = [(r.levelname, r.getMessage(), r.breaker, r.endpoint) for r in caplog.records]
    assert lines == [
        ("INFO", "endpoint 'flaky-logging' looks down (3 failures in a row, last: HTTP 503 (2)): circuit breaker open, rows wait for it "
                 "up to 300 s", "open", "flaky-logging"),
        ("INFO", "endpoint 'flaky-logging' answers again: circuit breaker closed, rows go on", "closed", "flaky-logging"),
    ]
