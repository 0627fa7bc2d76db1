"""The read side of the delta-rs data source: the files of one snapshot, read with pyarrow on the executors.

The driver loads the snapshot (latest, ``versionAsOf`` or ``timestampAsOf``), refuses table
features plain parquet reads would get wrong, and packs the snapshot's files in order into groups
of at most ``maxPartitionBytes``, one Spark task each. A task conforms every file to the schema
Spark asked for: columns matched by name, partition values as constants, columns added after a
file was written as nulls.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from pyspark.sql.datasource import DataSourceReader, InputPartition
from pyspark.sql.types import StructType

from ._delta_table import DeltaReadError, _arrow_schema, _check_readable_layout, _filesystem, _is_delta_table, _table_uri

if TYPE_CHECKING:
    import pyarrow as pa

_DEFAULT_MAX_PARTITION_BYTES = 128 * 1024 * 1024
_READ_BATCH_ROWS = 65_536


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


def _load_table(options: Any) -> tuple[Any, str]:
    from ai_query import storage

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
    table = storage.delta_table(uri)
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


def _plan_read(options: Any, schema: StructType) -> _DeltaReader:
    """The reader of the snapshot the options name, its files grouped into Spark partitions."""
    table, uri = _load_table(options)
    raw = options.get("maxPartitionBytes", _DEFAULT_MAX_PARTITION_BYTES)
    try:
        max_bytes = max(1, int(str(raw)))
    except ValueError:
        raise DeltaReadError(f"maxPartitionBytes must be an integer number of bytes, got {raw!r}") from None
    return _DeltaReader(schema, _group_files(_snapshot_files(table, uri), max_bytes))
