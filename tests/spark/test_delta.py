"""Delta I/O through the delta-rs Python data source, on real tables in tmp dirs.

Every test reads the real table back twice: with delta-rs itself (``DeltaTable``, what other Delta
readers see) and with ``spark.read.format("delta")`` (our reader).
"""

from __future__ import annotations

import base64
import json
import os
import struct
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable
from pyspark.sql import functions as F
from pyspark.sql.datasource import CaseInsensitiveDict
from pyspark.sql.types import (
    ArrayType,
    BooleanType,
    DoubleType,
    FloatType,
    LongType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from spark_udfs._delta import (
    _JVM_DELTA_CLASS,
    DeltaDataSource,
    DeltaReadError,
    DeltaWriteError,
    _jvm_has_class,
    delta_txn_version,
    read_delta,
    register_delta,
    write_delta,
)

pytestmark = pytest.mark.spark

RESULT = StructType([StructField("response", StringType()), StructField("errorMessage", StringType())])
SCHEMA = StructType(
    [
        StructField("id", LongType()),
        StructField("prompt", StringType()),
        StructField("score", DoubleType()),
        StructField("ok", BooleanType()),
        StructField("ts", TimestampType()),
        StructField("embedding", ArrayType(FloatType())),
        StructField("result", RESULT),
    ]
)
T0 = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone.utc)


def _rows(n: int, start: int = 0) -> list[tuple]:
    """Rows with every type of SCHEMA, and a null in every column somewhere."""
    rows = []
    for i in range(start, start + n):
        rows.append(
            (
                i,
                None if i % 5 == 3 else f"prompt {i}",
                None if i % 5 == 4 else i / 4,
                None if i % 5 == 2 else i % 2 == 0,
                None if i % 5 == 1 else T0.replace(second=i % 60),
                None if i % 5 == 0 else [float(i), 0.5, None],
                None if i % 7 == 6 else (f"answer {i}", None if i % 3 else f"error {i}"),
            )
        )
    return rows


def _parquet_files(path: Path) -> set[str]:
    """Data files physically present under the table root (not just the ones the log references)."""
    if not path.exists():
        return set()
    return {p.name for p in path.iterdir() if p.name.endswith(".parquet")}


def _committed_files(path: Path) -> set[str]:
    return {os.path.basename(u) for u in DeltaTable(str(path)).file_uris()}


def _ids_delta_rs(path: Path, version: int | None = None) -> list[int]:
    return sorted(DeltaTable(str(path), version=version).to_pyarrow_table().column("id").to_pylist())


def _ids_spark(spark, path: Path, version: int | None = None) -> list[int]:
    return sorted(r.id for r in read_delta(spark, str(path), version=version).select("id").collect())


def _log_actions(path: Path, version: int) -> list[dict]:
    text = (path / "_delta_log" / f"{version:020d}.json").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def delta(spark):
    assert register_delta(spark) == "delta-rs"
    return spark


@pytest.fixture(scope="module")
def sample(delta):
    return delta.createDataFrame(_rows(20), SCHEMA)


def test_register_delta_is_idempotent_and_picks_delta_rs_without_the_jars(delta):
    assert register_delta(delta) == "delta-rs"
    assert register_delta(delta) == "delta-rs"
    # the probe itself works: it finds a class the JVM has and not the Delta connector it lacks
    assert _jvm_has_class(delta, "org.apache.spark.sql.execution.datasources.parquet.ParquetFileFormat")
    assert not _jvm_has_class(delta, _JVM_DELTA_CLASS)


