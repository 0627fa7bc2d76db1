"""Incremental, resumable job runs: pending rows in chunks, one idempotent Delta commit per chunk.

A run of a job with a ``key`` and output mode ``merge`` or ``append``:

1. **recover**: usage rows staged by a run killed between its output commit and its usage commit
   are committed now (or dropped when their output never landed);
2. **pending**: rows of the input whose key is not in the output (with ``retry_failed``, also
   rows whose status is ``error``), ordered by key, at most ``max_rows``;
3. **chunks** of ``chunk_rows``: the input view is narrowed to the chunk's keys, the job's query
   runs with audit columns, every answer is journaled on the executor as it arrives
   (``ai_query.batch.journal``), and the driver then commits, each with app transaction
   (``ai-query:<job>``, ``v``): the output (merge by key, or append), then the chunk's usage
   rows (``endpoint_usage``) and, optionally, its payload rows;
4. **budget**: after each chunk the run's cost and tokens are checked against ``max_cost_usd`` /
   ``max_tokens``; chunks shrink as the budget runs out, and the run stops once it is spent.

Killed at any point, a re-run loses and duplicates nothing: committed chunks are skipped (their
keys are in the output, their versions in the tables' transaction logs), staged usage is
committed exactly once, and answers received before the kill come from the journal, not the
endpoint, so the usage table's tokens equal what the endpoint served.
"""

from __future__ import annotations

import getpass
import json
import logging
import math
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

import spark_udfs
from ai_query import ConfigError, EndpointRegistry, ProgressCollector
from ai_query.batch import JOURNAL_PROPERTY, CallResult, ResponseJournal, read_entries
from ai_query._usage import INFERENCE_SCHEMA, USAGE_SCHEMA, DeltaAppender, inference_record, usage_record

from ._runner import _ProgressDisplay, explain_error, flatten_audit
from ._spec import JobSpec

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger("batch_runner")

_INPUT_ALIAS = "__aiq_input"


# --------------------------------------------------------------------------------------------
# the session: endpoints, sources, the input view


def job_registry(spec: JobSpec) -> EndpointRegistry:
    """The job's endpoints, with ``options.max_concurrency`` applied to their client configs."""
    registry = EndpointRegistry.default(spec.endpoints)
    caps = spec.max_concurrency
    if caps is None:
        return registry
    per_endpoint = caps if isinstance(caps, dict) else {ep.name: caps for ep in registry}
    unknown = sorted(set(per_endpoint) - set(registry.names()))
    if unknown:
        registry.get(unknown[0])  # raises, naming the known endpoints
    changed = []
    for name, cap in per_endpoint.items():
        ep = registry.get(name)
        client = ep.client_config.replace(max_concurrency=cap, initial_concurrency=min(cap, ep.client_config.initial_concurrency))
        changed.append(ep.replace(client_config=client))
    return registry.with_endpoints(changed)


def open_job(spec: JobSpec, spark: "SparkSession") -> "DataFrame":
    """Register ``ai_query`` with the job's endpoints and the source views; return the input rows."""
    spark_udfs.register(spark, job_registry(spec))
    for view, path in spec.sources.items():
        try:
            spark_udfs.read_delta(spark, path).createOrReplaceTempView(view)
        except Exception as exc:
            raise ConfigError(f"cannot read source {view!r} from {path}: {explain_error(exc)}; check [sources] in the job spec") from exc
    if spec.input_sql is not None:
        try:
            spark.sql(spec.input_sql).createOrReplaceTempView(spec.driving_view)
        except Exception as exc:
            raise ConfigError(f"input.sql fails: {explain_error(exc)}; fix the SELECT in [input]") from exc
    input_df = spark.table(spec.driving_view)
    input_df.createOrReplaceTempView(_INPUT_ALIAS)
    missing = [k for k in spec.key if k not in input_df.columns]
    if missing:
        raise ConfigError(
            f"key column(s) {', '.join(missing)} are not in the input view {spec.driving_view!r} "
            f"({', '.join(input_df.columns)}); fix key = [...] or [input]"
        )
    if spec.prompt is not None:
        from ._spec import template_parts

        absent = [c for kind, c in template_parts(spec.prompt["template"]) if kind == "column" and c not in input_df.columns]
        if absent:
            raise ConfigError(f"prompt.template uses column(s) {', '.join(absent)}, which {spec.driving_view!r} lacks; "
                              f"it has {', '.join(input_df.columns)}")
    return spark.table(_INPUT_ALIAS)


