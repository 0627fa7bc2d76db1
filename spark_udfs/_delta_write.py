"""The write side of the delta-rs data source: a plan on the driver, files from the tasks, one commit.

``_plan_write`` checks mode, options and schema on the driver before any task runs; the tasks
write parquet files and return their add-actions (``_delta_files``); ``_DeltaArrowWriter.commit``
makes exactly one Delta commit for the whole Spark job through the core's ``DeltaCommitter``, with
the ``txnAppId``/``txnVersion`` app transaction in the same commit. A write whose transaction
already landed (a retried chunk, a race with another run of it) commits nothing and deletes its
files; a failed job commits nothing and deletes its files, so readers never see half a job.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ai_query import DeltaCommitError, storage
from ai_query.sinks import AppTransaction, CommitResult, DeltaCommitter
from pyspark.sql.datasource import DataSourceArrowWriter, WriterCommitMessage
from pyspark.sql.types import StructField, StructType

from ._delta_files import _conform_batch, _ParquetFileWriter, _task_file_prefix, _WrittenFile
from ._delta_table import (
    DeltaWriteError,
    _arrow_schema,
    _as_nullable,
    _check_readable_layout,
    _delete_quietly,
    _filesystem,
    _is_delta_table,
    _join,
    _schema_differences,
    _spark_schema_of,
    _table_uri,
)

if TYPE_CHECKING:
    import pyarrow as pa

SAVE_MODES = ("append", "overwrite", "error", "errorifexists", "ignore")
_TRUE = ("true", "1", "yes")


def _is_true(options: Any, key: str) -> bool:
    return str(options.get(key, "false")).strip().lower() in _TRUE


def _path_option(options: Any) -> str:
    path = options.get("path")
    if not path:
        raise DeltaWriteError(
            "no table path: pass it as df.write.format('delta').save(path) or .option('path', path)"
        )
    return _table_uri(str(path))


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
    txn: AppTransaction | None  # txnAppId + txnVersion
    user_metadata: str | None
    max_records_per_file: int


def _parse_txn(options: Any) -> AppTransaction | None:
    app_id = options.get("txnAppId")
    raw_version = options.get("txnVersion")
    if (app_id is None) != (raw_version is None):
        missing = "txnVersion" if raw_version is None else "txnAppId"
        raise DeltaWriteError(
            f"idempotent writes need both txnAppId and txnVersion; {missing} is missing. "
            "Pass both (e.g. .option('txnAppId', 'job-123').option('txnVersion', 7)) or neither."
        )
    if app_id is None:
        return None
    if not str(app_id).strip():
        raise DeltaWriteError("txnAppId must be a non-empty string, e.g. the job's id")
    try:
        version = int(str(raw_version))
    except ValueError:
        raise DeltaWriteError(f"txnVersion must be an integer >= 0, got {raw_version!r}") from None
    if version < 0:
        raise DeltaWriteError(f"txnVersion must be an integer >= 0, got {version}")
    return AppTransaction(str(app_id), version)


def _parse_mode(options: Any, overwrite: bool) -> str:
    requested = options.get("saveMode")
    if requested is None:
        return "overwrite" if overwrite else "append"
    mode = str(requested).strip().lower()
    if mode not in SAVE_MODES:
        raise DeltaWriteError(f"saveMode {requested!r} is not one of {', '.join(SAVE_MODES)}")
    mode = "error" if mode == "errorifexists" else mode
    if overwrite and mode != "overwrite":
        raise DeltaWriteError(
            f"saveMode {requested!r} contradicts Spark's .mode('overwrite'); "
            "use .mode('append') with the saveMode option, or write_delta(df, path, mode=...)"
        )
    return mode


def _plan_write(options: Any, data_schema: StructType, overwrite: bool) -> _WritePlan:
    """Validate mode, options and schema on the driver, before any task runs."""
    uri = _path_option(options)
    mode = _parse_mode(options, overwrite)
    txn = _parse_txn(options)
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
        table = storage.delta_table(uri)
        if mode == "error":
            raise DeltaWriteError(
                f"a Delta table already exists at {uri} and saveMode is 'errorifexists'; "
                "use mode 'append' or 'overwrite', or another path"
            )
        if mode == "ignore":
            skip_reason = f"table exists at {uri} and saveMode is 'ignore'"
        if txn is not None:
            done = DeltaCommitter(uri).committed_version(txn.app_id)
            if done is not None and done >= txn.version:
                skip_reason = f"app transaction {txn.app_id!r} is already at version {done} >= {txn.version}"
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
        txn=txn,
        user_metadata=options.get("userMetadata"),
        max_records_per_file=max(0, max_records),
    )


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
            if isinstance(exc, DeltaCommitError):  # the committer's message names the table and the fix
                raise DeltaWriteError(str(exc)) from exc
            raise DeltaWriteError(f"the Delta commit to {self.plan.uri} failed: {exc}") from exc

    def abort(self, messages: list[WriterCommitMessage | None]) -> None:
        self._delete_job_files(_files_of(messages))

    def _commit(self, files: list[_WrittenFile]) -> None:
        from deltalake import Schema
        from deltalake.schema import Field
        from deltalake.transaction import AddAction, create_table_with_add_actions

        plan = self.plan
        if plan.skip_reason is not None:
            self._delete_job_files(files)
            return
        committer = DeltaCommitter(plan.uri)
        table = storage.delta_table(plan.uri) if committer.exists() else None
        missing: list[StructField] = []
        if table is not None:
            # The table may have changed since the plan was made (another job, a retried chunk).
            if plan.mode == "error":
                raise DeltaWriteError(
                    f"a Delta table was created at {plan.uri} while this 'errorifexists' write ran; nothing committed"
                )
            if plan.mode == "ignore":
                self._delete_job_files(files)
                return
            if plan.new_columns:
                have = {f.name.lower() for f in _spark_schema_of(table).fields}
                missing = [f for f in plan.new_columns if f.name.lower() not in have]

        adds = [
            AddAction(f.path, f.size, {}, f.modification_time, True, f.stats) for f in files
        ]
        delta_schema = Schema.from_json(plan.table_schema.json())

        def write(props: Any) -> None:
            if table is None:
                create_table_with_add_actions(plan.uri, delta_schema, adds, mode="error", commit_properties=props,
                                              storage_options=storage.delta_options(plan.uri))
                return
            if not plan.table_existed:
                conflicts, extra = _schema_differences(_spark_schema_of(table), plan.table_schema)
                if plan.mode == "append" and (conflicts or extra):
                    raise DeltaWriteError(
                        f"a Delta table with another schema was created at {plan.uri} while this write ran: "
                        f"{'; '.join(conflicts + [f.name for f in extra])}; nothing committed, retry the write"
                    )
            if plan.mode == "overwrite":
                schema = delta_schema if plan.replace_schema or not plan.table_existed else table.schema()
                table.create_write_transaction(adds, mode="overwrite", schema=schema, commit_properties=props)
                return
            current = table
            if missing:
                # delta-rs cannot change the schema inside an append, so mergeSchema costs one
                # extra (metadata-only) commit; a retry after a crash here finds the columns.
                current.alter.add_columns([Field.from_json(json.dumps(f.jsonValue())) for f in missing])
                current = storage.delta_table(plan.uri)
            if adds or plan.txn is not None:
                current.create_write_transaction(adds, mode="append", schema=current.schema(), commit_properties=props)

        # An append of no files to an existing table changes nothing: unless a transaction is to be
        # recorded, there is nothing to commit. Creating or overwriting a table always commits.
        changes = table is None or plan.mode == "overwrite" or bool(adds) or bool(missing)
        custom = {"userMetadata": plan.user_metadata} if plan.user_metadata else None
        result = committer.commit_once(plan.txn, write, changes=changes, custom_metadata=custom)
        if result is CommitResult.ALREADY_COMMITTED:
            self._delete_job_files(files)

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
        if not _is_delta_table(uri):
            return False
        import pyarrow as pa

        paths = set(pa.table(storage.delta_table(uri).get_add_actions(flatten=False)).column("path").to_pylist())
    except Exception:  # noqa: BLE001 - if unsure, keep the files: orphans are harmless, holes are not
        return True
    return any(f.path in paths for f in files)
