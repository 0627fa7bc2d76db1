"""Delta Lake I/O for Spark without the Delta jars: a Spark Python Data Source over delta-rs.

Spark's own Delta connector comes from Maven, which these machines cannot reach (ENVIRONMENT.md,
"Delta"). This module gives Spark a ``format("delta")`` anyway, built on Spark's Python Data Source
API and ``deltalake`` (delta-rs):

* **write**: every Spark task streams its Arrow batches into parquet file(s) directly under the
  table path and returns the file's add-action (size, stats); the driver then makes exactly **one**
  Delta commit for the whole job with delta-rs's low-level transaction API. A failed job commits
  nothing and its files are deleted, so readers never see a half-written job.
* **idempotency**: ``txnAppId`` / ``txnVersion`` record a Delta app transaction in the same commit,
  through the core's one committer (``ai_query.sinks.DeltaCommitter``). A write whose
  ``(app_id, version)`` is not newer than what the table already holds is skipped and its files
  deleted, so a retried job chunk never double-writes (the same option names as Spark's native
  Delta writer, so callers work with either backend).
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

This module is the face (the data source class, ``register_delta``, ``write_delta``,
``read_delta``); the work lives beside it: ``_delta_table`` (paths, schemas, feature checks, the
errors), ``_delta_write`` (driver plan and commit), ``_delta_files`` (the parquet files a task
writes, with their stats), ``_delta_read`` (snapshot files grouped into tasks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ai_query import recover_error
from ai_query.sinks import DeltaCommitter
from pyspark.sql.datasource import DataSource, DataSourceArrowWriter, DataSourceReader
from pyspark.sql.types import StructType

from ._delta_read import _load_table, _plan_read
from ._delta_table import DeltaReadError, DeltaWriteError, _is_delta_table, _spark_schema_of, _table_uri
from ._delta_write import SAVE_MODES, _DeltaArrowWriter, _plan_write

if TYPE_CHECKING:
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
        return _plan_read(self.options, schema)

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
    merge_schema: bool = False,
) -> None:
    """Write ``df`` to the Delta table at ``path`` in one commit, optionally idempotently.

    ``mode`` is one of append, overwrite, error/errorifexists, ignore. With ``txn_app_id`` and
    ``txn_version`` the commit records that app transaction, and a write whose version is not newer
    than the table's is skipped (check :func:`delta_txn_version` first to avoid even computing
    ``df``). ``merge_schema``: columns of ``df`` the table lacks are added to it (Delta's
    ``mergeSchema``). Raises :class:`DeltaWriteError` naming the problem and the fix.
    """
    normalized = mode.strip().lower()
    if normalized not in SAVE_MODES:
        raise DeltaWriteError(f"mode {mode!r} is not one of {', '.join(SAVE_MODES)}")
    if (txn_app_id is None) != (txn_version is None):
        raise DeltaWriteError("pass both txn_app_id and txn_version, or neither")
    backend = register_delta(df.sparkSession)
    writer = df.write.format("delta")
    if txn_app_id is not None:
        writer = writer.option("txnAppId", txn_app_id).option("txnVersion", str(int(txn_version)))  # type: ignore[arg-type]
    if merge_schema:
        writer = writer.option("mergeSchema", "true")
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
    return DeltaCommitter(_table_uri(path)).committed_version(app_id)