# --------------------------------------------------------------------------------------------
# what is done, what is pending


def _output_exists(spec: JobSpec) -> bool:
    from deltalake import DeltaTable

    return DeltaTable.is_deltatable(spec.output_path)


def key_states(spec: JobSpec) -> pa.Table:
    """One row per key in the output: its key columns and ``ok`` (any row of the key succeeded)."""
    from deltalake import DeltaTable

    names = list(spec.key)
    if not _output_exists(spec):
        return pa.table({**{k: pa.array([], pa.string()) for k in names}, "ok": pa.array([], pa.bool_())})
    table = DeltaTable(spec.output_path).to_pyarrow_table(columns=[*names, "aiq_status"])
    table = table.append_column("is_ok", pc.equal(table.column("aiq_status"), "ok"))
    grouped = table.group_by(names).aggregate([("is_ok", "max")])
    return grouped.rename_columns([*names, "ok"]).select([*names, "ok"])


def pending_keys(spark: "SparkSession", spec: JobSpec, input_df: "DataFrame", *, retry_failed: bool = False,
                 limit: int | None = None) -> pa.Table:
    """The keys still to do, ordered, at most ``limit``.

    Only the key columns travel to the driver, where the anti-join and the sort run in Arrow:
    a Spark shuffle costs more than the keys of millions of rows.
    """
    names = list(spec.key)
    keys = input_df.select(*names).toArrow()
    keys = keys.group_by(names).aggregate([])  # distinct
    states = key_states(spec)
    done = states.filter(states.column("ok")) if retry_failed else states
    if done.num_rows:
        done = done.select(names).cast(keys.schema)
        keys = keys.join(done, keys=names, join_type="left anti")
    keys = keys.sort_by([(n, "ascending") for n in names])
    if limit is not None:
        keys = keys.slice(0, limit)
    return keys.combine_chunks()


def rows_of_keys(spark: "SparkSession", input_df: "DataFrame", keys: pa.Table, names: list[str]) -> "DataFrame":
    """The input rows whose key is in ``keys``, with the input's columns in their order."""
    from pyspark.sql.functions import broadcast

    joined = input_df.join(broadcast(spark.createDataFrame(keys)), on=names, how="left_semi")
    return joined.select(*[f"`{c}`" for c in input_df.columns])


# --------------------------------------------------------------------------------------------
# the request text of each row (for usage character counts and the plan)


def request_query(spark: "SparkSession", spec: JobSpec) -> tuple[str, list[tuple[str, str | None]]]:
    """The job's query with its model call replaced by the call's request, and the calls' endpoints.

    Returns (SQL, [(column alias unknown: the SQL keeps the alias), endpoint or None]) where the
    SQL's result has the same columns as the job's output, the answer column holding the request.
    """
    from spark_udfs._rewrite import bind_arguments, find_calls
    from spark_udfs._tasks import TASKS
    from spark_udfs._udf import SIGNATURE

    state_task_endpoints = spark_udfs._state(spark).task_endpoints  # noqa: SLF001 - same project
    calls = [c for c in find_calls(spec.query, {"ai_query", *TASKS})]
    if not calls:
        raise ConfigError("the job query has no ai_query(...) call in its SELECT list; add one, e.g. ai_query('local-chat', text) AS answer")
    outer = [c for c in calls if not any(o is not c and o.start <= c.start and c.end <= o.end for o in calls)]
    sql = spec.query
    endpoints: list[tuple[str, str | None]] = []
    for call in sorted(outer, key=lambda c: c.start, reverse=True):
        if call.name.lower() == "ai_query":
            bound = bind_arguments(call, SIGNATURE, required=2)
            endpoint = bound["endpoint"].literal
            request = bound["request"].text
            endpoints.append((call.name, endpoint if isinstance(endpoint, str) else None))
        else:
            request = call.args[0].text
            endpoints.append((call.name, state_task_endpoints.get(call.name.lower())))
        sql = sql[:call.start] + f"CAST(({request}) AS STRING)" + sql[call.end:]
    return sql, endpoints


# --------------------------------------------------------------------------------------------
# usage rows from a chunk's output


