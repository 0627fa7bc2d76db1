"""Delta Lake I/O for Spark without the Delta jars: a Spark Python Data Source over delta-rs.

Spark's own Delta connector comes from Maven, which these machines cannot reach (ENVIRONMENT.md,
"Delta"). This module gives Spark a ``format("delta")`` anyway, built on Spark's Python Data Source
API and ``deltalake`` (delta-rs):

* **write**: every Spark task streams its Arrow batches into parquet file(s) directly under the
  table path and returns the file's add-action (size, stats); the driver then makes exactly **one**
  Delta commit for the whole job with delta-rs's low-level transaction API. A failed job commits
  nothing and its files are deleted, so readers never see a half-written job.
* **idempotency**: ``txnAppId`` / ``txnVersion`` record a Delta app transaction in the same commit.
  A write whose ``(app_id, version)`` is not newer than what the table already holds is skipped and
  its files deleted, so a retried job chunk never double-writes (the same option names as Spark's
  native Delta writer, so callers work with either backend).
* **read**: the files of one snapshot (optionally ``versionAsOf``) are read with pyarrow on the
  executors, a few files per Spark partition.

Worked example::

    register_delta(spark)                        # "delta-rs" here, "jvm" where the jars exist
    write_delta(df, "/data/out", mode="append", txn_app_id="job-123", txn_version=7)
    write_delta(df, "/data/out", mode="append", txn_app_id="job-123", txn_version=7)  # skipped
    read_delta(spark, "/data/out", version=0).show()

Spark only hands a Python data source the ``append``/``overwrite`` save modes; ``error`` and
``ignore`` travel as ``.option("saveMode", ...)`` on an append, which :func:`write_delta` does for
you. Raw ``df.write.format("delta").save(p)`` without ``.mode(...)`` therefore fails in Spark itself
(its default mode is ``errorifexists``).

Limits, each failing loudly rather than silently: no partitioned writes (partitioned tables are
read, not written), no deletion vectors or column mapping, ``mergeSchema`` only adds top-level
columns (on append as a separate metadata-only commit before the data commit: delta-rs cannot
change the schema inside an append), local and ``file://`` paths are what the tests cover.
A skipped write (same app transaction, or ``ignore`` on an existing table) still lets Spark
compute the DataFrame, since the data source only sees it as tasks run: check
:func:`delta_txn_version` before starting expensive work.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from ai_query import AIQueryError, recover_error
from pyspark.sql.datasource import (
    DataSource,
    DataSourceArrowWriter,
    DataSourceReader,
    InputPartition,
    WriterCommitMessage,
)
from pyspark.sql.types import ArrayType, DataType, MapType, StructField, StructType

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import DataFrame, SparkSession

__all__ = [
    "DeltaDataSource",
    "DeltaReadError",
    "DeltaWriteError",
    "delta_txn_version",
    "read_delta",
    "register_delta",
    "write_delta",
]

_JVM_DELTA_CLASS = "org.apache.spark.sql.delta.sources.DeltaDataSource"
_SAVE_MODES = ("append", "overwrite", "error", "errorifexists", "ignore")
_TRUE = ("true", "1", "yes")
# Delta's stats convention: long strings are not worth a min/max (and a truncated max would be wrong).
_MAX_STRING_STAT_CHARS = 32
_DEFAULT_MAX_PARTITION_BYTES = 128 * 1024 * 1024
_READ_BATCH_ROWS = 65_536


class DeltaWriteError(AIQueryError):
    """A Delta write was refused or failed: mode, schema, options or the commit itself."""


class DeltaReadError(AIQueryError):
    """A Delta table cannot be read by the delta-rs data source (missing, or an unsupported feature)."""


# --------------------------------------------------------------------------------------------
# paths and small helpers


def _table_uri(path: str) -> str:
    """Make ``path`` absolute, because executors and Spark's planner workers may not share our cwd."""
    if "://" in path:
        if path.startswith("file://"):
            return os.path.abspath(unquote(path[len("file://") :]))
        return path.rstrip("/")
    return os.path.abspath(os.path.expanduser(path))


def _filesystem(uri: str) -> tuple[Any, str]:
    """Return a pyarrow filesystem and the table's root path on it."""
    import pyarrow.fs as pafs

    if "://" not in uri:
        return pafs.LocalFileSystem(), uri
    return pafs.FileSystem.from_uri(uri)


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def _is_true(options: Any, key: str) -> bool:
    return str(options.get(key, "false")).strip().lower() in _TRUE


def _path_option(options: Any) -> str:
    path = options.get("path")
    if not path:
        raise DeltaWriteError(
            "no table path: pass it as df.write.format('delta').save(path) or .option('path', path)"
        )
    return _table_uri(str(path))


