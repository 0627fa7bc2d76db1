"""The Arrow UDFs behind ``ai_query``: each Arrow batch goes to the process's shared client."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, replace
from typing import Any, Callable

import pyarrow as pa

from ai_query import AIQueryClient, ArgumentError, CallResult, EndpointRegistry, ModelParameters, RowFailedError, shared_client
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


def _task_journal() -> ResponseJournal | None:
    """The response journal a batch job asked for through a Spark local property (else none)."""
    try:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        return ResponseJournal.from_property(ctx.getLocalProperty(JOURNAL_PROPERTY)) if ctx is not None else None
    except Exception:  # noqa: BLE001 - outside a task (tests, the driver): no journal
        return None


def send_rows(
    client: AIQueryClient,
    progress_address: tuple[str, int] | None,
    endpoints: list[Any],
    requests: list[Any],
    params: list[Any],
    response_formats: list[Any],
    journal: ResponseJournal | None = None,
) -> list[CallResult]:
    """Send each row to its endpoint (rows grouped by endpoint, parameters and response format).

    Every row comes back exactly once, at its own position; a gap is an internal error. With a
    response journal (a batch job's), a request answered before a kill is answered from it, and
    every new answer is journaled as it arrives, before the row is used.
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

    results: list[CallResult | None] = [None] * n
    batches, batch_rows = [], []
    copies: list[tuple[int, int]] = []  # (duplicate row, the row whose request is sent)
    earlier: list[tuple[int, CallResult]] = []  # (duplicate row, the answer an earlier batch got)
    cache = _answers_of_this_stage()
    sent_keys: dict[int, tuple[Any, ...]] = {}
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
        for i in rows:
            key = requests[i] if isinstance(requests[i], str) else json.dumps(requests[i], sort_keys=True, default=str)
            if dedup and requests[i] is not None and key in first_of:
                copies.append((i, first_of[key]))
            elif dedup and requests[i] is not None and (hit := cache.get((*group, key))) is not None:
                earlier.append((i, hit))
                first_of[key] = i
                results[i] = _copy_of(hit, i)
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
            unique = to_send
        if unique:
            batches.append((name, [requests[i] for i in unique], ModelParameters.from_mapping(params[unique[0]]),
                            response_formats[unique[0]]))
            batch_rows.append(unique)

    # map_many reports a result by endpoint name: one round per set of batches with distinct names
    # (usually one), so that a journaled answer is filed under its own row's request.
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
            if journal is not None:
                journal.record(journal_keys[row_of[name][r.index]], r)
            if reporter is not None:
                reporter.add(r.ok, r.total_tokens, name, client.endpoint(name).limiter.limit)

        callback = on_result if (journal is not None or reporter is not None) else None
        sent_batches = client.map_many([batches[b] for b in round_], on_result=callback)
        for b, sent in zip(round_, sent_batches):
            for i, result in zip(batch_rows[b], sent):
                result.index = i
                results[i] = result
                if result.ok and i in sent_keys:
                    cache.put(sent_keys[i], result)
    for i, source in copies:
        original = results[source]
        assert original is not None
        results[i] = _copy_of(original, i)
    if reporter is not None:
        for i, _ in copies:
            reporter.add(results[i].ok, 0, None, None, deduplicated=True)  # type: ignore[union-attr]
        for i, hit in earlier:
            reporter.add(hit.ok, 0, None, None, deduplicated=True)
        reporter.flush()
    if any(r is None for r in results):  # every row exactly once: a gap is a bug, never silent
        missing = [i for i, r in enumerate(results) if r is None]
        raise RuntimeError(f"internal error: rows {missing[:10]} got no result; please report this")
    return results  # type: ignore[return-value]


def _copy_of(original: CallResult, i: int) -> CallResult:
    """Row ``i``'s result when its request was sent for another row: the same answer, no cost.

    Its tokens stay with the row that was sent, so the token totals of a table still equal what
    the endpoint served.
    """
    return replace(original, index=i, prompt_tokens=0, completion_tokens=0, total_tokens=0,
                   cost_usd=0.0 if original.cost_usd is not None else None, attempts=0, deduplicated=True)


class _StageAnswers:
    """Answers already received in this Spark stage (one query's evaluation) by this Python worker."""

    def __init__(self, limit: int = 200_000) -> None:
        self.limit = limit
        self._answers: dict[tuple[Any, ...], CallResult] = {}

    def get(self, key: tuple[Any, ...]) -> CallResult | None:
        return self._answers.get(key)

    def put(self, key: tuple[Any, ...], result: CallResult) -> None:
        if len(self._answers) < self.limit:  # a bound on memory, not an eviction policy: past it, no dedup
            self._answers[key] = result


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


def evaluate_batch(
    spec: UDFSpec,
    registry: EndpointRegistry,
    endpoint: pa.Array,
    request: pa.Array,
    fail_on_error: pa.Array | None,
    model_parameters: pa.Array | None,
    files: pa.Array | None = None,
) -> tuple[list[CallResult], list[Any], list[str | None]]:
    """Send the batch; return per-row results, typed values, and row errors (conversion included)."""
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
    results = send_rows(client, spec.progress_address, endpoints, requests, params_col, [response_format] * n)
    for i, error in file_errors.items():
        results[i] = replace(results[i], endpoint=endpoint[i].as_py() or "", error=error)

    value_type = spec.value_type()
    values: list[Any] = []
    errors: list[str | None] = []
    for result in results:  # type: ignore[union-attr]
        assert result is not None
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
                assert result is not None
                preview = str(requests[position])[:60]
                raise RowFailedError(
                    f"ai_query({result.endpoint!r}) failed for {_row_label(position)} (request {preview!r}): {error}. "
                    "Use failOnError => false to get the error per row instead of failing the query."
                )
    return results, values, errors  # type: ignore[return-value]


def build_udf(spec: UDFSpec, registry: EndpointRegistry):
    """An ``arrow_udf`` with ``ai_query``'s signature and ``spec``'s return type."""
    from pyspark.sql.functions import arrow_udf
    from pyspark.sql.pandas.types import to_arrow_type

    return_type = spec.return_type()
    arrow_type = to_arrow_type(return_type, timezone="UTC")

    def ai_query(
        endpoint: pa.Array,
        request: pa.Array,
        returnType: pa.Array = None,  # type: ignore[assignment]  # noqa: N803 - SQL argument names
        failOnError: pa.Array = None,  # type: ignore[assignment]  # noqa: N803
        modelParameters: pa.Array = None,  # type: ignore[assignment]  # noqa: N803
        responseFormat: pa.Array = None,  # type: ignore[assignment]  # noqa: N803
        files: pa.Array = None,  # type: ignore[assignment]
    ) -> pa.Array:
        results, values, errors = evaluate_batch(spec, registry, endpoint, request, failOnError, modelParameters, files)
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

    ai_query.__doc__ = f"ai_query returning {return_type.simpleString()}"
    # Nondeterministic: otherwise the optimizer may inline the call once per use of its result
    # (``SELECT r.a, r.b FROM (SELECT ai_query(...) AS r)``) and pay for every row twice.
    return arrow_udf(ai_query, returnType=return_type).asNondeterministic()


__all__ = ["AUDIT_COLUMNS", "SIGNATURE", "UDFSpec", "build_udf", "evaluate_batch"]
