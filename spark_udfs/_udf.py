"""The Arrow UDFs behind ``ai_query``: each Arrow batch goes to the process's shared client."""

from __future__ import annotations

import concurrent.futures
import json
import threading
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Iterator

import pyarrow as pa

from ai_query import AIQueryClient, ArgumentError, CallResult, EndpointRegistry, ModelParameters, RowFailedError, shared_client
from ai_query.backends import BatchContext
from ai_query._files import UnsupportedFileError, as_file_list, with_files
from ai_query._journal import JOURNAL_PROPERTY, ResponseJournal, request_key
from ai_query._progress import reporter_for

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


def _row_label(position: int) -> str:
    try:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        if ctx is not None:
            return f"row {position} of the Arrow batch in partition {ctx.partitionId()}"
    except Exception:  # noqa: BLE001 - only a label
        pass
    return f"row {position} of the batch"


def _batch_context() -> BatchContext | None:
    """What a backend may need to know of the running task: the GPUs Spark assigned to it."""
    try:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        if ctx is None:
            return None
        gpu = ctx.resources().get("gpu")
    except Exception:  # noqa: BLE001 - outside a task (tests, the driver): no context
        return None
    return BatchContext(gpu_ids=tuple(gpu.addresses) if gpu is not None else ())


def _task_journal() -> ResponseJournal | None:
    """The response journal a batch job asked for through a Spark local property (else none)."""
    try:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        return ResponseJournal.from_property(ctx.getLocalProperty(JOURNAL_PROPERTY)) if ctx is not None else None
    except Exception:  # noqa: BLE001 - outside a task (tests, the driver): no journal
        return None


class PendingRows:
    """Rows on their way to their endpoints; ``wait()`` returns each row's result at its position."""

    def __init__(self, results: list[CallResult | None], reporter: Any) -> None:
        self.results = results
        self.reporter = reporter
        self.rounds: list[tuple[concurrent.futures.Future[list[list[CallResult]]], list[list[int]]]] = []
        self.copies: list[tuple[int, int]] = []  # (duplicate row, the row whose request is sent)
        self.earlier: list[tuple[int, CallResult]] = []  # (duplicate row, the answer an earlier batch got)
        self.waiting: list[tuple[int, concurrent.futures.Future[CallResult]]] = []  # (row, an answer still in flight)

    def cancel(self) -> None:
        """Stop the rows still in flight (the consumer went away, e.g. a ``LIMIT`` was reached)."""
        for future, _ in self.rounds:
            future.cancel()

    def wait(self) -> list[CallResult]:
        results = self.results
        try:
            for future, rows_of_batches in self.rounds:
                for rows, sent in zip(rows_of_batches, future.result()):
                    for i, result in zip(rows, sent):
                        result.index = i
                        results[i] = result
        except BaseException:
            self.cancel()
            raise
        for i, answer in self.waiting:  # sent by an earlier batch of this stage, answered since
            results[i] = _copy_of(answer.result(), i)
        for i, source in self.copies:
            original = results[source]
            assert original is not None
            results[i] = _copy_of(original, i)
        reporter = self.reporter
        if reporter is not None:
            for i, _ in self.copies:
                reporter.add(results[i].ok, 0, None, None, deduplicated=True)  # type: ignore[union-attr]
            for _, hit in self.earlier:
                reporter.add(hit.ok, 0, None, None, deduplicated=True)
            for i, _ in self.waiting:
                reporter.add(results[i].ok, 0, None, None, deduplicated=True)  # type: ignore[union-attr]
            reporter.flush()
        if any(r is None for r in results):  # every row exactly once: a gap is a bug, never silent
            missing = [i for i, r in enumerate(results) if r is None]
            raise RuntimeError(f"internal error: rows {missing[:10]} got no result; please report this")
        return results  # type: ignore[return-value]


