"""The parquet files a write task streams under the table root, each with its Delta stats.

A task writes its Arrow batches, conformed to the table's schema by column name, into one or more
parquet files named ``part-<task>-<write id>-<uuid>``; the write id lets the driver find and
delete a failed job's files. Each file's add-action carries Delta stats (record count, null
counts, min/max), so readers that skip files by stats stay correct: only bounds that stay exact
are recorded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from ._delta_table import DeltaWriteError, _delete_quietly, _join

if TYPE_CHECKING:
    import pyarrow as pa

# Delta's stats convention: long strings are not worth a min/max (and a truncated max would be wrong).
_MAX_STRING_STAT_CHARS = 32


@dataclass(frozen=True)
class _WrittenFile:
    """One parquet file a task wrote, with what the driver needs for its Delta add-action."""

    path: str  # relative to the table root, as Delta's add.path
    size: int
    modification_time: int  # ms since the epoch
    num_records: int
    stats: str  # Delta stats JSON


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


def _task_file_prefix() -> str:
    from pyspark import TaskContext

    ctx = TaskContext.get()
    return f"{ctx.partitionId():05d}" if ctx is not None else "driver"
