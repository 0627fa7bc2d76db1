"""Run a job: register ai_query, read the sources, run the query with audit columns, write Delta."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

import spark_udfs
from ai_query import get_logger
from ai_query import AIQueryError, ConfigError, ProgressCollector, recover_error
from spark_udfs import AUDIT_COLUMNS

from ._preflight import job_priced
from ._spec import JobSpec

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = get_logger("batch_runner")


@dataclass
class RunSummary:
    """What a run did, read back from the output table."""

    job: str
    output_path: str
    rows: int
    rows_ok: int
    rows_failed: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    response_column: str
    cost_usd: float | None = None
    rows_deduplicated: int = 0
    """Rows answered by an identical request of the same query (sent once, zero tokens of their own)."""
    examples: list[dict[str, Any]] = field(default_factory=list)
    requests: int = 0
    """Requests sent (rows with attempts; a deduplicated or NULL row sent none)."""
    attempts: int = 0
    """Attempts over those requests (``attempts - requests`` are retries)."""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    @property
    def failure_rate(self) -> float:
        return self.rows_failed / self.rows if self.rows else 0.0

    def render(self) -> str:
        lines = [
            f"job {self.job!r} wrote {self.rows} rows to {self.output_path}",
            f"  rows ok      {self.rows_ok:>10}",
            f"  rows failed  {self.rows_failed:>10}",
            f"  deduplicated {self.rows_deduplicated:>10}  (answered by an identical request: not sent)",
            f"  tokens       {self.total_tokens:>10}  (prompt {self.prompt_tokens}, completion {self.completion_tokens})",
            f"  cost         {'unknown (no pricing)' if self.cost_usd is None else f'{self.cost_usd:>10.4f} USD'}",
            f"  time         {self.seconds:>10.1f} s",
            f"  rows/s       {self.rows_per_s:>10.2f}",
        ]
        if self.examples:
            lines.append("  examples:")
            for ex in self.examples:
                shown = {k: (v if not isinstance(v, list) else f"[{len(v)} floats: {', '.join(f'{x:.3f}' for x in v[:3])}, ...]")
                         for k, v in ex.items()}
                lines.append("    " + "  ".join(f"{k}={str(v)[:70]!s}" for k, v in shown.items()))
        return "\n".join(lines)


def explain_error(exc: BaseException) -> str:
    """The useful line of an error, also when it arrives wrapped in a Spark task failure."""
    if isinstance(exc, AIQueryError):
        return f"{type(exc).__name__}: {exc}"
    text = str(exc)
    ours = recover_error(text, AIQueryError)
    if ours is not None:
        return f"{type(ours).__name__}: {ours}"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"{type(exc).__name__}: {first[:500]}"


def _audit_struct_columns(df: "DataFrame") -> list[str]:
    from pyspark.sql.types import StructType

    out = []
    for f in df.schema.fields:
        if isinstance(f.dataType, StructType) and [x.name for x in f.dataType.fields] == ["response", *AUDIT_COLUMNS]:
            out.append(f.name)
    return out


def flatten_audit(df: "DataFrame") -> tuple["DataFrame", str]:
    """Replace the one ai_query result column by its response plus the ``aiq_*`` audit columns."""
    from pyspark.sql import functions as F

    columns = _audit_struct_columns(df)
    if not columns:
        raise ConfigError("the job query has no ai_query(...) call in its SELECT list; add one, e.g. ai_query('local-chat', text) AS answer")
    if len(columns) > 1:
        raise ConfigError(
            f"the job query has {len(columns)} ai_query results ({', '.join(columns)}); a job writes the audit columns of one "
            "call per output table: split it into one job per call"
        )
    name = columns[0]
    clash = [c for c in df.columns if c in AUDIT_COLUMNS]
    if clash:
        raise ConfigError(f"the job query already has column(s) {', '.join(clash)}, which the audit columns need; rename them")
    selected = [F.col(f"`{c}`") for c in df.columns if c != name]
    selected.append(F.col(f"`{name}`.response").alias(name))
    selected += [F.col(f"`{name}`.{c}").alias(c) for c in AUDIT_COLUMNS]
    return df.select(*selected), name


def _adds_audit_columns(path: str, columns: list[str]) -> bool:
    """Whether the output at ``path``, written by an earlier version, lacks audit columns added
    since (``aiq_status_code``, ``aiq_batch_id``) and nothing else: the write adds them."""
    from ai_query import storage
    from ai_query.sinks._delta_commit import columns_to_add

    return storage.is_delta_table(path) and bool(columns_to_add(storage.delta_table(path), columns, AUDIT_COLUMNS, path))


class _ProgressDisplay:
    """A live bar on a terminal, a log line every ``interval`` seconds otherwise."""

    def __init__(self, collector: ProgressCollector, total: int | None, label: str, stream: IO[str], interval: float = 10.0) -> None:
        self.collector = collector
        self.total = total
        self.label = label
        self.stream = stream
        self.interval = interval
        self._stop = threading.Event()
        self._tty = hasattr(stream, "isatty") and stream.isatty()
        self._thread = threading.Thread(target=self._run, name="ai-query-progress-display", daemon=True)
        self._started = time.monotonic()

    def __enter__(self) -> "_ProgressDisplay":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _line(self) -> str:
        s = self.collector.snapshot()
        elapsed = time.monotonic() - self._started
        rate = s.rows / elapsed if elapsed > 0 else 0.0
        conc = ", ".join(f"{k}={v}" for k, v in sorted(s.concurrency.items()))
        total = f"/{self.total}" if self.total else ""
        eta = f", ETA {(self.total - s.rows) / rate:.0f} s" if self.total and rate > 0 and s.rows < self.total else ""
        return (f"{self.label}: {s.rows}{total} rows ({s.rows_failed} failed), {s.tokens} tokens, {rate:.1f} rows/s{eta}, "
                f"concurrency {conc or '-'}")

    def _run(self) -> None:
        if self._tty:
            from tqdm import tqdm

            bar = tqdm(total=self.total, desc=self.label, unit="row", file=self.stream, dynamic_ncols=True, position=0)
            try:
                while not self._stop.wait(0.5):
                    self._update(bar)
                self._update(bar)
            finally:
                bar.close()
        else:
            while not self._stop.wait(self.interval):
                print(self._line(), file=self.stream, flush=True)

    def _update(self, bar: Any) -> None:
        s = self.collector.snapshot()
        bar.n = s.rows
        conc = ",".join(f"{v}" for _, v in sorted(s.concurrency.items()))
        bar.set_postfix(failed=s.rows_failed, tokens=s.tokens, conc=conc or "-", refresh=False)
        bar.refresh()


def run_job(
    spec: JobSpec,
    *,
    spark: "SparkSession | None" = None,
    master: str | None = None,
    stream: IO[str] | None = None,
    progress: bool = True,
) -> RunSummary:
    """Run ``spec`` end to end and return the summary read back from the output table."""
    from ._preflight import preflight_job

    stream = stream or sys.stderr
    started = time.monotonic()
    preflight_job(spec, probe=False)  # `ai-query run` probed the endpoints already
    if spark is None:
        spark = spark_udfs.build_session(master or spec.master, app_name=f"ai-query:{spec.name}")
    spark_udfs.register(spark, spec.endpoints)
    for view, path in spec.sources.items():
        try:
            spark_udfs.read_delta(spark, path).createOrReplaceTempView(view)
        except Exception as exc:
            raise ConfigError(f"cannot read source {view!r} from {path}: {explain_error(exc)}; check [sources] in the job spec") from exc
    total = None
    if len(spec.sources) == 1:
        total = spark.table(next(iter(spec.sources))).count()

    # no reachable host (a Spark Connect client without AIQ_DRIVER_HOST): the summary only, no live counts
    host = spark_udfs.services_host(spark)
    collector = ProgressCollector(host=host) if host is not None else None
    spark_udfs.set_progress_address(spark, collector.address if collector is not None else None)
    try:
        df = spark_udfs.sql(spark, spec.query, audit=True)
        out_df, response_column = flatten_audit(df)
        if spec.key:
            missing = [k for k in spec.key if k not in out_df.columns]
            if missing:
                raise ConfigError(f"key column(s) {', '.join(missing)} are not in the query's result ({', '.join(out_df.columns)})")
        from spark_udfs import delta_txn_version

        app_id = f"ai-query:{spec.name}"
        previous = delta_txn_version(spec.output_path, app_id) or 0
        display = _ProgressDisplay(collector, total, spec.name, stream) if progress and collector is not None else None
        if display:
            display.__enter__()
        try:
            spark_udfs.write_delta(out_df, spec.output_path, mode=spec.output_mode, txn_app_id=app_id, txn_version=previous + 1,
                                   merge_schema=_adds_audit_columns(spec.output_path, out_df.columns))
        finally:
            if display:
                display.__exit__(None, None, None)
    finally:
        spark_udfs.set_progress_address(spark, None)
        if collector is not None:
            collector.close()
    return summarize(spec, response_column, time.monotonic() - started)


def summarize(spec: JobSpec, response_column: str, seconds: float, examples: int = 3) -> RunSummary:
    """Read the output table back (with delta-rs, not Spark) and count what it holds."""
    import pyarrow.compute as pc
    from ai_query import storage

    table = storage.delta_table(spec.output_path).to_pyarrow_table()
    status = table.column("aiq_status")
    attempts = pc.fill_null(table.column("aiq_attempts"), 0)
    ok = pc.sum(pc.equal(status, "ok")).as_py() or 0
    shown_cols = [c for c in (*spec.key, response_column, "aiq_status", "aiq_total_tokens") if c in table.column_names]
    sample = table.select(list(dict.fromkeys(shown_cols))).slice(0, examples).to_pylist()
    return RunSummary(
        job=spec.name,
        output_path=spec.output_path,
        rows=table.num_rows,
        rows_ok=ok,
        rows_failed=table.num_rows - ok,
        prompt_tokens=pc.sum(table.column("aiq_prompt_tokens")).as_py() or 0,
        completion_tokens=pc.sum(table.column("aiq_completion_tokens")).as_py() or 0,
        seconds=seconds,
        response_column=response_column,
        cost_usd=(pc.sum(table.column("aiq_cost_usd")).as_py() if table.column("aiq_cost_usd").null_count < table.num_rows
                  else 0.0 if job_priced(spec) else None),
        rows_deduplicated=(pc.sum(table.column("aiq_deduplicated")).as_py() or 0) if "aiq_deduplicated" in table.column_names else 0,
        examples=sample,
        requests=pc.sum(pc.greater(attempts, 0)).as_py() or 0,
        attempts=pc.sum(attempts).as_py() or 0,
    )