def _is_delta_table(uri: str) -> bool:
    from deltalake import DeltaTable

    return DeltaTable.is_deltatable(uri)


def _as_nullable(dt: DataType) -> DataType:
    """Delta tables created from a DataFrame have only nullable columns, as Spark's Delta writer does."""
    if isinstance(dt, StructType):
        return StructType([StructField(f.name, _as_nullable(f.dataType), True, f.metadata) for f in dt.fields])
    if isinstance(dt, ArrayType):
        return ArrayType(_as_nullable(dt.elementType), True)
    if isinstance(dt, MapType):
        return MapType(_as_nullable(dt.keyType), _as_nullable(dt.valueType), True)
    return dt


def _spark_schema_of(table: Any) -> StructType:
    """The table's schema as Spark types: Delta's schema JSON is Spark's StructType JSON."""
    return StructType.fromJson(json.loads(table.schema().to_json()))


def _arrow_schema(schema: StructType) -> "pa.Schema":
    """Arrow schema of the parquet files; timestamps are stored as UTC instants."""
    from pyspark.sql.pandas.types import to_arrow_schema

    return to_arrow_schema(schema, timezone="UTC")


def _type_str(dt: DataType) -> str:
    return _as_nullable(dt).simpleString()


def _schema_differences(table: StructType, data: StructType) -> tuple[list[str], list[StructField]]:
    """Compare by column name (case-insensitive, nullability ignored), the way Delta matches appends.

    Returns the type conflicts (one readable line per column) and the data's columns the table lacks.
    """
    by_name = {f.name.lower(): f for f in table.fields}
    conflicts: list[str] = []
    extra: list[StructField] = []
    for f in data.fields:
        existing = by_name.get(f.name.lower())
        if existing is None:
            extra.append(f)
        elif _type_str(existing.dataType) != _type_str(f.dataType):
            conflicts.append(
                f"column {f.name!r}: table has {_type_str(existing.dataType)}, data has {_type_str(f.dataType)}"
            )
    return conflicts, extra


# --------------------------------------------------------------------------------------------
# write side


@dataclass(frozen=True)
class _WrittenFile:
    """One parquet file a task wrote, with what the driver needs for its Delta add-action."""

    path: str  # relative to the table root, as Delta's add.path
    size: int
    modification_time: int  # ms since the epoch
    num_records: int
    stats: str  # Delta stats JSON


@dataclass
class _FilesWritten(WriterCommitMessage):
    """A task's commit message: the files it wrote under the table path."""

    files: list[_WrittenFile] = field(default_factory=list)


@dataclass(frozen=True)
class _WritePlan:
    """Everything the driver decided before any task starts; pickled to every task and to commit()."""

    uri: str
    write_id: str
    mode: str  # append | overwrite | error | ignore
    table_schema: StructType  # schema of the table after this write
    arrow_schema: Any  # pa.Schema of the files, == table_schema
    new_columns: tuple[StructField, ...]  # mergeSchema additions (append only)
    replace_schema: bool  # overwrite writes table_schema into the table metadata
    table_existed: bool
    skip_reason: str | None  # set when the driver already knows nothing must be committed
    txn_app_id: str | None
    txn_version: int | None
    user_metadata: str | None
    max_records_per_file: int


def _parse_txn(options: Any) -> tuple[str | None, int | None]:
    app_id = options.get("txnAppId")
    raw_version = options.get("txnVersion")
    if (app_id is None) != (raw_version is None):
        missing = "txnVersion" if raw_version is None else "txnAppId"
        raise DeltaWriteError(
            f"idempotent writes need both txnAppId and txnVersion; {missing} is missing. "
            "Pass both (e.g. .option('txnAppId', 'job-123').option('txnVersion', 7)) or neither."
        )
    if app_id is None:
        return None, None
    if not str(app_id).strip():
        raise DeltaWriteError("txnAppId must be a non-empty string, e.g. the job's id")
    try:
        version = int(str(raw_version))
    except ValueError:
        raise DeltaWriteError(f"txnVersion must be an integer >= 0, got {raw_version!r}") from None
    if version < 0:
        raise DeltaWriteError(f"txnVersion must be an integer >= 0, got {version}")
    return str(app_id), version


def _parse_mode(options: Any, overwrite: bool) -> str:
    requested = options.get("saveMode")
    if requested is None:
        return "overwrite" if overwrite else "append"
    mode = str(requested).strip().lower()
    if mode not in _SAVE_MODES:
        raise DeltaWriteError(f"saveMode {requested!r} is not one of {', '.join(_SAVE_MODES)}")
    mode = "error" if mode == "errorifexists" else mode
    if overwrite and mode != "overwrite":
        raise DeltaWriteError(
            f"saveMode {requested!r} contradicts Spark's .mode('overwrite'); "
            "use .mode('append') with the saveMode option, or write_delta(df, path, mode=...)"
        )
    return mode


