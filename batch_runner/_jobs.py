"""Incremental, resumable job runs: pending rows in chunks, one idempotent Delta commit per chunk.

A run of a job with a ``key`` and output mode ``merge`` or ``append``:

0. **preflight** (``_preflight``): paths writable, secrets set, one input row per key, before any
   request; each chunk also checks that the query returns one row per key before it is sent;
   then the run takes the job's lock (``_job_lock``): a second run of the job meanwhile stops;
1. **recover**: usage rows staged by a run killed between its commits are committed now (or
   dropped when their output never landed);
2. **pending**: rows of the input whose key is not in the output (with ``retry_failed``, also
   rows whose status is ``error``), ordered by key, at most ``max_rows``;
3. **chunks** of ``chunk_rows``: the input view is narrowed to the chunk's keys, the job's query
   runs with audit columns, every answer is journaled on the executor as it arrives
   (``ai_query.batch.journal``), and the driver then commits, each with app transaction
   (``ai-query:<job>``, ``v``): the chunk's usage rows (``endpoint_usage``) and, optionally, its
   payload rows, then the output (merge by key, or append): ``_job_commit`` says why the pair is
   exactly once;
4. **budget**: after each chunk the run's cost and tokens are checked against ``max_cost_usd`` /
   ``max_tokens``; chunks shrink as the budget runs out, and the run stops once it is spent.

Killed at any point, a re-run loses and duplicates nothing: committed chunks are skipped (their
keys are in the output, their versions in the tables' transaction logs), staged usage is
committed exactly once, and answers received before the kill come from the journal, not the
endpoint, so the usage table's tokens equal what the endpoint served.

This module is the run itself (chunks, budget); beside it: ``_job_input`` (endpoints, sources,
pending keys), ``_job_commit`` (a chunk's commits, usage staging), ``_job_state`` (the run
report, the run log, ``job_status``).
"""

from __future__ import annotations

import contextvars
import copy
import dataclasses
import math
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from typing import IO, TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

import spark_udfs
from ai_query import get_logger
from ai_query import ConfigError, ProgressCollector
from ai_query import storage
from ai_query.batch import JOURNAL_PROPERTY, ResponseJournal
from ai_query.batch.provider_batches import ONLINE_ONLY_PROPERTY

from ._batch_mode import batch_ids_by_request, forget_batches, run_batch_phase, with_batch_ids
from ._job_commit import ReplayedAnswers, UsageStaging, commit_output, next_chunk_version, usage_rows
from ._job_lock import RunLock
from ._job_input import _INPUT_ALIAS, key_states, open_job, pending_keys, pending_rows, request_query, rows_of_keys, with_committed
from ._job_state import JobRunReport, journal_dirs, log_run
from ._preflight import duplicate_keys_message, job_priced, preflight_job
from ._runner import _ProgressDisplay, flatten_audit
from ._spec import JobSpec

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = get_logger("batch_runner")


def _require_classic(spark: "SparkSession", what: str) -> None:
    """Incremental jobs hand tasks their response journal through a Spark local property, which a
    Spark Connect client cannot set (no SparkContext on its side)."""
    if spark_udfs.is_connect(spark):
        raise ConfigError(
            f"{what} is incremental (key = [...]) and needs a classic SparkSession: its tasks find the response "
            "journal through a Spark local property, which a Spark Connect session cannot set; run it with "
            "`ai-query run` (a classic session on the cluster's master) or drop key = [...] for a one-shot job"
        )


def _budget_check(spec: JobSpec, report: JobRunReport) -> str | None:
    if spec.max_cost_usd is not None and (report.cost_usd or 0.0) >= spec.max_cost_usd:
        return f"options.max_cost_usd = {spec.max_cost_usd:g} reached ({report.cost_usd:.4f} USD spent by this run)"
    if spec.max_tokens is not None and report.total_tokens >= spec.max_tokens:
        return f"options.max_tokens = {spec.max_tokens} reached ({report.total_tokens} tokens used by this run)"
    return None