def start_rows(
    client: AIQueryClient,
    progress_address: tuple[str, int] | None,
    endpoints: list[Any],
    requests: list[Any],
    params: list[Any],
    response_formats: list[Any],
    journal: ResponseJournal | None = None,
    answers: _StageAnswers | None = None,
) -> PendingRows:
    """Start sending each row to its endpoint (rows grouped by endpoint, parameters and response format).

    Returns at once (``.wait()`` for the results); the rows queue behind those started earlier in this process, so a caller may
    start its next Arrow batch before waiting for this one. Every row comes back exactly once, at
    its own position; a gap is an internal error. With a response journal (a batch job's), a
    request answered before a kill is answered from it, and every new answer is journaled as it
    arrives, before the row is used. An identical request already sent in this stage (answered
    or still in flight; ``answers``, by default this Spark stage's) is not sent again: the row
    shares that answer.
    """
    n = len(requests)
    reporter = reporter_for(progress_address)
    journal = journal if journal is not None else _task_journal()
    groups: dict[tuple[Any, str, str], list[int]] = {}
    group_key: tuple[Any, str, str] | None = None
    for i in range(n):
        # Rows mostly repeat the row before (a literal parameter column): compare, do not re-encode.
        if group_key is None or endpoints[i] != endpoints[i - 1] or params[i] != params[i - 1] \
                or response_formats[i] != response_formats[i - 1]:
            group_key = (endpoints[i], json.dumps(params[i], sort_keys=True, default=str),
                         json.dumps(response_formats[i], sort_keys=True))
        groups.setdefault(group_key, []).append(i)

    pending = PendingRows([None] * n, reporter)
    cache = answers if answers is not None else _answers_of_this_stage()
    reserved: dict[int, tuple[tuple[Any, ...], concurrent.futures.Future[CallResult]]] = {}
    try:
        return _start_groups(client, pending, cache, reserved, groups, requests, params, response_formats, journal)
    except BaseException as exc:
        # Nothing will answer the requests this batch marked as in flight: release them, so a
        # retried task of this stage in this worker sends them instead of waiting forever.
        pending.cancel()
        for key, answer in reserved.values():
            cache.abandon(key, answer, exc)
        raise


def _start_groups(
    client: AIQueryClient,
    pending: PendingRows,
    cache: _StageAnswers,
    reserved: dict[int, tuple[tuple[Any, ...], concurrent.futures.Future[CallResult]]],
    groups: dict[tuple[Any, str, str], list[int]],
    requests: list[Any],
    params: list[Any],
    response_formats: list[Any],
    journal: ResponseJournal | None,
) -> PendingRows:
    results, reporter = pending.results, pending.reporter
    batches, batch_rows = [], []
    journal_keys: dict[int, str] = {}
    for group, rows in groups.items():
        name = group[0]
        if name is None:
            for i in rows:
                results[i] = CallResult(i, "", "error", error="the endpoint argument is NULL")
            continue
        # Dedup: an identical (endpoint, request, parameters) is sent once in a query; its copies
        # share the answer (rows of this batch, or an earlier batch of the query in this worker).
        dedup = client.endpoint(name).config.client_config.deduplicate
        first_of: dict[str, int] = {}
        unique = []
        sent_keys: dict[int, tuple[Any, ...]] = {}
        for i in rows:
            key = requests[i] if isinstance(requests[i], str) else json.dumps(requests[i], sort_keys=True, default=str)
            if dedup and requests[i] is not None and key in first_of:
                pending.copies.append((i, first_of[key]))
            elif dedup and requests[i] is not None and (hit := cache.get((*group, key))) is not None:
                first_of[key] = i
                if isinstance(hit, CallResult):
                    pending.earlier.append((i, hit))
                    results[i] = _copy_of(hit, i)
                else:
                    pending.waiting.append((i, hit))
            else:
                first_of[key] = i
                unique.append(i)
                if dedup and requests[i] is not None:
                    sent_keys[i] = (*group, key)
        if journal is not None:  # answered before the job was killed: take it from the journal
            to_send = []
            for i in unique:
                journal_keys[i] = request_key(name, requests[i], params[i], response_formats[i])
                replayed = journal.lookup(journal_keys[i])
                if replayed is None:
                    to_send.append(i)
                    continue
                replayed.index = i
                results[i] = replayed
                if reporter is not None:
                    reporter.add(replayed.ok, replayed.total_tokens, None, None)
                if i in sent_keys and (answer := cache.reserve(sent_keys[i])) is not None:
                    # later batches of the stage share it, as they shared the answer before the kill
                    cache.settle(sent_keys[i], answer, replayed)
            unique = to_send
        for i in unique:
            if i in sent_keys and (answer := cache.reserve(sent_keys[i])) is not None:
                reserved[i] = (sent_keys[i], answer)
        if unique:
            batches.append((name, [requests[i] for i in unique], ModelParameters.from_mapping(params[unique[0]]),
                            response_formats[unique[0]]))
            batch_rows.append(unique)

    # submit_many reports a result by endpoint name: one round per set of batches with distinct
    # names (usually one), so that a journaled answer is filed under its own row's request.
    rounds: list[list[int]] = []
    for b, batch in enumerate(batches):
        target = next((r for r in rounds if all(batches[o][0] != batch[0] for o in r)), None)
        if target is None:
            rounds.append([b])
        else:
            target.append(b)
    for round_ in rounds:
        row_of = {batches[b][0]: batch_rows[b] for b in round_}

        def on_result(name: str, r: CallResult, row_of: dict[str, list[int]] = row_of) -> None:
            i = row_of[name][r.index]
            if journal is not None:
                journal.record(journal_keys[i], r)
            if reporter is not None:
                reporter.add(r.ok, r.total_tokens, name, client.endpoint(name).limiter.limit)
            if i in reserved:
                cache.settle(*reserved[i], r)

        future = client.submit_many([batches[b] for b in round_], on_result=on_result, context=_batch_context())
        rows_of_round = [batch_rows[b] for b in round_]
        if reserved:
            # A row that never got its answer (a systemic failure, a cancel) releases its request:
            # rows of later batches waiting for it fail the same way instead of waiting forever.
            def release(f: concurrent.futures.Future[Any], rows_of_round: list[list[int]] = rows_of_round) -> None:
                why = concurrent.futures.CancelledError() if f.cancelled() else f.exception()
                if why is None:
                    why = RuntimeError("internal error: a row got no answer; please report this")
                for rows in rows_of_round:
                    for i in rows:
                        if i in reserved:
                            cache.abandon(*reserved[i], why)

            future.add_done_callback(release)
        pending.rounds.append((future, rows_of_round))
    return pending