def _plan_write(options: Any, data_schema: StructType, overwrite: bool) -> _WritePlan:
    """Validate mode, options and schema on the driver, before any task runs."""
    from deltalake import DeltaTable

    uri = _path_option(options)
    mode = _parse_mode(options, overwrite)
    app_id, txn_version = _parse_txn(options)
    merge_schema = _is_true(options, "mergeSchema")
    overwrite_schema = _is_true(options, "overwriteSchema")
    try:
        max_records = int(str(options.get("maxRecordsPerFile", "0")))
    except ValueError:
        raise DeltaWriteError(
            f"maxRecordsPerFile must be an integer (0 = unlimited), got {options.get('maxRecordsPerFile')!r}"
        ) from None
    if overwrite_schema and mode != "overwrite":
        raise DeltaWriteError("overwriteSchema=true only applies to mode 'overwrite'; use mergeSchema to add columns")
    if not data_schema.fields:
        raise DeltaWriteError("cannot write a DataFrame with no columns to a Delta table")
    lowered = [f.name.lower() for f in data_schema.fields]
    duplicates = sorted({n for n in lowered if lowered.count(n) > 1})
    if duplicates:
        raise DeltaWriteError(
            f"duplicate column names (Delta compares them case-insensitively): {', '.join(duplicates)}; rename them"
        )

    data_schema = _as_nullable(data_schema)  # type: ignore[assignment]
    exists = _is_delta_table(uri)
    table_schema = data_schema
    new_columns: tuple[StructField, ...] = ()
    replace_schema = False
    skip_reason: str | None = None

    if exists:
        table = DeltaTable(uri)
        if mode == "error":
            raise DeltaWriteError(
                f"a Delta table already exists at {uri} and saveMode is 'errorifexists'; "
                "use mode 'append' or 'overwrite', or another path"
            )
        if mode == "ignore":
            skip_reason = f"table exists at {uri} and saveMode is 'ignore'"
        if app_id is not None:
            done = table.transaction_version(app_id)
            if done is not None and done >= txn_version:  # type: ignore[operator]
                skip_reason = (
                    f"app transaction {app_id!r} is already at version {done} >= {txn_version}"
                )
        existing = _spark_schema_of(table)
        _check_readable_layout(table, uri, for_write=True)
        if table.metadata().partition_columns:
            raise DeltaWriteError(
                f"the Delta table at {uri} is partitioned by {table.metadata().partition_columns}; "
                "the delta-rs data source writes only unpartitioned tables"
            )
        conflicts, extra = _schema_differences(existing, data_schema)
        if mode == "overwrite" and overwrite_schema:
            replace_schema = True
        elif conflicts or (extra and not merge_schema):
            problems = conflicts + (
                [f"columns not in the table: {', '.join(f.name for f in extra)}"] if extra else []
            )
            fixes = (["cast the columns to the table's types"] if conflicts else []) + (
                ["drop the new columns or add them with .option('mergeSchema', 'true')"] if extra else []
            )
            if mode == "overwrite":
                fixes.append("replace the table's schema with .option('overwriteSchema', 'true')")
            if skip_reason is None:
                raise DeltaWriteError(
                    f"schema mismatch with the Delta table at {uri}: {'; '.join(problems)}. "
                    f"To fix: {'; or '.join(fixes)}."
                )
        else:
            table_schema = StructType(list(existing.fields) + list(extra))
            new_columns = tuple(extra)
            replace_schema = mode == "overwrite" and bool(extra)

    return _WritePlan(
        uri=uri,
        write_id=uuid.uuid4().hex[:12],
        mode=mode,
        table_schema=table_schema,
        arrow_schema=_arrow_schema(table_schema),
        new_columns=new_columns if mode == "append" else (),
        replace_schema=replace_schema,
        table_existed=exists,
        skip_reason=skip_reason,
        txn_app_id=app_id,
        txn_version=txn_version,
        user_metadata=options.get("userMetadata"),
        max_records_per_file=max(0, max_records),
    )