def test_roundtrip_of_every_column_type_in_one_commit(delta, sample, tmp_path):
    path = tmp_path / "t"
    write_delta(sample.repartition(3), str(path))

    table = DeltaTable(str(path))
    assert table.version() == 0
    assert len(table.history()) == 1
    assert len(_committed_files(path)) == 3  # one file per task, one commit for all of them
    assert _parquet_files(path) == _committed_files(path)

    expected = sorted(_rows(20))
    got = table.to_pyarrow_table().sort_by("id").to_pylist()
    assert [
        (
            r["id"],
            r["prompt"],
            r["score"],
            r["ok"],
            r["ts"],
            r["embedding"],
            None if r["result"] is None else (r["result"]["response"], r["result"]["errorMessage"]),
        )
        for r in got
    ] == expected
    arrow_schema = pa.schema(table.schema().to_arrow())
    assert arrow_schema.field("ts").type == pa.timestamp("us", tz="UTC")
    assert arrow_schema.field("embedding").type.value_type == pa.float32()

    back = read_delta(delta, str(path))
    assert back.schema == SCHEMA  # all nullable, like Spark's own Delta writer makes them
    spark_rows = sorted(tuple(r) for r in back.collect())
    # Spark hands timestamps back as naive datetimes in the session time zone (UTC here).
    naive = [tuple(v.replace(tzinfo=None) if isinstance(v, datetime) else v for v in row) for row in expected]
    assert [tuple(tuple(v) if hasattr(v, "asDict") else v for v in row) for row in spark_rows] == naive


def test_add_actions_carry_record_counts_and_exact_bounds(delta, sample, tmp_path):
    path = tmp_path / "t"
    write_delta(sample.repartition(3), str(path))
    adds = [a["add"] for a in _log_actions(path, 0) if "add" in a]
    stats = [json.loads(a["stats"]) for a in adds]
    assert sum(s["numRecords"] for s in stats) == 20
    assert min(s["minValues"]["id"] for s in stats) == 0
    assert max(s["maxValues"]["id"] for s in stats) == 19
    assert sum(s["nullCount"]["prompt"] for s in stats) == 4
    # timestamps are widened to whole milliseconds so the bounds still contain every value
    assert all(s["minValues"]["ts"].endswith(".123Z") and s["maxValues"]["ts"].endswith(".124Z") for s in stats)
    assert all(a["partitionValues"] == {} and a["dataChange"] for a in adds)


def test_append_adds_a_version_and_overwrite_replaces_the_content(delta, tmp_path):
    path = tmp_path / "t"
    write_delta(delta.createDataFrame(_rows(5), SCHEMA), str(path))
    write_delta(delta.createDataFrame(_rows(5, start=5), SCHEMA), str(path), mode="append")
    assert DeltaTable(str(path)).version() == 1
    assert _ids_delta_rs(path) == _ids_spark(delta, path) == list(range(10))
    before = _committed_files(path)

    write_delta(delta.createDataFrame(_rows(3, start=100), SCHEMA).repartition(2), str(path), mode="overwrite")

    table = DeltaTable(str(path))
    assert table.version() == 2
    assert _ids_delta_rs(path) == _ids_spark(delta, path) == [100, 101, 102]
    removed = {a["remove"]["path"] for a in _log_actions(path, 2) if "remove" in a}
    assert removed == before  # the old files are removed logically, in the same commit
    assert table.history(1)[0]["operationParameters"]["mode"] == "Overwrite"


def test_same_app_transaction_is_committed_once(delta, tmp_path):
    path = tmp_path / "t"
    chunk = delta.createDataFrame(_rows(4), SCHEMA).repartition(2)
    write_delta(chunk, str(path), txn_app_id="job-123", txn_version=7)
    assert delta_txn_version(str(path), "job-123") == 7
    txns = [a["txn"] for a in _log_actions(path, 0) if "txn" in a]
    assert [(t["appId"], t["version"]) for t in txns] == [("job-123", 7)]
    files = _parquet_files(path)

    write_delta(chunk, str(path), txn_app_id="job-123", txn_version=7)  # a retried chunk
    write_delta(chunk, str(path), txn_app_id="job-123", txn_version=3)  # an older one

    assert DeltaTable(str(path)).version() == 0
    assert _parquet_files(path) == files  # nothing stray left behind
    assert _ids_delta_rs(path) == _ids_spark(delta, path) == [0, 1, 2, 3]

    write_delta(delta.createDataFrame(_rows(2, start=4), SCHEMA), str(path), txn_app_id="job-123", txn_version=8)
    write_delta(delta.createDataFrame(_rows(1, start=6), SCHEMA), str(path), txn_app_id="other-job", txn_version=0)
    assert DeltaTable(str(path)).version() == 2
    assert delta_txn_version(str(path), "job-123") == 8
    assert delta_txn_version(str(path), "other-job") == 0
    assert delta_txn_version(str(path), "never") is None
    assert delta_txn_version(str(tmp_path / "no-table"), "job-123") is None
    assert _ids_delta_rs(path) == _ids_spark(delta, path) == list(range(7))