def _next_chunk_size(spec: JobSpec, report: JobRunReport) -> int:
    """``chunk_rows``, smaller as the budget runs out (so that a run stops close to it, not a chunk past it)."""
    size = spec.chunk_rows
    budgeted = spec.max_cost_usd is not None or spec.max_tokens is not None
    if not budgeted:
        return size
    if report.rows == 0:
        return max(1, min(size, max(10, size // 10)))  # learn what a row costs on a small first chunk
    if spec.max_cost_usd is not None and report.cost_usd:
        per_row = report.cost_usd / report.rows
        size = min(size, math.ceil((spec.max_cost_usd - report.cost_usd) / per_row))
    if spec.max_tokens is not None and report.total_tokens:
        per_row_tokens = report.total_tokens / report.rows
        size = min(size, math.ceil((spec.max_tokens - report.total_tokens) / per_row_tokens))
    return max(1, size)


def run_incremental(
    spec: JobSpec,
    spark: "SparkSession",
    *,
    retry_failed: bool = False,
    limit: int | None = None,
    stream: IO[str] | None = None,
    progress: bool = True,
) -> JobRunReport:
    """Process the job's pending rows in chunks; see the module docstring."""
    if not spec.incremental:
        raise ConfigError(f"job {spec.name!r} is not incremental: it needs key = [...] and output.mode 'merge' or 'append'")
    _require_classic(spark, f"job {spec.name!r}")
    started = time.monotonic()
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    preflight_job(spec, probe=False)  # `ai-query run` probed the endpoints already
    # one run of a job at a time (_job_lock); each table's log read once per run, not once per chunk and commit
    with RunLock.acquire(spec, run_id) as lock, storage.reuse_delta_tables():
        return _run_incremental(spec, spark, run_id, started, lock, retry_failed=retry_failed, limit=limit, stream=stream,
                                progress=progress)


def _run_incremental(spec: JobSpec, spark: "SparkSession", run_id: str, started: float, lock: RunLock, *,
                     retry_failed: bool, limit: int | None, stream: IO[str] | None, progress: bool) -> JobRunReport:
    stream = stream or sys.stderr
    report = JobRunReport(spec.name, spec.output_path, spec.usage_table, run_id, cost_usd=0.0 if job_priced(spec) else None)
    input_df = open_job(spec, spark)
    staging = UsageStaging(spec)
    report.recovered_chunks = staging.recover()

    caps = [n for n in (limit, spec.max_rows) if n is not None]
    states = key_states(spec)  # the output's keys, read once: the run's end adds what it committed
    keys = pending_keys(spark, spec, input_df, retry_failed=retry_failed, limit=min(caps) if caps else None, states=states)
    report.pending_before = keys.num_rows
    log.info("job %s: %d pending rows (%.1f s)", spec.name, keys.num_rows, time.monotonic() - started)
    log_run(spec, {"run_id": run_id, "started": datetime.now(timezone.utc).isoformat(), "pending": keys.num_rows,
                    "retry_failed": retry_failed, "status": "running", "batch_api": spec.batch_api is not None})
    # batch mode vs online: in batch mode the pending rows' answers are journaled from provider
    # batches first (``_batch_mode``); the chunks below then answer them from the journal.
    batch_ids = None
    if spec.batch_api is not None and keys.num_rows:
        report.batch_phase = run_batch_phase(spark, spec, input_df, keys, started)
        batch_ids = batch_ids_by_request(spec)
    journal_root = storage.join(spec.state_path, "journal")
    earlier_journals = journal_dirs(spec)
    replayed = ReplayedAnswers(spec, earlier_journals)
    journal = ResponseJournal.property_value(storage.join(journal_root, f"run-{run_id}"), earlier_journals)
    names = list(spec.key)
    req_sql, _ = request_query(spark, spec)
    sc = spark.sparkContext

    collector = ProgressCollector(host=spark_udfs.services_host(spark) or "127.0.0.1")
    spark_udfs.set_progress_address(spark, collector.address)
    display = _ProgressDisplay(collector, keys.num_rows, spec.name, stream) if progress and keys.num_rows else None
    offset = 0
    status = "finished"
    commits = _ChunkCommits(report, names)
    # more than one chunk: the sources are read once, the pending rows kept for the chunks
    rows_df = pending_rows(spark, input_df, keys, names) if keys.num_rows > spec.chunk_rows else input_df
    try:
        if display:
            display.__enter__()
        sc.setLocalProperty(JOURNAL_PROPERTY, journal)
        if spec.batch_api is not None:  # the batch phase sent what batches should: the chunks go online
            sc.setLocalProperty(ONLINE_ONLY_PROPERTY, "1")
        version = next_chunk_version(spec) - 1  # this run is the job's one writer: later versions follow in memory
        while offset < keys.num_rows:
            lock.check()  # another run took the job over (this one was paused past its lease): stop
            projected = commits.projected()  # with the chunk still committing: it was paid
            stop = _budget_check(spec, projected)
            if stop:
                report.stopped = stop
                status = "budget"
                break
            size = _next_chunk_size(spec, projected)
            chunk_keys = keys.slice(offset, size)
            version += 1
            _run_chunk(spark, spec, rows_df, chunk_keys, names, req_sql, staging, version, run_id, commits, replayed, batch_ids)
            offset += chunk_keys.num_rows
        commits.wait()
    except BaseException:
        status = "failed"
        raise
    finally:
        commits.close()  # after an error: a chunk still committing lands (or fails, logged) before the run is recorded
        if rows_df is not input_df:
            rows_df.unpersist()
        sc.setLocalProperty(JOURNAL_PROPERTY, None)
        sc.setLocalProperty(ONLINE_ONLY_PROPERTY, None)
        if display:
            display.__exit__(None, None, None)
        spark_udfs.set_progress_address(spark, None)
        collector.close()
        spark.table(_INPUT_ALIAS).createOrReplaceTempView(spec.driving_view)
        report.seconds = time.monotonic() - started
        report.pending_after = keys.num_rows - offset if status != "finished" or offset < keys.num_rows else 0
        if status == "finished" and report.pending_after == 0 and limit is None and spec.max_rows is None:
            storage.remove_tree(journal_root)  # every journaled answer is committed
            forget_batches(spec)
        elif status != "failed":
            storage.remove_tree(storage.join(journal_root, f"run-{run_id}"))  # this run's answers are committed
        log_run(spec, {"run_id": run_id, "finished": datetime.now(timezone.utc).isoformat(), "status": status,
                        "rows": report.rows, "ok": report.rows_ok, "failed": report.rows_failed,
                        "prompt_tokens": report.prompt_tokens, "completion_tokens": report.completion_tokens,
                        "cost_usd": report.cost_usd, "chunks": report.chunks, "seconds": round(report.seconds, 3),
                        "pending_after": report.pending_after, "stopped": report.stopped,
                        "per_endpoint": report.per_endpoint})
    if report.stopped:
        report.stopped += (
            f"; committed {report.rows} of {report.pending_before} pending rows in {report.chunks} chunk(s), "
            f"{report.pending_after} stay pending. To continue, run the job again (it resumes where it stopped), "
            "or raise the limit in [options]"
        )
    try:
        states = with_committed(states, commits.committed_keys, names)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):  # key types the output changed: read it
        states = key_states(spec)
    report.table_rows = states.num_rows
    report.table_failed = states.num_rows - (pc.sum(states.column("ok")).as_py() or 0) if states.num_rows else 0
    return report


def _run_chunk(spark: "SparkSession", spec: JobSpec, input_df: "DataFrame", chunk_keys: pa.Table, names: list[str],
               req_sql: str, staging: UsageStaging, version: int, run_id: str, commits: "_ChunkCommits",
               replayed: ReplayedAnswers, batch_ids: dict[str, str] | None = None) -> None:
    # The chunk's input rows come to the driver once and go back as a local relation: the model
    # query and the request-text query then read it without scanning the sources again, and Spark
    # spreads a local relation over all its cores (a scan would give one task per source file).
    rows = rows_of_keys(spark, input_df, chunk_keys, names).toArrow()
    spark.createDataFrame(rows, schema=input_df.schema).createOrReplaceTempView(spec.driving_view)
    # the request text of each row, without the model call: also finds a query (a join) that
    # makes several rows of one key before any of them is sent
    request_rows = spark_udfs.sql(spark, req_sql).toArrow()
    missing = [k for k in names if k not in request_rows.column_names]
    if missing:
        raise ConfigError(f"key column(s) {', '.join(missing)} are not in the query's result "
                          f"({', '.join(request_rows.column_names)}); select them in the query")
    repeated = duplicate_keys_message(spec, request_rows.select(names), "as the job's query returns it")
    if repeated:
        raise ConfigError(repeated.replace("remove the duplicates from the input", "fix the query (e.g. its joins)"))
    df = spark_udfs.sql(spark, spec.query, audit=True)
    out_df, response_column = flatten_audit(df)
    result = out_df.toArrow()
    keys_seen = result.select(names).group_by(names).aggregate([([], "count_all")])
    if keys_seen.num_rows != result.num_rows:
        raise ConfigError(f"the query returns several rows for one key ({', '.join(names)}): a job writes one row per key; "
                          "fix key = [...] or the query (e.g. its joins)")
    result = replayed.zero_repeats(result)
    if batch_ids is not None:
        result = with_batch_ids(result, batch_ids)
    requests = {tuple(r[k] for k in names): r[response_column]
                for r in request_rows.select([*names, response_column]).to_pylist()}
    usage, payloads = usage_rows(spec, result, requests, response_column, run_id, version)

    def commit() -> None:  # usage first, output second: see _job_commit for why this is exactly once
        staging.commit_rows(version, usage, payloads, fresh=True)  # this run took the version: no table holds it
        commit_output(spec, result, version, fresh=True)
        log.info("job %s chunk v%d: %d rows committed", spec.name, version, result.num_rows)

    commits.submit(commit, result, usage)


def _tally(report: JobRunReport, result: pa.Table, usage: list[dict]) -> None:
    """Add a committed chunk (its output rows, its usage rows) to the run's report."""
    status = result.column("aiq_status")
    ok = pc.sum(pc.equal(status, "ok")).as_py() or 0
    report.chunks += 1
    report.rows += result.num_rows
    report.rows_ok += ok
    report.rows_failed += result.num_rows - ok
    if "aiq_deduplicated" in result.column_names:
        report.rows_deduplicated += pc.sum(result.column("aiq_deduplicated")).as_py() or 0
    for rec in usage:
        report.prompt_tokens += rec["input_token_count"]
        report.completion_tokens += rec["output_token_count"]
        e = report.per_endpoint.setdefault(rec["endpoint_name"], {"rows": 0, "attempts": 0, "tokens": 0, "cost": None, "by_status": {}})
        e["rows"] += 1  # one usage row per request sent; attempts - rows are its retries
        e["attempts"] += rec["attempts"] or 0
        status = str(rec.get("status_code") or "none")  # the serving /metrics' requests by status, per endpoint
        e["by_status"][status] = e["by_status"].get(status, 0) + 1
        e["tokens"] += rec["input_token_count"] + rec["output_token_count"]
        if rec["cost_usd"] is not None:
            e["cost"] = (e["cost"] or 0.0) + rec["cost_usd"]
            report.cost_usd = (report.cost_usd or 0.0) + rec["cost_usd"]


class _ChunkCommits:
    """A chunk's commits (usage, payloads, output) on one thread while the next chunk is answered.

    A chunk's commits are sequential store requests (the log listed, data files written, each
    commit put conditionally): on an object store ~20 round trips, a second or more a chunk on a
    real one, with the cluster idle. Here they overlap the next chunk's model calls. One chunk
    commits at a time, in chunk order (``submit`` waits for the one before); a chunk counts in the
    report once committed, and while it commits, budget decisions see it too (``projected``:
    it was paid). The first chunk commits before the second is asked, so a table that refuses
    the job's rows (a schema, a permission) stops the run after one chunk, as without overlap.
    A later failed commit is raised at the next ``submit`` or ``wait``: the run fails, and the
    answers of the chunk asked meanwhile are in the journal, so a re-run buys nothing again (the
    same as a kill at that moment).
    """

    def __init__(self, report: JobRunReport, names: list[str] | tuple[str, ...] = ()) -> None:
        self.report = report
        self.names = list(names)
        self.committed_keys: list[pa.Table] = []  # each committed chunk's key columns and aiq_status
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="aiq-commit")
        self._future: Future[None] | None = None
        self._pending: tuple[pa.Table, list[dict]] | None = None
        self._overlap = False  # from the second chunk on

    def projected(self) -> JobRunReport:
        """The report with the chunk still committing counted in."""
        with self._lock:
            if self._pending is None:
                return self.report
            view = dataclasses.replace(self.report, per_endpoint=copy.deepcopy(self.report.per_endpoint))
            _tally(view, *self._pending)
            return view

    def submit(self, commit: Callable[[], None], result: pa.Table, usage: list[dict]) -> None:
        self.wait()

        def run() -> None:
            try:
                commit()
                with self._lock:
                    _tally(self.report, result, usage)
                    self.committed_keys.append(result.select([*self.names, "aiq_status"]))
            finally:
                with self._lock:
                    self._pending = None

        with self._lock:
            self._pending = (result, usage)
        # the thread runs in a copy of this context: the run's Delta handles (storage.reuse_delta_tables)
        self._future = self._pool.submit(contextvars.copy_context().run, run)
        if not self._overlap:
            self.wait()
            self._overlap = True

    def wait(self) -> None:
        future, self._future = self._future, None
        if future is not None:
            future.result()

    def close(self) -> None:
        """Wait for a chunk still committing (a failure is logged: an error is already on its way) and stop."""
        try:
            self.wait()
        except Exception as exc:  # noqa: BLE001 - the run is failing already; this is its second error
            log.error("a chunk's commit failed as well (its keys stay pending): %s", exc)
        finally:
            self._pool.shutdown()


__all__ = ["run_incremental"]