class _ColumnStats:
    """Running Delta stats (nullCount, minValues, maxValues) of one top-level column of one file.

    Only types whose bounds stay exact are given min/max: integers, dates, short strings, floats
    without NaN, and timestamps widened to whole milliseconds (Delta's stats precision), because a
    wrong bound would make a reader skip a file that holds matching rows.
    """

    def __init__(self, arrow_type: "pa.DataType") -> None:
        import pyarrow.types as pat

        self.kind: str | None = None
        if pat.is_integer(arrow_type):
            self.kind = "int"
        elif pat.is_floating(arrow_type):
            self.kind = "float"
        elif pat.is_string(arrow_type) or pat.is_large_string(arrow_type):
            self.kind = "string"
        elif pat.is_date32(arrow_type):
            self.kind = "date"
        elif pat.is_timestamp(arrow_type):
            self.kind = "timestamp_tz" if arrow_type.tz else "timestamp_ntz"
        self.counts_nulls = not pat.is_nested(arrow_type)
        self.null_count = 0
        self.min: Any = None
        self.max: Any = None
        self.bounded = self.kind is not None

    def update(self, column: "pa.Array") -> None:
        import pyarrow.compute as pc

        self.null_count += column.null_count
        if not self.bounded or column.null_count == len(column):
            return
        if self.kind == "float" and pc.any(pc.is_nan(column)).as_py():
            self.bounded = False
            return
        if self.kind in ("timestamp_tz", "timestamp_ntz"):
            column = column.cast("int64")  # microseconds; avoids tz conversions in Python
        bounds = pc.min_max(column)
        lo, hi = bounds["min"].as_py(), bounds["max"].as_py()
        if self.kind == "string" and (len(lo) > _MAX_STRING_STAT_CHARS or len(hi) > _MAX_STRING_STAT_CHARS):
            self.bounded = False
            return
        self.min = lo if self.min is None else min(self.min, lo)
        self.max = hi if self.max is None else max(self.max, hi)

    def json_bounds(self) -> tuple[Any, Any] | None:
        if not self.bounded or self.min is None:
            return None
        if self.kind == "date":
            return self.min.isoformat(), self.max.isoformat()
        if self.kind in ("timestamp_tz", "timestamp_ntz"):
            lo_ms, hi_ms = self.min // 1000, -((-self.max) // 1000)  # floor / ceiling to whole ms
            suffix = "Z" if self.kind == "timestamp_tz" else ""
            return _iso_millis(lo_ms) + suffix, _iso_millis(hi_ms) + suffix
        return self.min, self.max


def _iso_millis(ms: int) -> str:
    moment = datetime(1970, 1, 1) + timedelta(milliseconds=ms)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


class _ParquetFileWriter:
    """Streams batches into one parquet file under the table root and gathers its Delta stats."""

    def __init__(self, fs: Any, root: str, name: str, schema: "pa.Schema") -> None:
        import pyarrow.parquet as pq

        self.fs, self.root, self.name = fs, root, name
        self.full_path = _join(root, name)
        self.num_records = 0
        self.columns = [(f.name, _ColumnStats(f.type)) for f in schema]
        self._writer = pq.ParquetWriter(self.full_path, schema, filesystem=fs, compression="snappy")

    def write(self, batch: "pa.RecordBatch") -> None:
        self._writer.write_batch(batch)
        self.num_records += batch.num_rows
        for i, (_, stats) in enumerate(self.columns):
            stats.update(batch.column(i))

    def close(self) -> _WrittenFile:
        self._writer.close()
        info = self.fs.get_file_info(self.full_path)
        stats: dict[str, Any] = {"numRecords": self.num_records, "minValues": {}, "maxValues": {}, "nullCount": {}}
        for name, column in self.columns:
            if column.counts_nulls:
                stats["nullCount"][name] = column.null_count
            bounds = column.json_bounds()
            if bounds is not None:
                stats["minValues"][name], stats["maxValues"][name] = bounds
        mtime = info.mtime
        return _WrittenFile(
            path=self.name,
            size=int(info.size),
            modification_time=int(mtime.timestamp() * 1000) if mtime else int(datetime.now().timestamp() * 1000),
            num_records=self.num_records,
            stats=json.dumps(stats, allow_nan=False),
        )

    def discard(self) -> None:
        try:
            self._writer.close()
        except Exception:  # noqa: BLE001 - the file is deleted next anyway
            pass
        _delete_quietly(self.fs, self.full_path)


def _conform_batch(batch: "pa.RecordBatch", schema: "pa.Schema") -> "pa.RecordBatch":
    """Match a batch to the file schema by column name: reorder, fill missing columns with nulls, cast."""
    import pyarrow as pa

    by_name = {name.lower(): i for i, name in enumerate(batch.schema.names)}
    columns = []
    for f in schema:
        i = by_name.get(f.name.lower())
        if i is None:
            columns.append(pa.nulls(batch.num_rows, f.type))
            continue
        column = batch.column(i)
        if not f.nullable and column.null_count:
            raise DeltaWriteError(f"column {f.name!r} is NOT NULL in the Delta table but the data has nulls")
        columns.append(column if column.type == f.type else column.cast(f.type))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def _delete_quietly(fs: Any, path: str) -> None:
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass
    except OSError:
        pass  # an unreferenced file is harmless to readers; VACUUM removes it later