def test_commit_skips_when_the_same_transaction_landed_while_tasks_ran(delta, tmp_path):
    """The driver re-checks the app transaction at commit time and deletes the files it no longer needs."""
    path = tmp_path / "t"
    write_delta(delta.createDataFrame(_rows(2), SCHEMA), str(path))
    options = CaseInsensitiveDict({"path": str(path), "txnAppId": "job", "txnVersion": "1"})
    writer = DeltaDataSource(options).writer(SCHEMA, overwrite=False)

    batch = pa.RecordBatch.from_pylist(
        [{"id": 99, "prompt": "late"}], schema=pa.schema([("id", pa.int64()), ("prompt", pa.string())])
    )
    message = writer.write(iter([batch]))  # a task's work, run here so the race is deterministic
    assert len(message.files) == 1 and message.files[0].path in _parquet_files(path)

    write_delta(delta.createDataFrame(_rows(1, start=10), SCHEMA), str(path), txn_app_id="job", txn_version=1)
    writer.commit([message])

    assert DeltaTable(str(path)).version() == 1
    assert message.files[0].path not in _parquet_files(path)
    assert _parquet_files(path) == _committed_files(path)
    assert _ids_delta_rs(path) == _ids_spark(delta, path) == [0, 1, 10]


def test_a_table_created_with_another_schema_while_tasks_ran_gets_no_commit(delta, tmp_path):
    """The driver re-checks the schema at commit time; the refusal is a DeltaWriteError, itself a
    DeltaCommitError of the core, and the job's files are deleted."""
    from deltalake import write_deltalake

    from ai_query import DeltaCommitError

    path = tmp_path / "t"
    options = CaseInsensitiveDict({"path": str(path), "txnAppId": "job", "txnVersion": "1"})
    writer = DeltaDataSource(options).writer(StructType([StructField("id", LongType())]), overwrite=False)
    message = writer.write(iter([pa.RecordBatch.from_pylist([{"id": 1}], schema=pa.schema([("id", pa.int64())]))]))
    write_deltalake(str(path), pa.table({"id": pa.array(["a"], pa.string())}))  # another writer got there first

    with pytest.raises(DeltaWriteError, match="another schema was created") as caught:
        writer.commit([message])
    assert isinstance(caught.value, DeltaCommitError)
    assert DeltaTable(str(path)).version() == 0 and delta_txn_version(str(path), "job") is None
    assert message.files[0].path not in _parquet_files(path)


def test_a_failing_task_leaves_no_commit_and_no_data_files(delta, tmp_path):
    path = tmp_path / "t"
    write_delta(delta.createDataFrame(_rows(3), SCHEMA), str(path))
    committed = _parquet_files(path)

    @F.udf("long")
    def fail_in_last_partition(partition_id: int, value: int) -> int:
        if partition_id == 2:
            import time

            time.sleep(0.5)  # let the other tasks finish and write their files first
            raise RuntimeError("boom in partition 2")
        return value

    bad = (
        delta.createDataFrame(_rows(30, start=10), SCHEMA)
        .repartition(3)
        .withColumn("id", fail_in_last_partition(F.spark_partition_id(), F.col("id")))
    )
    with pytest.raises(Exception, match="boom in partition 2"):
        write_delta(bad, str(path))

    assert DeltaTable(str(path)).version() == 0
    assert _parquet_files(path) == committed  # abort() deleted what the finished tasks wrote
    assert _ids_delta_rs(path) == _ids_spark(delta, path) == [0, 1, 2]

    new_path = tmp_path / "new"
    with pytest.raises(Exception, match="boom in partition 2"):
        write_delta(bad, str(new_path))
    assert not DeltaTable.is_deltatable(str(new_path))
    assert _parquet_files(new_path) == set()