def _copy_of(original: CallResult, i: int) -> CallResult:
    """Row ``i``'s result when its request was sent for another row: the same answer, no cost.

    Its tokens stay with the row that was sent, so the token totals of a table still equal what
    the endpoint served.
    """
    return replace(original, index=i, prompt_tokens=0, completion_tokens=0, total_tokens=0,
                   cost_usd=0.0 if original.cost_usd is not None else None, attempts=0, deduplicated=True)


class _StageAnswers:
    """Requests already sent in this Spark stage (one query's evaluation) by this Python worker.

    Each holds its answer, or while it is in flight a future of it: a later Arrow batch of the
    stage (started while an earlier one is still out) shares the answer instead of sending again.
    """

    def __init__(self, limit: int = 200_000) -> None:
        self.limit = limit
        self._answers: dict[tuple[Any, ...], CallResult | concurrent.futures.Future[CallResult]] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple[Any, ...]) -> CallResult | concurrent.futures.Future[CallResult] | None:
        return self._answers.get(key)

    def reserve(self, key: tuple[Any, ...]) -> concurrent.futures.Future[CallResult] | None:
        """Mark ``key`` as in flight; ``None`` past the memory bound (then there is no dedup)."""
        with self._lock:
            if len(self._answers) >= self.limit:  # a bound on memory, not an eviction policy
                return None
            answer: concurrent.futures.Future[CallResult] = concurrent.futures.Future()
            self._answers[key] = answer
            return answer

    def settle(self, key: tuple[Any, ...], answer: concurrent.futures.Future[CallResult], result: CallResult) -> None:
        """The answer arrived: rows waiting share it; an ``ok`` one answers later batches too."""
        with self._lock:
            if answer.done():
                return
            kept = replace(result)  # a copy: the row's own result is changed later (its index, a conversion error)
            if self._answers.get(key) is answer:
                if result.ok:
                    self._answers[key] = kept
                else:
                    del self._answers[key]  # a failed request is sent again by a later batch
            answer.set_result(kept)  # rows waiting make their own copies of it

    def abandon(self, key: tuple[Any, ...], answer: concurrent.futures.Future[CallResult], why: BaseException) -> None:
        """No answer will come (the batch failed or was cancelled)."""
        with self._lock:
            if answer.done():
                return
            if self._answers.get(key) is answer:
                del self._answers[key]
            answer.set_exception(why)


_STAGES: dict[int, _StageAnswers] = {}
_STAGE_LOCK = threading.Lock()


def _answers_of_this_stage() -> _StageAnswers:
    """This stage's answers (the last 4 stages are kept); outside a Spark task, a fresh empty cache."""
    try:
        from pyspark import TaskContext

        ctx = TaskContext.get()
    except Exception:  # noqa: BLE001 - no Spark here
        ctx = None
    if ctx is None:
        return _StageAnswers()
    key = ctx.stageId()  # unique in the SparkContext; a retried stage may reuse its answers
    with _STAGE_LOCK:
        answers = _STAGES.get(key)
        if answers is None:
            while len(_STAGES) >= 4:
                _STAGES.pop(next(iter(_STAGES)))
            answers = _STAGES[key] = _StageAnswers()
        return answers


