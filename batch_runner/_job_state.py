"""A job's record: what one run did (``JobRunReport``), the run log, and the job's status.

The run log (``<state>/runs.jsonl``) gets a line when a run starts and one when it ends; a run
with a start and no end was interrupted. ``job_status`` reads the output table, the run log and
the usage table, and needs Spark only for an ``input.sql`` job's pending count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow.compute as pc

from ai_query import storage
from ai_query.sinks import DeltaAppender

from ._job_input import key_states, open_job, pending_keys
from ._job_lock import lock_holder
from ._preflight import job_priced
from ._spec import JobSpec

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


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
    per_endpoint: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per endpoint: rows (requests sent), attempts, tokens, cost (None: no pricing), by_status (rows per HTTP
    status of their last attempt); also in the run log and, with ``--mlflow-run``, in MLflow."""
    batch_phase: Any = None
    """Batch-API mode (``[batch_api]``): what the provider batches did (``_batch_mode.BatchPhase``)."""

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
            lines.append(f"  {'endpoint':<22}{'rows':>8}{'tokens':>12}{'cost USD':>12}  failed requests by HTTP status")
            for name, e in sorted(self.per_endpoint.items()):
                c = "-" if e.get("cost") is None else f"{e['cost']:.4f}"
                failed = ", ".join(f"{'no HTTP answer' if status == 'none' else status}: {n}"  # refused, timed out
                                   for status, n in sorted((e.get("by_status") or {}).items()) if status != "200") or "-"
                lines.append(f"  {name:<22}{int(e['rows']):>8}{int(e['tokens']):>12}{c:>12}  {failed}")
        if self.batch_phase is not None:
            b = self.batch_phase
            lines.append(f"  batch API: {b.submitted} batch(es) submitted ({b.lines} requests), {b.resumed} resumed, "
                         f"{b.answered} answers, {b.failed_lines} failed lines and the rest sent online, {b.cancelled} cancelled at the deadline")
        if self.recovered_chunks:
            lines.append(f"  recovered the usage rows of {self.recovered_chunks} chunk(s) committed by an interrupted run")
        if self.stopped:
            lines.append(f"  STOPPED: {self.stopped}")
        return "\n".join(lines)


def journal_dirs(spec: JobSpec) -> list[str]:
    """The journal directories of the job's earlier runs (answers received but maybe not committed)."""
    return storage.list_dir(storage.join(spec.state_path, "journal"), dirs=True)


def log_run(spec: JobSpec, record: dict[str, Any]) -> None:
    """Add a line to the run log: a run's start, or its end (the same ``run_id``)."""
    storage.append_text(storage.join(spec.state_path, "runs.jsonl"), json.dumps(record, default=str) + "\n")


def read_runs(spec: JobSpec) -> list[dict[str, Any]]:
    """The job's run log, oldest first (a run that has a start but no end was interrupted)."""
    runs: dict[str, dict[str, Any]] = {}
    for line in storage.read_appended(storage.join(spec.state_path, "runs.jsonl")).splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        runs.setdefault(rec["run_id"], {}).update(rec)
    return list(runs.values())


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
    lock: dict[str, Any] | None = None
    """The job's run lock, when one is held or left behind (``_job_lock.lock_holder``)."""

    @property
    def running(self) -> str | None:
        """The id of the run going now (its lock is held and alive)."""
        return self.lock.get("run_id") if self.lock and not self.lock.get("stale") else None

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
        if self.lock is not None:  # before the runs: the one going now, or the lock a killed run left
            lines.insert(5, f"  running now   {self.lock['description']}" if self.running else
                         f"  lock          left by {self.lock['description']}; stale ({self.lock['stale']}): "
                         "the next run takes it over")
        if self.runs:
            lines.append(f"    {'STARTED':<19}  {'STATUS':<11} {'ROWS':>6}  {'FAILED':>6}  {'TOKENS':>8}")
        for run in self.runs[-last:]:
            state = run.get("status", "?")
            if state == "running" and run.get("run_id") != self.running:
                state = "interrupted"  # its run log has no end: killed, or lost with its driver
            lines.append(f"    {run.get('started', '?')[:19]:<19}  {state:<11} {run.get('rows', '-')!s:>6}  "
                         f"{run.get('failed', '-')!s:>6}  {(run.get('prompt_tokens') or 0) + (run.get('completion_tokens') or 0):>8}"
                         + (f"  ({run['stopped'][:80]})" if run.get("stopped") else ""))
        return "\n".join(lines)


def job_status(spec: JobSpec, spark: "SparkSession | None" = None) -> JobStatus:
    """Done / failed / pending counts, the run log, and usage totals. Spark only for SQL inputs."""
    from ._preflight import use_storage_options

    use_storage_options(spec)
    states = key_states(spec)
    ok = pc.sum(states.column("ok")).as_py() or 0 if states.num_rows else 0
    pending: int | None = None
    if spec.input_sql is None:
        source = spec.sources[spec.driving_view]
        if storage.is_delta_table(source):
            keys = storage.delta_table(source).to_pyarrow_table(columns=list(spec.key)).group_by(list(spec.key)).aggregate([])
            if states.num_rows:
                keys = keys.join(states.select(list(spec.key)).cast(keys.schema), keys=list(spec.key), join_type="left anti")
            pending = keys.num_rows
    elif spark is not None:
        input_df = open_job(spec, spark)
        pending = pending_keys(spark, spec, input_df, unique=False).num_rows
    usage = DeltaAppender(spec.usage_table).read()
    if spec.usage_path:  # a shared table: this job's rows only
        usage = usage.filter(pc.equal(usage.column("source"), f"batch:{spec.name}"))
    cost_col = usage.column("cost_usd")
    return JobStatus(
        job=spec.name, done=ok, failed=states.num_rows - ok, pending=pending, runs=read_runs(spec),
        usage_requests=usage.num_rows,
        usage_prompt_tokens=pc.sum(usage.column("input_token_count")).as_py() or 0,
        usage_completion_tokens=pc.sum(usage.column("output_token_count")).as_py() or 0,
        usage_cost_usd=(pc.sum(cost_col).as_py() if usage.num_rows and cost_col.null_count < usage.num_rows
                        else 0.0 if job_priced(spec) else None),
        lock=lock_holder(spec),
    )


__all__ = ["JobRunReport", "JobStatus", "job_status", "journal_dirs", "log_run", "read_runs"]
