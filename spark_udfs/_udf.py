"""The Arrow UDFs behind ``ai_query``: the Arrow batch <-> rows adapter over ``ai_query.batch``.

Each Arrow batch becomes rows (files attached to their requests, the response format computed on
the driver), goes through the core's pipeline (``start_rows``: dedup, journal replay, fan out,
collect) with the Spark task's response journal and the stage's answer cache, and comes back as
an Arrow array of the registered return type.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Iterator

import pyarrow as pa

from ai_query import AIQueryClient, CallResult, EndpointRegistry, shared_client
from ai_query._files import UnsupportedFileError, as_file_list, with_files
from ai_query.backends import BatchContext
from ai_query.batch import JOURNAL_PROPERTY, ResponseJournal, StageAnswers, TaskJournal, stage_answers
from ai_query.batch.pipeline import PendingRows, start_rows
from ai_query.batch.provider_batches import ONLINE_ONLY_PROPERTY
from ai_query.batch.request import invalid_utf8_message
from ai_query.process import cmdline, die_with_parent

from ._conditions import AIQueryRowException, argument_error
from ._types import AUDIT_COLUMNS, convert, result_type

SIGNATURE = ["endpoint", "request", "returnType", "failOnError", "modelParameters", "responseFormat", "files"]


@dataclass(frozen=True)
class UDFSpec:
    """What one registered variant of ``ai_query`` returns (fixed at registration)."""

    value_type_json: str
    """The Spark type of ``response``, as ``DataType.json()`` (pickles and hashes)."""
    with_error: bool = False
    """``STRUCT<response, errorMessage>`` instead of failing the query on a row error."""
    audit: bool = False
    """``STRUCT<response, aiq_*...>``: the audit columns, row errors as data."""
    response_format_json: str | None = None
    """The OpenAI-style ``response_format`` object, computed on the driver from ``responseFormat``."""
    progress_address: tuple[str, int] | None = None
    quota_broker: tuple[str, int] | None = None
    """The driver's ``QuotaBroker``: quotas hold for the whole job, not per worker."""
    quota_share: float = 1.0
    """This worker's static share of each quota when the broker cannot be reached."""
    arguments: tuple[str, ...] | None = None
    """Set: a pipelined iterator UDF taking exactly these ``SIGNATURE`` arguments by position."""

    def value_type(self):
        from pyspark.sql.types import _parse_datatype_json_string

        return _parse_datatype_json_string(self.value_type_json)

    def return_type(self):
        return result_type(self.value_type(), with_error=self.with_error, audit=self.audit)


def _column(values: pa.Array | None, n: int) -> list[Any]:
    return [None] * n if values is None else values.to_pylist()


def _task_context() -> Any:
    """The running Spark task's ``TaskContext``; ``None`` outside a task (the driver, unit tests)."""
    try:
        from pyspark import TaskContext

        return TaskContext.get()
    except Exception:  # noqa: BLE001 - no Spark here
        return None


def _row_label(position: int) -> str:
    ctx = _task_context()
    if ctx is not None:
        return f"row {position} of the Arrow batch in partition {ctx.partitionId()}"
    return f"row {position} of the batch"


def _task_journal() -> TaskJournal | None:
    """The response journal a batch job asked for through a Spark local property (else none), as
    this task attempt's: a retried or speculative attempt (or one of a retried stage) first
    replays what earlier attempts of the same task journaled in this run."""
    ctx = _task_context()
    journal = ResponseJournal.from_property(ctx.getLocalProperty(JOURNAL_PROPERTY)) if ctx is not None else None
    if journal is None:
        return None
    return journal.for_task(f"{ctx.stageId()}.{ctx.partitionId()}", str(ctx.taskAttemptId()), ctx.attemptNumber() > 0)


def _answers_of_this_stage() -> StageAnswers:
    """This Spark stage's answers in this worker; outside a Spark task, a fresh empty cache."""
    ctx = _task_context()
    # The stage id is unique in the SparkContext; a retried stage may reuse its answers.
    return stage_answers(ctx.stageId() if ctx is not None else None)