@dataclass
class PendingBatch:
    """One Arrow batch on its way (``start_batch``); ``finish_batch`` waits and types the answers."""

    spec: UDFSpec
    endpoint: pa.Array
    requests: list[Any]
    fails: list[Any]
    file_errors: dict[int, str]
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
    requests = request.to_pylist()
    file_errors: dict[int, str] = {}
    if files is not None:
        for i, row_files in enumerate(files.to_pylist()):
            try:
                requests[i] = with_files(requests[i], as_file_list(row_files))
            except UnsupportedFileError as exc:
                file_errors[i] = str(exc)
                endpoints[i] = None  # not sent: the row's error is its file
    params_col = _column(model_parameters, n)
    fails = _column(fail_on_error, n)
    if not spec.with_error and not spec.audit and any(f is False for f in fails):
        raise ArgumentError(
            "failOnError => false returns STRUCT<response, errorMessage>, which this plain ai_query UDF cannot: "
            "run the statement through spark.sql after spark_udfs.register(spark) (it rewrites the call), "
            "or spark_udfs.sql(spark, query)"
        )
    response_format = json.loads(spec.response_format_json) if spec.response_format_json else None
    client = shared_client(registry, spec.quota_broker, spec.quota_share)
    rows = start_rows(client, spec.progress_address, endpoints, requests, params_col, [response_format] * n)
    return PendingBatch(spec, endpoint, requests, fails, file_errors, rows)


def finish_batch(batch: PendingBatch) -> tuple[list[CallResult], list[Any], list[str | None]]:
    """Wait for the batch; return per-row results, typed values, and row errors (conversion included)."""
    spec, requests, fails = batch.spec, batch.requests, batch.fails
    results = batch.rows.wait()
    for i, error in batch.file_errors.items():
        results[i] = replace(results[i], endpoint=batch.endpoint[i].as_py() or "", error=error)

    value_type = spec.value_type()
    values: list[Any] = []
    errors: list[str | None] = []
    for result in results:
        if not result.ok:
            values.append(None)
            errors.append(result.error)
            continue
        try:
            values.append(convert(result.value, value_type))
            errors.append(None)
        except (ValueError, TypeError, ArithmeticError) as exc:
            values.append(None)
            errors.append(f"could not read the response as {value_type.simpleString().upper()}: {exc}")
            result.status = "error"
            result.error = errors[-1]
    if not spec.with_error and not spec.audit:
        for position, (result, error) in enumerate(zip(results, errors)):
            if error is not None and fails[position] is not False:
                preview = str(requests[position])[:60]
                raise RowFailedError(
                    f"ai_query({result.endpoint!r}) failed for {_row_label(position)} (request {preview!r}): {error}. "
                    "Use failOnError => false to get the error per row instead of failing the query."
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
            }
            for r, value, error in zip(results, values, errors)
        ]
        return pa.array(rows, type=arrow_type)
    if spec.with_error:
        return pa.array([{"response": v, "errorMessage": e} for v, e in zip(values, errors)], type=arrow_type)
    return pa.array(values, type=arrow_type)


def build_udf(spec: UDFSpec, registry: EndpointRegistry):
    """An ``arrow_udf`` with ``ai_query``'s signature and ``spec``'s return type.

    With ``spec.arguments`` it is an iterator UDF taking those arguments by position: it starts
    each Arrow batch while the one before is still in flight, so the endpoint does not idle
    while a batch's last rows finish and Spark hands over the next (Spark passes no named
    arguments to iterator UDFs; the SQL rewrite writes the call positionally).
    """
    from pyspark.sql.functions import arrow_udf
    from pyspark.sql.pandas.types import to_arrow_type

    return_type = spec.return_type()
    arrow_type = to_arrow_type(return_type, timezone="UTC")

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
        outcome = evaluate_batch(spec, registry, endpoint, request, failOnError, modelParameters, files)
        return _arrow_result(spec, arrow_type, outcome)

    ai_query.__doc__ = f"ai_query returning {return_type.simpleString()}"
    # Nondeterministic: otherwise the optimizer may inline the call once per use of its result
    # (``SELECT r.a, r.b FROM (SELECT ai_query(...) AS r)``) and pay for every row twice.
    return arrow_udf(ai_query, returnType=return_type).asNondeterministic()


__all__ = ["AUDIT_COLUMNS", "SIGNATURE", "PendingBatch", "PendingRows", "UDFSpec", "build_udf", "evaluate_batch",
           "finish_batch", "start_batch", "start_rows"]