def _call_result(row: dict[str, Any], response_column: str) -> CallResult:
    return CallResult(
        index=0, endpoint=row["aiq_endpoint"], status=row["aiq_status"], value=row.get(response_column),
        error=row.get("aiq_error"), model=row.get("aiq_model"), prompt_tokens=row["aiq_prompt_tokens"] or 0,
        completion_tokens=row["aiq_completion_tokens"] or 0, total_tokens=row["aiq_total_tokens"] or 0,
        usage_estimated=bool(row.get("aiq_usage_estimated")), cost_usd=row.get("aiq_cost_usd"),
        latency_ms=row.get("aiq_latency_ms") or 0.0, attempts=row.get("aiq_attempts") or 0,
        request_id=row.get("aiq_request_id"), completed_at=row.get("aiq_completed_at") or datetime.now(timezone.utc),
    )


def usage_rows(spec: JobSpec, result: pa.Table, requests: dict[Any, str], response_column: str, run_id: str,
               version: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(usage rows, payload rows) of a chunk: one per request sent (in-batch duplicates sent none)."""
    requester = _requester()
    usage, payloads = [], []
    names = list(spec.key)
    for row in result.to_pylist():
        if not row.get("aiq_attempts"):
            continue  # a copy of an identical request in the batch, or a NULL endpoint: nothing was sent
        key = tuple(row[k] for k in names)
        key_text = json.dumps(key[0] if len(key) == 1 else list(key), default=str)
        res = _call_result(row, response_column)
        request = requests.get(key)
        context = {"job": spec.name, "run": run_id, "chunk": str(version), "key": key_text}
        client_id = f"{spec.name}/{key_text}"
        usage.append(usage_record(res, request=request, requester=requester, source=f"batch:{spec.name}",
                                  client_request_id=client_id, usage_context=context))
        if spec.inference_path:
            payloads.append(inference_record(res, request, max_payload_bytes=spec.max_payload_bytes,
                                             source=f"batch:{spec.name}", client_request_id=client_id))
    return usage, payloads


def _requester() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        return ""


# --------------------------------------------------------------------------------------------
# commits


def _commit_props(app_id: str, version: int) -> Any:
    from deltalake import CommitProperties, Transaction

    return CommitProperties(app_transactions=[Transaction(app_id=app_id, version=version)])


def committed_version(path: str, app_id: str) -> int:
    """The highest chunk version ``app_id`` committed to the Delta table at ``path`` (0: none)."""
    from deltalake import DeltaTable

    if not DeltaTable.is_deltatable(path):
        return 0
    return int(DeltaTable(path).transaction_version(app_id) or 0)


def commit_output(spec: JobSpec, table: pa.Table, version: int) -> bool:
    """Write a chunk to the output (merge by key, or append) with app transaction (job, version)."""
    from deltalake import DeltaTable, write_deltalake

    if committed_version(spec.output_path, spec.job_id) >= version:
        return False
    props = _commit_props(spec.job_id, version)
    if spec.output_mode == "merge" and _output_exists(spec):
        predicate = " AND ".join(f"t.`{k}` = s.`{k}`" for k in spec.key)
        (DeltaTable(spec.output_path)
         .merge(table, predicate, source_alias="s", target_alias="t", commit_properties=props)
         .when_matched_update_all().when_not_matched_insert_all().execute())
    else:
        write_deltalake(spec.output_path, table, mode="append", commit_properties=props)
    return True


class _Staging:
    """Usage and payload rows written next to the job before the output commit, committed after it.

    The output and the usage table are two Delta tables: no single commit covers both. A chunk's
    usage rows are therefore staged as parquet first; whatever kills the run, the next run
    commits the staged rows whose output landed (each once: app transaction per table) and drops
    the others (their rows are still pending and will be answered from the journal).
    """

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        self.dir = Path(spec.state_path) / "staged"

    def _path(self, version: int, kind: str) -> Path:
        return self.dir / f"v{version:08d}-{kind}.parquet"

    def stage(self, version: int, usage: list[dict[str, Any]], payloads: list[dict[str, Any]]) -> None:
        import pyarrow.parquet as pq

        self.dir.mkdir(parents=True, exist_ok=True)
        for kind, rows, schema in (("usage", usage, USAGE_SCHEMA), ("inference", payloads, INFERENCE_SCHEMA)):
            if kind == "inference" and not self.spec.inference_path:
                continue
            tmp = self.dir / f".tmp-{uuid.uuid4().hex}"
            pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
            os.replace(tmp, self._path(version, kind))

    def commit(self, version: int) -> None:
        import pyarrow.parquet as pq

        for kind, path, schema in (("usage", self.spec.usage_table, USAGE_SCHEMA),
                                   ("inference", self.spec.inference_path, INFERENCE_SCHEMA)):
            staged = self._path(version, kind)
            if path is None or not staged.exists():
                continue
            DeltaAppender(path, schema).append(pq.read_table(staged).to_pylist(), app_id=self.spec.job_id, version=version)
            staged.unlink()

    def recover(self) -> int:
        """Commit what a killed run staged for chunks whose output landed; drop the rest. Returns chunks recovered."""
        if not self.dir.is_dir():
            return 0
        landed = committed_version(self.spec.output_path, self.spec.job_id)
        recovered = set()
        for staged in sorted(self.dir.glob("v*-*.parquet")):
            version = int(staged.name[1:9])
            if version <= landed:
                self.commit(version)
                recovered.add(version)
            else:
                staged.unlink()
        for tmp in self.dir.glob(".tmp-*"):
            tmp.unlink()
        return len(recovered)


class _ReplayedAnswers:
    """Journaled answers of earlier runs, so that each one is billed in the usage table once.

    The journal is keyed by request content: two pending rows with the same request both get
    the one journaled answer. The first use carries its tokens; later uses (in this run, or
    already in the usage table from an earlier one) become copies with zero tokens, as
    identical requests inside one batch do.
    """

    _ZEROED = {"aiq_prompt_tokens": 0, "aiq_completion_tokens": 0, "aiq_total_tokens": 0, "aiq_attempts": 0}

    def __init__(self, spec: JobSpec, journal_dirs: list[str]) -> None:
        self.ids: set[str] = set()
        for directory in journal_dirs:
            for path in Path(directory).glob("*.jsonl"):
                self.ids.update(e["result"].get("request_id") for e in read_entries(path).values())
        self.ids.discard(None)  # type: ignore[arg-type]
        self.billed: set[str] = set()
        if self.ids:
            usage = DeltaAppender(spec.usage_table).read()
            if usage.num_rows:
                self.billed = self.ids & set(usage.column("databricks_request_id").to_pylist())

    def zero_repeats(self, result: pa.Table) -> pa.Table:
        if not self.ids:
            return result
        repeat = []
        for rid in result.column("aiq_request_id").to_pylist():
            again = rid in self.ids and rid in self.billed
            if rid in self.ids:
                self.billed.add(rid)
            repeat.append(again)
        if not any(repeat):
            return result
        mask = pa.array(repeat)
        for name, zero in {**self._ZEROED, "aiq_cost_usd": 0.0}.items():
            i = result.column_names.index(name)
            column = result.column(i)
            result = result.set_column(i, result.field(i), pc.if_else(mask, pa.scalar(zero, column.type), column))
        return result


# --------------------------------------------------------------------------------------------
# the run


@dataclass
class JobRunReport:
    """What one incremental run did, and the state of the output table after it."""

    job: str
    output_path: str
    usage_path: str
    run_id: str
    rows: int = 0
    rows_ok: int = 0
    rows_failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = None
    chunks: int = 0
    seconds: float = 0.0
    pending_before: int = 0
    pending_after: int = 0
    table_rows: int = 0
    table_failed: int = 0
    stopped: str | None = None
    """Why the run stopped before doing every pending row (budget), else ``None``."""
    recovered_chunks: int = 0
    rows_deduplicated: int = 0
    """Rows answered by an identical request of the same query (sent once, zero tokens of their own)."""
    per_endpoint: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def failure_rate(self) -> float:
        """Failed rows of the output table (its latest state), over its rows."""
        return self.table_failed / self.table_rows if self.table_rows else 0.0

    @property
    def rows_failed_total(self) -> int:
        return self.table_failed

    def render(self) -> str:
        rate = self.rows / self.seconds if self.seconds > 0 else 0.0
        cost = "unknown (no pricing)" if self.cost_usd is None else f"{self.cost_usd:.4f} USD"
        lines = [
            f"job {self.job!r} run {self.run_id}: {self.rows} rows in {self.chunks} chunk(s) -> {self.output_path}",
            f"  {'':<22}{'this run':>12}",
            f"  {'rows ok':<22}{self.rows_ok:>12}",
            f"  {'rows failed':<22}{self.rows_failed:>12}",
            f"  {'rows deduplicated':<22}{self.rows_deduplicated:>12}",
            f"  {'prompt tokens':<22}{self.prompt_tokens:>12}",
            f"  {'completion tokens':<22}{self.completion_tokens:>12}",
            f"  {'cost':<22}{cost:>12}",
            f"  {'time':<22}{self.seconds:>10.1f} s",
            f"  {'rows/s':<22}{rate:>12.2f}",
            f"  pending: {self.pending_before} before, {self.pending_after} after; "
            f"output table: {self.table_rows} rows, {self.table_failed} failed; usage: {self.usage_path}",
        ]
        if self.per_endpoint:
            lines.append(f"  {'endpoint':<22}{'rows':>8}{'tokens':>12}{'cost USD':>12}")
            for name, e in sorted(self.per_endpoint.items()):
                c = "-" if e.get("cost") is None else f"{e['cost']:.4f}"
                lines.append(f"  {name:<22}{int(e['rows']):>8}{int(e['tokens']):>12}{c:>12}")
        if self.recovered_chunks:
            lines.append(f"  recovered the usage rows of {self.recovered_chunks} chunk(s) committed by an interrupted run")
        if self.stopped:
            lines.append(f"  STOPPED: {self.stopped}")
        return "\n".join(lines)


def _journal_dirs(spec: JobSpec) -> list[str]:
    root = Path(spec.state_path) / "journal"
    return sorted(str(p) for p in root.glob("*") if p.is_dir()) if root.is_dir() else []


def _log_run(spec: JobSpec, record: dict[str, Any]) -> None:
    path = Path(spec.state_path) / "runs.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, default=str) + "\n")


def read_runs(spec: JobSpec) -> list[dict[str, Any]]:
    """The job's run log, oldest first (a run that has a start but no end was interrupted)."""
    path = Path(spec.state_path) / "runs.jsonl"
    if not path.exists():
        return []
    runs: dict[str, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        runs.setdefault(rec["run_id"], {}).update(rec)
    return list(runs.values())


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


def _check_budget_pricing(spark: "SparkSession", spec: JobSpec) -> None:
    if spec.max_cost_usd is None:
        return
    _, calls = request_query(spark, spec)
    registry = spark_udfs._state(spark).registry  # noqa: SLF001 - same project
    for _, endpoint in calls:
        if endpoint is not None and endpoint in registry and registry.get(endpoint).entity.pricing is None:
            raise ConfigError(
                f"options.max_cost_usd needs prices, but endpoint {endpoint!r} has no pricing: add "
                "\"pricing\": {\"input_usd_per_million_tokens\": ..., \"output_usd_per_million_tokens\": ...} to its served "
                "entity, or use options.max_tokens"
            )


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
    stream = stream or sys.stderr
    started = time.monotonic()
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    report = JobRunReport(spec.name, spec.output_path, spec.usage_table, run_id)
    input_df = open_job(spec, spark)
    _check_budget_pricing(spark, spec)
    staging = _Staging(spec)
    report.recovered_chunks = staging.recover()

    caps = [n for n in (limit, spec.max_rows) if n is not None]
    keys = pending_keys(spark, spec, input_df, retry_failed=retry_failed, limit=min(caps) if caps else None)
    report.pending_before = keys.num_rows
    log.info("job %s: %d pending rows (%.1f s)", spec.name, keys.num_rows, time.monotonic() - started)
    _log_run(spec, {"run_id": run_id, "started": datetime.now(timezone.utc).isoformat(), "pending": keys.num_rows,
                    "retry_failed": retry_failed, "status": "running"})
    journal_root = Path(spec.state_path) / "journal"
    earlier_journals = _journal_dirs(spec)
    replayed = _ReplayedAnswers(spec, earlier_journals)
    journal = ResponseJournal.property_value(str(journal_root / f"run-{run_id}"), earlier_journals)
    names = list(spec.key)
    req_sql, _ = request_query(spark, spec)
    sc = spark.sparkContext

    collector = ProgressCollector(host=spark.conf.get("spark.driver.host", "127.0.0.1") or "127.0.0.1")
    spark_udfs.set_progress_address(spark, collector.address)
    display = _ProgressDisplay(collector, keys.num_rows, spec.name, stream) if progress and keys.num_rows else None
    offset = 0
    status = "finished"
    try:
        if display:
            display.__enter__()
        sc.setLocalProperty(JOURNAL_PROPERTY, journal)
        while offset < keys.num_rows:
            stop = _budget_check(spec, report)
            if stop:
                report.stopped = stop
                status = "budget"
                break
            size = _next_chunk_size(spec, report)
            chunk_keys = keys.slice(offset, size)
            version = committed_version(spec.output_path, spec.job_id) + 1
            _run_chunk(spark, spec, input_df, chunk_keys, names, req_sql, staging, version, run_id, report, replayed)
            offset += chunk_keys.num_rows
    except BaseException:
        status = "failed"
        raise
    finally:
        sc.setLocalProperty(JOURNAL_PROPERTY, None)
        if display:
            display.__exit__(None, None, None)
        spark_udfs.set_progress_address(spark, None)
        collector.close()
        spark.table(_INPUT_ALIAS).createOrReplaceTempView(spec.driving_view)
        report.seconds = time.monotonic() - started
        report.pending_after = keys.num_rows - offset if status != "finished" or offset < keys.num_rows else 0
        if status == "finished" and report.pending_after == 0 and limit is None and spec.max_rows is None:
            shutil.rmtree(journal_root, ignore_errors=True)  # every journaled answer is committed
        elif status != "failed":
            shutil.rmtree(journal_root / f"run-{run_id}", ignore_errors=True)  # this run's answers are committed
        _log_run(spec, {"run_id": run_id, "finished": datetime.now(timezone.utc).isoformat(), "status": status,
                        "rows": report.rows, "ok": report.rows_ok, "failed": report.rows_failed,
                        "prompt_tokens": report.prompt_tokens, "completion_tokens": report.completion_tokens,
                        "cost_usd": report.cost_usd, "chunks": report.chunks, "seconds": round(report.seconds, 3),
                        "pending_after": report.pending_after, "stopped": report.stopped})
    if report.stopped:
        report.stopped += (
            f"; committed {report.rows} of {report.pending_before} pending rows in {report.chunks} chunk(s), "
            f"{report.pending_after} stay pending. To continue, run the job again (it resumes where it stopped), "
            "or raise the limit in [options]"
        )
    states = key_states(spec)
    report.table_rows = states.num_rows
    report.table_failed = states.num_rows - (pc.sum(states.column("ok")).as_py() or 0) if states.num_rows else 0
    return report


def _run_chunk(spark: "SparkSession", spec: JobSpec, input_df: "DataFrame", chunk_keys: pa.Table, names: list[str],
               req_sql: str, staging: _Staging, version: int, run_id: str, report: JobRunReport,
               replayed: "_ReplayedAnswers") -> None:
    # The chunk's input rows come to the driver once and go back as a local relation: the model
    # query and the request-text query then read it without scanning the sources again, and Spark
    # spreads a local relation over all its cores (a scan would give one task per source file).
    rows = rows_of_keys(spark, input_df, chunk_keys, names).toArrow()
    spark.createDataFrame(rows, schema=input_df.schema).createOrReplaceTempView(spec.driving_view)
    df = spark_udfs.sql(spark, spec.query, audit=True)
    out_df, response_column = flatten_audit(df)
    missing = [k for k in names if k not in out_df.columns]
    if missing:
        raise ConfigError(f"key column(s) {', '.join(missing)} are not in the query's result ({', '.join(out_df.columns)}); "
                          "select them in the query")
    result = out_df.toArrow()
    keys_seen = result.select(names).group_by(names).aggregate([([], "count_all")])
    if keys_seen.num_rows != result.num_rows:
        raise ConfigError(f"the query returns several rows for one key ({', '.join(names)}): a job writes one row per key; "
                          "fix key = [...] or the query (e.g. its joins)")
    result = replayed.zero_repeats(result)
    request_rows = spark_udfs.sql(spark, req_sql).select(*names, response_column).toArrow().to_pylist()
    requests = {tuple(r[k] for k in names): r[response_column] for r in request_rows}
    usage, payloads = usage_rows(spec, result, requests, response_column, run_id, version)
    staging.stage(version, usage, payloads)
    commit_output(spec, result, version)
    staging.commit(version)

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
        e = report.per_endpoint.setdefault(rec["endpoint_name"], {"rows": 0, "tokens": 0, "cost": None})
        e["rows"] += 1
        e["tokens"] += rec["input_token_count"] + rec["output_token_count"]
        if rec["cost_usd"] is not None:
            e["cost"] = (e["cost"] or 0.0) + rec["cost_usd"]
            report.cost_usd = (report.cost_usd or 0.0) + rec["cost_usd"]
    log.info("job %s chunk v%d: %d rows committed", spec.name, version, result.num_rows)


# --------------------------------------------------------------------------------------------
# status


@dataclass
class JobStatus:
    job: str
    done: int
    failed: int
    pending: int | None
    runs: list[dict[str, Any]]
    usage_requests: int
    usage_prompt_tokens: int
    usage_completion_tokens: int
    usage_cost_usd: float | None

    def render(self, last: int = 5) -> str:
        pending = "unknown" if self.pending is None else str(self.pending)
        cost = "unknown (no pricing)" if self.usage_cost_usd is None else f"{self.usage_cost_usd:.4f} USD"
        lines = [
            f"job {self.job!r}",
            f"  done (ok)     {self.done:>10}",
            f"  failed        {self.failed:>10}   (ai-query run --retry-failed to ask again)",
            f"  pending       {pending:>10}",
            f"  usage         {self.usage_requests} requests, {self.usage_prompt_tokens} prompt + "
            f"{self.usage_completion_tokens} completion tokens, {cost}",
            f"  runs          {len(self.runs)}" + (f" (last {last}):" if self.runs else ""),
        ]
        for run in self.runs[-last:]:
            state = run.get("status", "?")
            if state == "running":
                state = "interrupted"
            lines.append(f"    {run.get('started', '?')[:19]}  {state:<11} rows {run.get('rows', '-')!s:>6}  "
                         f"failed {run.get('failed', '-')!s:>5}  tokens {(run.get('prompt_tokens') or 0) + (run.get('completion_tokens') or 0):>8}"
                         + (f"  ({run['stopped'][:80]})" if run.get("stopped") else ""))
        return "\n".join(lines)


def job_status(spec: JobSpec, spark: "SparkSession | None" = None) -> JobStatus:
    """Done / failed / pending counts, the run log, and usage totals. Spark only for SQL inputs."""
    states = key_states(spec)
    ok = pc.sum(states.column("ok")).as_py() or 0 if states.num_rows else 0
    pending: int | None = None
    if spec.input_sql is None:
        from deltalake import DeltaTable

        source = spec.sources[spec.driving_view]
        if DeltaTable.is_deltatable(source):
            keys = DeltaTable(source).to_pyarrow_table(columns=list(spec.key)).group_by(list(spec.key)).aggregate([])
            if states.num_rows:
                keys = keys.join(states.select(list(spec.key)).cast(keys.schema), keys=list(spec.key), join_type="left anti")
            pending = keys.num_rows
    elif spark is not None:
        input_df = open_job(spec, spark)
        pending = pending_keys(spark, spec, input_df).num_rows
    usage = DeltaAppender(spec.usage_table).read()
    if spec.usage_path:  # a shared table: this job's rows only
        usage = usage.filter(pc.equal(usage.column("source"), f"batch:{spec.name}"))
    cost_col = usage.column("cost_usd")
    return JobStatus(
        job=spec.name, done=ok, failed=states.num_rows - ok, pending=pending, runs=read_runs(spec),
        usage_requests=usage.num_rows,
        usage_prompt_tokens=pc.sum(usage.column("input_token_count")).as_py() or 0,
        usage_completion_tokens=pc.sum(usage.column("output_token_count")).as_py() or 0,
        usage_cost_usd=pc.sum(cost_col).as_py() if usage.num_rows and cost_col.null_count < usage.num_rows else None,
    )


__all__ = ["JobRunReport", "JobStatus", "commit_output", "job_registry", "job_status", "key_states", "open_job",
           "pending_keys", "read_runs", "request_query", "run_incremental", "usage_rows"]