def _batch_context() -> BatchContext | None:
    """What the core may need to know of the running task: the GPUs Spark assigned to it (for a
    backend), the SQL execution it serves (live progress counts per action; the root execution,
    so that a subquery's rows count towards the action that ran it), and whether a job's batch
    phase asks its calls to go online."""
    ctx = _task_context()
    if ctx is None:
        return None
    gpu = ctx.resources().get("gpu")
    action = ctx.getLocalProperty("spark.sql.execution.root.id") or ctx.getLocalProperty("spark.sql.execution.id")
    return BatchContext(gpu_ids=tuple(gpu.addresses) if gpu is not None else (), action=action,
                        online_only=bool(ctx.getLocalProperty(ONLINE_ONLY_PROPERTY)))


_BOUND_TO_DAEMON: int | None = None  # the pid that asked for its parent-death signal (a fork must ask again)


def _die_with_daemon() -> None:
    """A Python worker dies the moment the pyspark daemon that forked it does.

    The daemon SIGHUPs its workers when its JVM goes away, but a daemon killed outright (the run's
    process groups SIGKILLed, the OOM killer) leaves them orphaned, sending the rest of their
    task's requests for nobody (measured: thousands), even a task whose input was read after the
    kill. A forked worker keeps the daemon's command line (``... -m <daemon> <worker module>``): a
    parent with another one means the daemon is gone. A worker Spark starts without a daemon
    (``-m pyspark.worker``) is the child of a JVM thread, whose exit is no reason to stop."""
    global _BOUND_TO_DAEMON
    if _BOUND_TO_DAEMON == os.getpid() or threading.current_thread() is not threading.main_thread():
        return  # Linux keeps the signal per thread: armed by a thread that exits, it would be lost
    _BOUND_TO_DAEMON = os.getpid()
    own = cmdline(os.getpid())
    args = [a for a in own.split(b"\0") if a]
    if len(args) < 3 or args[-3] != b"-m":
        return
    parent = os.getppid()
    if cmdline(parent) != own or not die_with_parent(parent, signal.SIGKILL):
        os.kill(os.getpid(), signal.SIGKILL)  # the daemon died before the signal was armed


def decode_column(values: pa.Array) -> tuple[list[Any], dict[int, str]]:
    """A column's Python values, and the rows whose text is not valid UTF-8 (with their error; the
    value kept for messages only, its bad bytes replaced by U+FFFD).

    Spark passes a STRING's bytes unchecked (``CAST(unhex('C328') AS STRING)``); Arrow fails the
    whole batch on the first bad row, so the rows are read one by one only then.
    """
    try:
        return values.to_pylist(), {}
    except UnicodeDecodeError:
        pass
    raw = values.cast(pa.large_binary() if pa.types.is_large_string(values.type) else pa.binary()) \
        if pa.types.is_string(values.type) or pa.types.is_large_string(values.type) else None
    out: list[Any] = []
    errors: dict[int, str] = {}
    for i in range(len(values)):
        try:
            out.append(values[i].as_py())
        except UnicodeDecodeError as exc:
            data = raw[i].as_py() if raw is not None else None
            out.append(data.decode("utf-8", "replace") if data is not None else None)
            errors[i] = invalid_utf8_message(data, exc.start) if data is not None else \
                f"the request holds text that is not valid UTF-8 ({exc}); not sent; repair it with make_valid_utf8(col)"
    return out, errors