def test_errorifexists_and_ignore_modes(delta, tmp_path):
    path = tmp_path / "t"
    first = delta.createDataFrame(_rows(2), SCHEMA)
    write_delta(first, str(path), mode="errorifexists")  # no table yet: creates it
    assert DeltaTable(str(path)).version() == 0

    with pytest.raises(DeltaWriteError, match="already exists"):
        write_delta(first, str(path), mode="error")
    with pytest.raises(Exception, match="already exists"):  # the raw option path, checked by the data source
        first.write.format("delta").mode("append").option("saveMode", "errorifexists").save(str(path))

    write_delta(delta.createDataFrame(_rows(2, start=50), SCHEMA), str(path), mode="ignore")
    delta.createDataFrame(_rows(2, start=60), SCHEMA).write.format("delta").mode("append").option(
        "saveMode", "ignore"
    ).save(str(path))
    assert DeltaTable(str(path)).version() == 0
    assert _parquet_files(path) == _committed_files(path)
    assert _ids_delta_rs(path) == _ids_spark(delta, path) == [0, 1]

    other = tmp_path / "ignored-new"
    write_delta(first, str(other), mode="ignore")  # no table yet: ignore still creates it
    assert _ids_delta_rs(other) == [0, 1]

    with pytest.raises(DeltaWriteError, match="'upsert' is not one of"):
        write_delta(first, str(path), mode="upsert")


def test_schema_mismatch_names_the_column_and_the_fix(delta, tmp_path):
    path = tmp_path / "t"
    write_delta(delta.createDataFrame([(1, "a")], "id long, label string"), str(path))

    with pytest.raises(DeltaWriteError, match=r"column 'label': table has string, data has bigint"):
        write_delta(delta.createDataFrame([(2, 5)], "id long, label long"), str(path))
    with pytest.raises(DeltaWriteError, match=r"columns not in the table: extra.*mergeSchema"):
        write_delta(delta.createDataFrame([(2, "b", 1.0)], "id long, label string, extra double"), str(path))
    with pytest.raises(DeltaWriteError, match="overwriteSchema"):
        write_delta(delta.createDataFrame([("x",)], "other string"), str(path), mode="overwrite")
    assert DeltaTable(str(path)).version() == 0
    assert _parquet_files(path) == _committed_files(path)

    # a missing column is filled with nulls and columns match by name, not position
    write_delta(delta.createDataFrame([(2,)], "id long"), str(path))
    write_delta(delta.createDataFrame([("c", 3)], "label string, id long"), str(path))
    assert sorted(DeltaTable(str(path)).to_pyarrow_table().to_pylist(), key=lambda r: r["id"]) == [
        {"id": 1, "label": "a"},
        {"id": 2, "label": None},
        {"id": 3, "label": "c"},
    ]


def test_merge_schema_adds_columns_and_overwrite_schema_replaces_them(delta, tmp_path):
    path = tmp_path / "t"
    write_delta(delta.createDataFrame([(1, "a")], "id long, label string"), str(path))
    (
        delta.createDataFrame([(2, "b", 0.5)], "id long, label string, score double")
        .write.format("delta")
        .mode("append")
        .option("mergeSchema", "true")
        .save(str(path))
    )
    rows = sorted(DeltaTable(str(path)).to_pyarrow_table().to_pylist(), key=lambda r: r["id"])
    assert rows == [{"id": 1, "label": "a", "score": None}, {"id": 2, "label": "b", "score": 0.5}]
    assert [tuple(r) for r in read_delta(delta, str(path)).orderBy("id").collect()] == [(1, "a", None), (2, "b", 0.5)]

    (
        delta.createDataFrame([("x",)], "other string")
        .write.format("delta")
        .mode("overwrite")
        .option("overwriteSchema", "true")
        .save(str(path))
    )
    assert DeltaTable(str(path)).to_pyarrow_table().to_pylist() == [{"other": "x"}]
    assert [tuple(r) for r in read_delta(delta, str(path)).collect()] == [("x",)]


def test_time_travel_reads_an_older_version(delta, tmp_path):
    path = tmp_path / "t"
    write_delta(delta.createDataFrame(_rows(2), SCHEMA), str(path))
    write_delta(delta.createDataFrame(_rows(2, start=2), SCHEMA), str(path))
    write_delta(delta.createDataFrame(_rows(1, start=9), SCHEMA), str(path), mode="overwrite")

    assert _ids_spark(delta, path) == _ids_delta_rs(path) == [9]
    assert _ids_spark(delta, path, version=0) == _ids_delta_rs(path, version=0) == [0, 1]
    assert _ids_spark(delta, path, version=1) == _ids_delta_rs(path, version=1) == [0, 1, 2, 3]
    via_option = delta.read.format("delta").option("versionAsOf", 1).option("path", str(path)).load()
    assert sorted(r.id for r in via_option.collect()) == [0, 1, 2, 3]

    with pytest.raises(DeltaReadError, match=r"versionAsOf=7 is outside the table's versions 0\.\.2"):
        read_delta(delta, str(path), version=7)
    with pytest.raises(DeltaReadError, match="no Delta table"):
        read_delta(delta, str(tmp_path / "missing"))