def _task_file_prefix() -> str:
    from pyspark import TaskContext

    ctx = TaskContext.get()
    return f"{ctx.partitionId():05d}" if ctx is not None else "driver"


class _DeltaArrowWriter(DataSourceArrowWriter):
    """Tasks write parquet files; the driver commits them to the Delta log in one transaction."""

    def __init__(self, plan: _WritePlan) -> None:
        self.plan = plan

    # ---- executors
    def write(self, iterator: Iterator["pa.RecordBatch"]) -> _FilesWritten:
        plan = self.plan
        if plan.skip_reason is not None:
            for _ in iterator:  # Spark still runs the plan; just write nothing
                pass
            return _FilesWritten([])
        fs, root = _filesystem(plan.uri)
        fs.create_dir(root, recursive=True)
        prefix = _task_file_prefix()
        written: list[_WrittenFile] = []
        current: _ParquetFileWriter | None = None
        try:
            for batch in iterator:
                if batch.num_rows == 0:
                    continue
                batch = _conform_batch(batch, plan.arrow_schema)
                offset = 0
                while offset < batch.num_rows:
                    if current is None:
                        name = f"part-{prefix}-{plan.write_id}-{uuid.uuid4().hex}.c000.snappy.parquet"
                        current = _ParquetFileWriter(fs, root, name, plan.arrow_schema)
                    take = batch.num_rows - offset
                    if plan.max_records_per_file:
                        take = min(take, plan.max_records_per_file - current.num_records)
                    current.write(batch.slice(offset, take))
                    offset += take
                    if plan.max_records_per_file and current.num_records >= plan.max_records_per_file:
                        written.append(current.close())
                        current = None
            if current is not None:
                written.append(current.close())
                current = None
        except BaseException:
            # Spark reports no commit message for a failed task, so the driver's abort() cannot
            # know these files: clean them up here.
            if current is not None:
                current.discard()
            for done in written:
                _delete_quietly(fs, _join(root, done.path))
            raise
        return _FilesWritten(written)

    # ---- driver
    def commit(self, messages: list[WriterCommitMessage | None]) -> None:
        files = _files_of(messages)
        try:
            self._commit(files)
        except BaseException as exc:
            if not _any_committed(self.plan.uri, files):
                self._delete_job_files(files)
            if isinstance(exc, DeltaWriteError) or not isinstance(exc, Exception):
                raise
            raise DeltaWriteError(f"the Delta commit to {self.plan.uri} failed: {exc}") from exc

    def abort(self, messages: list[WriterCommitMessage | None]) -> None:
        self._delete_job_files(_files_of(messages))

    def _commit(self, files: list[_WrittenFile]) -> None:
        from deltalake import DeltaTable, Schema
        from deltalake.schema import Field
        from deltalake.transaction import AddAction, CommitProperties, Transaction, create_table_with_add_actions

        plan = self.plan
        if plan.skip_reason is not None:
            self._delete_job_files(files)
            return
        exists = _is_delta_table(plan.uri)
        table = DeltaTable(plan.uri) if exists else None
        if table is not None:
            # The table may have changed since the plan was made (another job, a retried chunk).
            if plan.mode == "error":
                raise DeltaWriteError(
                    f"a Delta table was created at {plan.uri} while this 'errorifexists' write ran; nothing committed"
                )
            if plan.mode == "ignore":
                self._delete_job_files(files)
                return
            if plan.txn_app_id is not None:
                done = table.transaction_version(plan.txn_app_id)
                if done is not None and done >= plan.txn_version:  # type: ignore[operator]
                    self._delete_job_files(files)
                    return
            if not plan.table_existed:
                conflicts, extra = _schema_differences(_spark_schema_of(table), plan.table_schema)
                if plan.mode == "append" and (conflicts or extra):
                    raise DeltaWriteError(
                        f"a Delta table with another schema was created at {plan.uri} while this write ran: "
                        f"{'; '.join(conflicts + [f.name for f in extra])}; nothing committed, retry the write"
                    )

        adds = [
            AddAction(f.path, f.size, {}, f.modification_time, True, f.stats) for f in files
        ]
        txns = (
            [Transaction(plan.txn_app_id, plan.txn_version)] if plan.txn_app_id is not None else None
        )
        custom = {"userMetadata": plan.user_metadata} if plan.user_metadata else None
        props = CommitProperties(app_transactions=txns, custom_metadata=custom)
        delta_schema = Schema.from_json(plan.table_schema.json())

        if table is None:
            create_table_with_add_actions(plan.uri, delta_schema, adds, mode="error", commit_properties=props)
        elif plan.mode == "overwrite":
            schema = delta_schema if plan.replace_schema or not plan.table_existed else table.schema()
            table.create_write_transaction(adds, mode="overwrite", schema=schema, commit_properties=props)
        else:
            if plan.new_columns:
                have = {f.name.lower() for f in _spark_schema_of(table).fields}
                missing = [f for f in plan.new_columns if f.name.lower() not in have]
                if missing:
                    # delta-rs cannot change the schema inside an append, so mergeSchema costs one
                    # extra (metadata-only) commit; a retry after a crash here finds the columns.
                    table.alter.add_columns([Field.from_json(json.dumps(f.jsonValue())) for f in missing])
                    table = DeltaTable(plan.uri)
            if not adds and txns is None:
                return  # nothing to record: an empty append is a no-op
            table.create_write_transaction(adds, mode="append", schema=table.schema(), commit_properties=props)

    def _delete_job_files(self, files: list[_WrittenFile]) -> None:
        """Delete this job's files: those in the messages and any a failed task left behind."""
        fs, root = _filesystem(self.plan.uri)
        names = {f.path for f in files}
        marker = f"-{self.plan.write_id}-"
        try:
            import pyarrow.fs as pafs

            for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
                base = info.path.rsplit("/", 1)[-1]
                if base.startswith("part-") and marker in base and base.endswith(".parquet"):
                    names.add(base)
        except OSError:
            pass
        for name in names:
            _delete_quietly(fs, _join(root, name))