def _check_files_type(files: pa.Array) -> None:
    """A ``files`` column of another type than BINARY / ARRAY<BINARY> is the query's fault, not each row's."""
    kind = files.type
    if pa.types.is_null(kind) or pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return
    if (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and (
            pa.types.is_binary(kind.value_type) or pa.types.is_large_binary(kind.value_type) or pa.types.is_null(kind.value_type)):
        return
    raise argument_error(
        "AI_QUERY_FILES_DATATYPE_MISMATCH",
        f"ai_query: files => takes a BINARY or ARRAY<BINARY> column (image or PDF bytes), got a column of Arrow type {kind}; "
        "read the files with spark.read.format('binaryFile') and pass its content column, or unbase64(col) for base64 text"
    )


def start_task_rows(client: AIQueryClient, progress_address: tuple[str, int] | None, *columns: list[Any]) -> PendingRows:
    """``start_rows`` (``columns``: endpoints, requests, parameters, response formats) with the
    Spark task's response journal, this stage's answer cache and the task's batch context."""
    if _task_context() is not None:
        _die_with_daemon()
    return start_rows(client, progress_address, *columns, journal=_task_journal(), answers=_answers_of_this_stage(),
                      context=_batch_context())


@dataclass
class PendingBatch:
    """One Arrow batch on its way (``start_batch``); ``finish_batch`` waits and types the answers."""

    spec: UDFSpec
    endpoint: pa.Array
    requests: list[Any]
    fails: list[Any]
    row_errors: dict[int, str]
    """Rows not sent, with their error (a file of an unsupported type, text that is not UTF-8)."""
    rows: PendingRows

    def cancel(self) -> None:
        self.rows.cancel()


def start_batch(
    spec: UDFSpec,
    registry: EndpointRegistry,
    endpoint: pa.Array,
    request: pa.Array,
    fail_on_error: pa.Array | None,
    model_parameters: pa.Array | None,
    files: pa.Array | None = None,
) -> PendingBatch:
    """Start sending the batch's rows; returns at once (see ``finish_batch``)."""
    n = len(request)
    endpoints = endpoint.to_pylist()
    requests, row_errors = decode_column(request)
    if files is not None:
        _check_files_type(files)
        for i, row_files in enumerate(files.to_pylist()):
            if i in row_errors:
                continue
            try:
                requests[i] = with_files(requests[i], as_file_list(row_files))
            except UnsupportedFileError as exc:
                row_errors[i] = str(exc)
    for i in row_errors:
        endpoints[i] = None  # not sent: the row's error is its text or its file
    params_col = _column(model_parameters, n)
    fails = _column(fail_on_error, n)
    if not spec.with_error and not spec.audit and any(f is False for f in fails):
        raise argument_error(
            "AI_QUERY_INVALID_ARGUMENT",
            "failOnError => false returns STRUCT<response, errorMessage>, which this plain ai_query UDF cannot: "
            "run the statement through spark.sql after spark_udfs.register(spark) (it rewrites the call), "
            "or spark_udfs.sql(spark, query); in the DataFrame API use df.selectExpr(...) or "
            "spark_udfs.ai_query(endpoint, col, failOnError=False)"
        )
    response_format = json.loads(spec.response_format_json) if spec.response_format_json else None
    client = shared_client(registry, spec.quota_broker, spec.quota_share)
    rows = start_task_rows(client, spec.progress_address, endpoints, requests, params_col, [response_format] * n)
    return PendingBatch(spec, endpoint, requests, fails, row_errors, rows)


def finish_batch(batch: PendingBatch) -> tuple[list[CallResult], list[Any], list[str | None]]:
    """Wait for the batch; return per-row results, typed values, and row errors (conversion included)."""
    spec, requests, fails = batch.spec, batch.requests, batch.fails
    results = batch.rows.wait()
    for i, error in batch.row_errors.items():
        results[i] = replace(results[i], endpoint=batch.endpoint[i].as_py() or "", error=error)

    value_type = spec.value_type()
    values: list[Any] = []
    errors: list[str | None] = []
    unreadable: set[int] = set()  # answers that are not of the result type (the others: the call failed)
    for result in results:
        if not result.ok:
            values.append(None)
            errors.append(result.error)
            continue
        try:
            values.append(convert(result.value, value_type))
            errors.append(None)
        except (ValueError, TypeError, ArithmeticError) as exc:
            unreadable.add(len(values))
            values.append(None)
            errors.append(f"could not read the response as {value_type.simpleString().upper()}: {exc}")
            result.status = "error"
            result.error = errors[-1]
    if not spec.with_error and not spec.audit:
        for position, (result, error) in enumerate(zip(results, errors)):
            if error is not None and fails[position] is not False:
                preview = str(requests[position])[:60]
                raise AIQueryRowException(
                    f"ai_query({result.endpoint!r}) failed for {_row_label(position)} (request {preview!r}): {error}. "
                    "Use failOnError => false to get the error per row instead of failing the query.",
                    "AI_FUNCTION_HTTP_PARSE_CAST_ERROR" if position in unreadable else
                    "AI_QUERY_INVALID_ARGUMENT" if position in batch.row_errors else "AI_FUNCTION_HTTP_REQUEST_ERROR",
                )
    return results, values, errors


def evaluate_batch(
    spec: UDFSpec,
    registry: EndpointRegistry,
    endpoint: pa.Array,
    request: pa.Array,
    fail_on_error: pa.Array | None,
    model_parameters: pa.Array | None,
    files: pa.Array | None = None,
) -> tuple[list[CallResult], list[Any], list[str | None]]:
    """Send the batch and wait; return per-row results, typed values, and row errors."""
    return finish_batch(start_batch(spec, registry, endpoint, request, fail_on_error, model_parameters, files))


def _arrow_result(spec: UDFSpec, arrow_type: pa.DataType,
                  outcome: tuple[list[CallResult], list[Any], list[str | None]]) -> pa.Array:
    results, values, errors = outcome
    if spec.audit:
        rows = [
            {
                "response": value,
                "aiq_endpoint": r.endpoint,
                "aiq_model": r.model,
                "aiq_prompt_tokens": r.prompt_tokens,
                "aiq_completion_tokens": r.completion_tokens,
                "aiq_total_tokens": r.total_tokens,
                "aiq_usage_estimated": r.usage_estimated,
                "aiq_cost_usd": r.cost_usd,
                "aiq_latency_ms": round(r.latency_ms, 3),
                "aiq_attempts": r.attempts,
                "aiq_status": "ok" if error is None else "error",
                "aiq_error": error,
                "aiq_request_id": r.request_id,
                "aiq_completed_at": r.completed_at,
                "aiq_deduplicated": r.deduplicated,
                "aiq_status_code": r.http_status,
                "aiq_batch_id": r.batch_id,
            }
            for r, value, error in zip(results, values, errors)
        ]
        return pa.array(rows, type=arrow_type)
    if spec.with_error:
        return pa.array([{"response": v, "errorMessage": e} for v, e in zip(values, errors)], type=arrow_type)
    return pa.array(values, type=arrow_type)


def check_not_rewritten(spec: UDFSpec, return_type: pa.Array | None, response_format: pa.Array | None) -> None:
    """Refuse a ``returnType`` / ``responseFormat`` this variant was not registered for: the call
    reached Spark without the rewrite, and answering free text would silently drop them."""
    given = next((v for v in return_type.to_pylist() if v is not None), None) if return_type is not None else None
    fmt = next((v for v in response_format.to_pylist() if v is not None), None) if response_format is not None else None
    # The rewrite passes these arguments on to the variant it registered for them; only the plain
    # UDF (STRING) can be reached without it, and it is the rewrite's target only for returnType STRING.
    if (given is None and fmt is None) or spec.value_type_json != '"string"' or spec.response_format_json is not None:
        return
    if fmt is None and str(given).strip().lower() == "string":
        return
    what = f"returnType => {given!r}" if given is not None and fmt is None else f"responseFormat => {str(fmt)[:60]!r}"
    raise argument_error(
        "AI_FUNCTION_UNSUPPORTED_RESPONSE_FORMAT" if "responseFormat" in what else "AI_FUNCTION_UNSUPPORTED_RETURN_TYPE",
        f"ai_query(..., {what}) reached the plain ai_query UDF, which returns {spec.value_type().simpleString().upper()}: "
        "the expression was not rewritten (spark.sql, df.selectExpr and F.expr are, after spark_udfs.register(spark)). "
        "For a typed column use spark_udfs.ai_query(endpoint, col, returnType=..., responseFormat=...)"
    )


def build_udf(spec: UDFSpec, registry: EndpointRegistry):
    """An ``arrow_udf`` with ``ai_query``'s signature and ``spec``'s return type.

    With ``spec.arguments`` it is an iterator UDF taking those arguments by position: it starts
    each Arrow batch while the one before is still in flight, so the endpoint does not idle
    while a batch's last rows finish and Spark hands over the next (Spark passes no named
    arguments to iterator UDFs; the SQL rewrite writes the call positionally).
    """
    from pyspark.sql.functions import arrow_udf
    from ._types import arrow_type as arrow_type_of

    return_type = spec.return_type()
    arrow_type = arrow_type_of(return_type)

    if spec.arguments is not None:
        layout = spec.arguments
        unknown = [a for a in layout if a not in SIGNATURE]
        if layout[:2] != ("endpoint", "request") or unknown:
            raise ValueError(f"internal error: the positional arguments {layout} do not start with endpoint, request")

        def ai_query_batches(batches: Iterator[tuple[pa.Array, ...]]) -> Iterator[pa.Array]:
            in_flight: deque[PendingBatch] = deque()
            try:
                for arrays in batches:
                    args = dict(zip(layout, arrays))
                    in_flight.append(start_batch(spec, registry, args["endpoint"], args["request"], args.get("failOnError"),
                                                 args.get("modelParameters"), args.get("files")))
                    while len(in_flight) > 1:  # this batch fills the endpoint while the one before finishes
                        yield _arrow_result(spec, arrow_type, finish_batch(in_flight.popleft()))
                while in_flight:
                    yield _arrow_result(spec, arrow_type, finish_batch(in_flight.popleft()))
            finally:
                # A failure, or the worker being shut down: stop the batch still out. (A LIMIT
                # does not close the generator: Spark stops reading, and the worker ends at its
                # next write, so up to one more batch is sent than the plain UDF would.)
                for batch in in_flight:
                    batch.cancel()

        ai_query_batches.__doc__ = f"ai_query returning {return_type.simpleString()}, arguments {', '.join(layout)}"
        return arrow_udf(ai_query_batches, returnType=return_type).asNondeterministic()

    def ai_query(
        endpoint: pa.Array,
        request: pa.Array,
        returnType: pa.Array = None,  # type: ignore[assignment]  # noqa: N803 - SQL argument names
        failOnError: pa.Array = None,  # type: ignore[assignment]  # noqa: N803
        modelParameters: pa.Array = None,  # type: ignore[assignment]  # noqa: N803
        responseFormat: pa.Array = None,  # type: ignore[assignment]  # noqa: N803
        files: pa.Array = None,  # type: ignore[assignment]
    ) -> pa.Array:
        check_not_rewritten(spec, returnType, responseFormat)
        outcome = evaluate_batch(spec, registry, endpoint, request, failOnError, modelParameters, files)
        return _arrow_result(spec, arrow_type, outcome)

    ai_query.__doc__ = f"ai_query returning {return_type.simpleString()}"
    # Nondeterministic: otherwise the optimizer may inline the call once per use of its result
    # (``SELECT r.a, r.b FROM (SELECT ai_query(...) AS r)``) and pay for every row twice.
    return arrow_udf(ai_query, returnType=return_type).asNondeterministic()


__all__ = ["AUDIT_COLUMNS", "SIGNATURE", "PendingBatch", "UDFSpec", "build_udf", "decode_column", "evaluate_batch", "finish_batch",
           "start_batch", "start_task_rows"]