def test_empty_writes_create_the_table_or_do_nothing(delta, tmp_path):
    path = tmp_path / "t"
    empty = delta.createDataFrame([], SCHEMA)
    write_delta(empty, str(path))
    table = DeltaTable(str(path))
    assert table.version() == 0
    assert table.to_pyarrow_table().num_rows == 0
    assert pa.schema(table.schema().to_arrow()).names == SCHEMA.names
    assert read_delta(delta, str(path)).count() == 0
    assert read_delta(delta, str(path)).schema == SCHEMA

    write_delta(empty, str(path))  # nothing to add and nothing to record: no new version
    assert DeltaTable(str(path)).version() == 0

    write_delta(empty, str(path), txn_app_id="job", txn_version=1)  # but a transaction is recorded
    assert DeltaTable(str(path)).version() == 1
    assert delta_txn_version(str(path), "job") == 1
    assert _parquet_files(path) == set()


def _z85(data: bytes) -> str:
    """Z85 (Delta's inline deletion-vector encoding) is base85 with another alphabet."""
    z85 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
    b85 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz!#$%&()*+-;<=>?@^_`{|}~"
    return base64.b85encode(data).decode().translate(str.maketrans(b85, z85))


def _delete_rows_with_a_deletion_vector(path: Path, rows: list[int]) -> None:
    """Commit an inline deletion vector by hand: delta-rs reads them but never writes them."""
    bitmap = (  # 32-bit roaring bitmap, portable format: one array container
        struct.pack("<IIHHI", 12346, 1, 0, len(rows) - 1, 16) + b"".join(struct.pack("<H", r) for r in rows)
    )
    data = struct.pack("<iqi", 1681511377, 1, 0) + bitmap  # Delta's RoaringBitmapArray: magic, buckets, key
    encoded = _z85(data + b"\0" * (-len(data) % 4))
    (add,) = [a["add"] for a in _log_actions(path, 0) if "add" in a]
    vector = {"storageType": "i", "pathOrInlineDv": encoded, "sizeInBytes": len(data), "cardinality": len(rows)}
    remove = {"path": add["path"], "deletionTimestamp": add["modificationTime"] + 1, "dataChange": True,
              "extendedFileMetadata": True, "partitionValues": {}, "size": add["size"]}
    lines = [{"remove": remove}, {"add": {**add, "deletionVector": vector}}]
    (path / "_delta_log" / f"{1:020d}.json").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_tables_with_deletion_vectors_are_refused_not_misread(delta, tmp_path):
    from deltalake import write_deltalake

    path = tmp_path / "dv"
    table = pa.table({"id": pa.array(range(10), pa.int64())})
    write_deltalake(str(path), table, configuration={"delta.enableDeletionVectors": "true"})
    assert _ids_spark(delta, path) == list(range(10))  # the feature alone is fine: no vectors yet

    _delete_rows_with_a_deletion_vector(path, [0, 1, 2])
    vectors = pa.RecordBatchReader.from_stream(DeltaTable(str(path)).deletion_vectors()).read_all()
    assert vectors.column("selection_vector")[0].as_py()[:4] == [False, False, False, True]  # it is a real one
    with pytest.raises(DeltaReadError, match="deletion vectors"):
        read_delta(delta, str(path))


def test_tables_with_column_mapping_are_refused(delta, tmp_path):
    from deltalake import write_deltalake

    path = tmp_path / "cm"
    write_deltalake(str(path), pa.table({"id": [1, 2]}), configuration={"delta.columnMapping.mode": "name"})
    with pytest.raises(DeltaReadError, match="column mapping"):
        read_delta(delta, str(path))
    with pytest.raises(DeltaWriteError, match="column mapping"):
        write_delta(delta.createDataFrame([(3,)], "id long"), str(path))