def _files_of(messages: Sequence[WriterCommitMessage | None]) -> list[_WrittenFile]:
    return [f for m in messages if isinstance(m, _FilesWritten) for f in m.files]


def _any_committed(uri: str, files: list[_WrittenFile]) -> bool:
    """After a failed commit call: did the log entry land anyway (e.g. a post-commit hook failed)?"""
    if not files:
        return False
    try:
        from deltalake import DeltaTable

        if not _is_delta_table(uri):
            return False
        import pyarrow as pa

        paths = set(pa.table(DeltaTable(uri).get_add_actions(flatten=False)).column("path").to_pylist())
    except Exception:  # noqa: BLE001 - if unsure, keep the files: orphans are harmless, holes are not
        return True
    return any(f.path in paths for f in files)


# --------------------------------------------------------------------------------------------
# read side


@dataclass(frozen=True)
class _DeltaFile:
    uri: str
    size: int
    partition_values: tuple[tuple[str, str | None], ...]


class _FileGroup(InputPartition):
    """The files one Spark task reads."""

    def __init__(self, files: list[_DeltaFile]) -> None:
        super().__init__(None)
        self.files = files


def _check_readable_layout(table: Any, uri: str, *, for_write: bool = False) -> None:
    """Fail clearly on table features that plain parquet reads would silently get wrong."""
    action = "write to" if for_write else "read"
    mapping = (table.metadata().configuration or {}).get("delta.columnMapping.mode", "none")
    if mapping and mapping != "none":
        raise (DeltaWriteError if for_write else DeltaReadError)(
            f"the Delta table at {uri} uses column mapping (mode {mapping!r}), which the delta-rs data "
            f"source cannot {action}; use a cluster with the Delta jars or rewrite the table without it"
        )
    features = table.protocol().reader_features or []
    # Appending plain files next to deletion vectors is fine; only reads would return deleted rows.
    if not for_write and "deletionVectors" in features:
        try:
            import pyarrow as pa

            vectors = pa.RecordBatchReader.from_stream(table.deletion_vectors())
            has_dvs = any(batch.num_rows for batch in vectors)
        except Exception:  # noqa: BLE001 - cannot tell: refuse rather than return deleted rows
            has_dvs = True
        if has_dvs:
            raise (DeltaWriteError if for_write else DeltaReadError)(
                f"the Delta table at {uri} has deletion vectors, which the delta-rs data source cannot "
                f"{action}; run OPTIMIZE/REORG (PURGE) on it or use a cluster with the Delta jars"
            )


def _load_table(options: Any) -> tuple[Any, str]:
    from deltalake import DeltaTable

    path = options.get("path")
    if not path:
        raise DeltaReadError("no table path: use spark.read.format('delta').load(path) or .option('path', path)")
    uri = _table_uri(str(path))
    if not _is_delta_table(uri):
        raise DeltaReadError(f"no Delta table at {uri} (no _delta_log); check the path")
    version = options.get("versionAsOf")
    timestamp = options.get("timestampAsOf")
    if version is not None and timestamp is not None:
        raise DeltaReadError("pass versionAsOf or timestampAsOf, not both")
    table = DeltaTable(uri)
    latest = table.version()
    try:
        if version is not None:
            wanted = int(str(version))
            if not 0 <= wanted <= latest:
                raise DeltaReadError(f"versionAsOf={wanted} is outside the table's versions 0..{latest} at {uri}")
            table.load_as_version(wanted)
        elif timestamp is not None:
            table.load_as_version(str(timestamp))
    except DeltaReadError:
        raise
    except ValueError:
        raise DeltaReadError(f"versionAsOf must be an integer, got {version!r}") from None
    except Exception as exc:  # delta-rs: version vacuumed away, timestamp before the table, ...
        raise DeltaReadError(f"cannot time travel the Delta table at {uri}: {exc}") from exc
    _check_readable_layout(table, uri)
    return table, uri


