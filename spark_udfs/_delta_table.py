"""What the delta-rs data source's reader and writer share: table paths, filesystems, schemas,
table-feature checks and the two typed errors.

Paths are made absolute on the driver, because executors and Spark's planner workers may not
share its working directory. Delta's schema JSON is Spark's ``StructType`` JSON, so schemas move
between the two without a mapping table; Arrow schemas of the data files store timestamps as UTC
instants. Column mapping and deletion vectors are refused, not misread: plain parquet reads would
return the wrong columns or deleted rows.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from ai_query import AIQueryError, DeltaCommitError
from pyspark.sql.types import ArrayType, DataType, MapType, StructField, StructType

if TYPE_CHECKING:
    import pyarrow as pa


class DeltaWriteError(DeltaCommitError):
    """A Delta write was refused or failed: mode, schema, options or the commit itself."""


class DeltaReadError(AIQueryError):
    """A Delta table cannot be read by the delta-rs data source (missing, or an unsupported feature)."""


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
    from ai_query import storage

    return storage.filesystem(uri)  # one filesystem per bucket, reused across files and tasks


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def _is_delta_table(uri: str) -> bool:
    from ai_query.sinks import DeltaCommitter

    return DeltaCommitter(uri).exists()


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
    from ._types import arrow_schema

    return arrow_schema(schema)


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


def _delete_quietly(fs: Any, path: str) -> None:
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass
    except OSError:
        pass  # an unreferenced file is harmless to readers; VACUUM removes it later