def _snapshot_files(table: Any, uri: str) -> list[_DeltaFile]:
    import pyarrow as pa

    actions = pa.table(table.get_add_actions(flatten=False))
    uris = table.file_uris()
    rows = actions.select([c for c in ("path", "size_bytes", "partition") if c in actions.column_names]).to_pylist()
    if len(rows) != len(uris):
        raise DeltaReadError(f"delta-rs returned {len(uris)} file URIs but {len(rows)} add actions for {uri}")
    files = []
    for row, file_uri in zip(rows, uris):
        if not unquote(file_uri).endswith(unquote(row["path"])):
            raise DeltaReadError(f"delta-rs file order mismatch at {uri}: {file_uri} vs {row['path']}")
        partition = row.get("partition") or {}
        files.append(_DeltaFile(file_uri, int(row["size_bytes"] or 0), tuple(sorted(partition.items()))))
    return files


def _group_files(files: list[_DeltaFile], max_bytes: int) -> list[_FileGroup]:
    """Pack files in order into groups of at most ``max_bytes`` (a big file gets its own task)."""
    groups: list[list[_DeltaFile]] = []
    current: list[_DeltaFile] = []
    size = 0
    for f in files:
        if current and size + f.size > max_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(f)
        size += f.size
    if current:
        groups.append(current)
    return [_FileGroup(g) for g in groups] or [_FileGroup([])]


class _DeltaReader(DataSourceReader):
    """Reads the parquet files of one snapshot, conformed to the schema Spark asked for."""

    def __init__(self, schema: StructType, groups: list[_FileGroup]) -> None:
        self.schema = schema
        self.groups = groups

    def partitions(self) -> Sequence[InputPartition]:
        return self.groups

    def read(self, partition: InputPartition) -> Iterator["pa.RecordBatch"]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        target = _arrow_schema(self.schema)
        assert isinstance(partition, _FileGroup)
        for f in partition.files:
            fs, path = _filesystem(f.uri)
            parquet = pq.ParquetFile(path, filesystem=fs, coerce_int96_timestamp_unit="us")
            in_file = {name.lower(): name for name in parquet.schema_arrow.names}
            wanted = [in_file[x.name.lower()] for x in target if x.name.lower() in in_file]
            constants = {k.lower(): v for k, v in f.partition_values}
            for batch in parquet.iter_batches(batch_size=_READ_BATCH_ROWS, columns=wanted):
                columns = []
                for x in target:
                    key = x.name.lower()
                    if key in in_file:
                        column = batch.column(in_file[key])
                        columns.append(column if column.type == x.type else column.cast(x.type))
                    elif key in constants:
                        columns.append(_partition_column(constants[key], x.type, batch.num_rows))
                    else:  # a column added after this file was written
                        columns.append(pa.nulls(batch.num_rows, x.type))
                yield pa.RecordBatch.from_arrays(columns, schema=target)


def _partition_column(value: str | None, arrow_type: "pa.DataType", rows: int) -> "pa.Array":
    import pyarrow as pa

    if value is None:
        return pa.nulls(rows, arrow_type)
    return pa.array([value] * rows, pa.string()).cast(arrow_type)


# --------------------------------------------------------------------------------------------
# the data source


class DeltaDataSource(DataSource):
    """``format("delta")`` for Spark over delta-rs: one Delta commit per Spark write job.

    Write options: ``path``, ``saveMode`` (``error``/``errorifexists``/``ignore`` with Spark's
    ``append``), ``txnAppId`` + ``txnVersion`` (idempotent app transaction), ``mergeSchema``,
    ``overwriteSchema``, ``maxRecordsPerFile``, ``userMetadata``.
    Read options: ``path``, ``versionAsOf``, ``timestampAsOf``, ``maxPartitionBytes``.
    """

    @classmethod
    def name(cls) -> str:
        return "delta"

    def schema(self) -> StructType:
        table, _ = _load_table(self.options)
        return _spark_schema_of(table)

    def reader(self, schema: StructType) -> DataSourceReader:
        table, uri = _load_table(self.options)
        raw = self.options.get("maxPartitionBytes", _DEFAULT_MAX_PARTITION_BYTES)
        try:
            max_bytes = max(1, int(str(raw)))
        except ValueError:
            raise DeltaReadError(f"maxPartitionBytes must be an integer number of bytes, got {raw!r}") from None
        return _DeltaReader(schema, _group_files(_snapshot_files(table, uri), max_bytes))

    def writer(self, schema: StructType, overwrite: bool) -> DataSourceArrowWriter:
        return _DeltaArrowWriter(_plan_write(self.options, schema, overwrite))


# --------------------------------------------------------------------------------------------
# public helpers


def _jvm_has_class(spark: "SparkSession", class_name: str) -> bool:
    """True when Spark's JVM can load ``class_name`` (always False on Spark Connect: no JVM access)."""
    try:
        jvm = spark._jvm  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - Spark Connect raises instead of exposing the JVM
        return False
    if jvm is None:
        return False
    try:
        # Spark's own loader sees --jars / spark.jars.packages, which py4j's thread loader may not.
        jvm.org.apache.spark.util.Utils.classForName(class_name, False, False)
        return True
    except Exception:  # noqa: BLE001 - ClassNotFoundException arrives as a Py4JJavaError
        return False


def register_delta(spark: "SparkSession") -> str:
    """Make ``format("delta")`` work on ``spark`` and say which backend serves it.

    Returns ``"jvm"`` when Spark already has the native Delta connector (nothing is registered,
    so the jars keep serving it), else registers :class:`DeltaDataSource` and returns
    ``"delta-rs"``. Safe to call repeatedly.
    """
    if _jvm_has_class(spark, _JVM_DELTA_CLASS):
        return "jvm"
    spark.dataSource.register(DeltaDataSource)
    return "delta-rs"


def write_delta(
    df: "DataFrame",
    path: str,
    mode: str = "append",
    txn_app_id: str | None = None,
    txn_version: int | None = None,
) -> None:
    """Write ``df`` to the Delta table at ``path`` in one commit, optionally idempotently.

    ``mode`` is one of append, overwrite, error/errorifexists, ignore. With ``txn_app_id`` and
    ``txn_version`` the commit records that app transaction, and a write whose version is not newer
    than the table's is skipped (check :func:`delta_txn_version` first to avoid even computing
    ``df``). Raises :class:`DeltaWriteError` naming the problem and the fix.
    """
    normalized = mode.strip().lower()
    if normalized not in _SAVE_MODES:
        raise DeltaWriteError(f"mode {mode!r} is not one of {', '.join(_SAVE_MODES)}")
    if (txn_app_id is None) != (txn_version is None):
        raise DeltaWriteError("pass both txn_app_id and txn_version, or neither")
    backend = register_delta(df.sparkSession)
    writer = df.write.format("delta")
    if txn_app_id is not None:
        writer = writer.option("txnAppId", txn_app_id).option("txnVersion", str(int(txn_version)))  # type: ignore[arg-type]
    if backend == "jvm" or normalized in ("append", "overwrite"):
        writer = writer.mode(normalized)
    else:
        uri = _table_uri(path)
        if _is_delta_table(uri):  # decide before computing df; the commit re-checks for races
            if normalized == "ignore":
                return
            raise DeltaWriteError(
                f"a Delta table already exists at {uri} and mode is {mode!r}; "
                "use mode='append' or 'overwrite', or another path"
            )
        writer = writer.mode("append").option("saveMode", normalized)
    try:
        writer.save(path)
    except DeltaWriteError:
        raise
    except Exception as exc:
        typed = recover_error(str(exc), DeltaWriteError)
        if typed is None:
            raise
        raise typed from exc


def read_delta(spark: "SparkSession", path: str, version: int | None = None) -> "DataFrame":
    """Read the Delta table at ``path`` (its latest version, or ``version`` for time travel).

    Raises :class:`DeltaReadError` when there is no table, the version does not exist, or the table
    uses a feature the delta-rs reader does not support (deletion vectors, column mapping).
    """
    register_delta(spark)
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", str(int(version)))
    try:
        return reader.load(path)  # resolves the schema now, so a bad path or version fails here
    except DeltaReadError:
        raise
    except Exception as exc:
        typed = recover_error(str(exc), DeltaReadError)
        if typed is None:
            raise
        raise typed from exc


def delta_txn_version(path: str, app_id: str) -> int | None:
    """The latest committed version of app transaction ``app_id`` at ``path`` (None: none, or no table)."""
    from deltalake import DeltaTable

    uri = _table_uri(path)
    if not _is_delta_table(uri):
        return None
    return DeltaTable(uri).transaction_version(app_id)
