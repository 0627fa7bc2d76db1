"""ai_query through a Spark Connect session: a real Connect server started from the pyspark install.

The server is a separate JVM (``spark-submit --class ...SparkConnectServer``, local[2]) on a free
port of 127.0.0.1; this process is only a Connect client, as on Databricks serverless or a shared
cluster: no SparkContext, no JVM on this side. pyspark builds UDFs and columns for the mode its
process is in (``SPARK_CONNECT_MODE_ENABLED``, which ``SparkSession.builder.remote`` sets); the
module sets it for its own tests and removes it after, since the classic session of
``tests/conftest.py`` may live in the same pytest process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import spark_udfs
from ai_query import ArgumentError, EndpointRegistry
from ai_query.testing import ProviderSimulator

from .test_ai_query_sql import sim_endpoint

CONNECT_CLASS = "org.apache.spark.sql.connect.service.SparkConnectServer"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spark_home() -> Path:
    import pyspark

    home = Path(pyspark.__file__).parent
    if not list((home / "jars").glob("spark-connect_*.jar")):
        pytest.fail(f"no spark-connect jar in {home / 'jars'}: pyspark >= 4.0 ships it; reinstall pyspark")
    return home


@pytest.fixture(scope="module")
def connect_url(tmp_path_factory):
    home = _spark_home()
    port = _free_port()
    log = tmp_path_factory.mktemp("connect") / "server.log"
    env = {**os.environ, "SPARK_HOME": str(home), "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1"}
    env.pop("SPARK_CONNECT_MODE_ENABLED", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(home / "bin" / "spark-submit"), "--master", "local[2]", "--class", CONNECT_CLASS,
             "--conf", f"spark.connect.grpc.binding.port={port}", "--conf", "spark.connect.grpc.binding.address=127.0.0.1",
             "--conf", "spark.ui.enabled=false", "--conf", "spark.python.worker.reuse=true", "spark-internal"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the Spark Connect server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the Spark Connect server did not listen on {port} in 180 s:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield f"sc://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own process group: spark-submit and the JVM it started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def remote(connect_url):
    from pyspark.sql.connect.session import SparkSession as ConnectSession

    # what SparkSession.builder.remote(url) sets for a Connect-only process
    os.environ["SPARK_CONNECT_MODE_ENABLED"] = "1"
    session = ConnectSession.builder.remote(connect_url).getOrCreate()
    try:
        yield session
    finally:
        session.stop()
        os.environ.pop("SPARK_CONNECT_MODE_ENABLED", None)


@pytest.fixture(scope="module")
def sim():
    with ProviderSimulator(api_key="sk-sim", latency_s=0.05) as simulator:
        yield simulator


@pytest.fixture(scope="module")
def registry(sim):
    return EndpointRegistry.builtin().with_endpoints(EndpointRegistry.from_data([
        sim_endpoint(sim, "sim-chat", "llm/v1/chat"),
        sim_endpoint(sim, "sim-embed", "llm/v1/embeddings"),
        sim_endpoint(sim, "sim-capped", "llm/v1/chat", max_concurrency=4, initial_concurrency=4),
    ]))


@pytest.fixture(scope="module")
def aispark(remote, registry):
    spark_udfs.register(remote, registry, task_endpoints={"ai_gen": "sim-chat"})
    remote.createDataFrame([(i, f"review number {i}") for i in range(20)], "id INT, text STRING").createOrReplaceTempView("reviews")
    return remote


@pytest.fixture(autouse=True)
def fresh_counts(sim):
    sim.reset()


def test_the_session_is_a_connect_client(aispark):
    assert spark_udfs.is_connect(aispark)
    with pytest.raises(Exception, match="JVM_ATTRIBUTE_NOT_SUPPORTED"):
        aispark.sparkContext  # noqa: B018 - what every sparkContext use of ours would meet


def test_string_results_through_the_sql_rewrite(aispark, sim):
    rows = aispark.sql("""
        SELECT id, ai_query('sim-chat', CONCAT('Classify: ', text),
                            modelParameters => named_struct('max_tokens', 64, 'temperature', 0.0)) AS r
        FROM reviews
    """).collect()
    assert sorted((r.id, r.r) for r in rows) == [(i, f"echo: Classify: review number {i}") for i in range(20)]
    assert sim.stats.requests == 20


def test_typed_return_type_and_fail_on_error_false(aispark):
    df = aispark.sql("""
        SELECT ai_query('sim-chat', '[[reply:0.75]] score', returnType => 'FLOAT') AS f,
               ai_query('sim-chat', '[[reply:{"city": "Paris", "n": 3}]] q', returnType => 'STRUCT<city: STRING, n: INT>',
                        failOnError => false) AS s,
               ai_query('sim-chat', '[[status:400]] bad', failOnError => false) AS bad
    """)
    assert df.schema["bad"].dataType.simpleString() == "struct<response:string,errorMessage:string>"
    row = df.collect()[0]
    assert row.f == pytest.approx(0.75)
    assert row.s.response.city == "Paris" and row.s.response.n == 3 and row.s.errorMessage is None
    assert row.bad.response is None and "HTTP 400" in row.bad.errorMessage


def test_arguments_are_checked_on_the_client_before_any_task(aispark, sim):
    with pytest.raises(ArgumentError, match="failOnError must be true or false"):
        aispark.sql("SELECT ai_query('sim-chat', 'x', failOnError => 'no') AS r")
    assert sim.stats.requests == 0


def test_a_task_function(aispark, sim):
    row = aispark.sql("SELECT ai_gen('Write a one-line greeting.') AS g").collect()[0]
    assert row.g.startswith("echo: ") and "Write a one-line greeting." in row.g
    assert sim.stats.requests == 1


def test_dataframe_api(aispark, sim):
    from pyspark.sql import functions as F

    from spark_udfs import ai_query

    out = aispark.table("reviews").where("id < 4").select(
        "id",
        ai_query("sim-chat", F.col("text"), modelParameters={"max_tokens": 3}).alias("short"),
        ai_query("sim-chat", "text", failOnError=False).alias("safe"),
        ai_query("sim-embed", "text").alias("vec"),
    )
    rows = {r.id: r for r in out.collect()}
    assert sorted(rows) == [0, 1, 2, 3]
    assert rows[2].short == "echo: review number"
    assert rows[2].safe.response == "echo: review number 2" and rows[2].safe.errorMessage is None
    assert len(rows[2].vec) == 8


def test_delta_write_and_read_through_the_data_source(aispark, tmp_path):
    from deltalake import DeltaTable

    path = str(tmp_path / "answers")
    answers = aispark.sql("SELECT id, ai_query('sim-chat', text) AS r FROM reviews WHERE id < 5")
    spark_udfs.write_delta(answers, path, mode="overwrite")
    assert DeltaTable(path).version() == 0  # one commit, read back by delta-rs itself
    back = spark_udfs.read_delta(aispark, path)
    assert sorted((r.id, r.r) for r in back.collect()) == [(i, f"echo: review number {i}") for i in range(5)]


def test_without_a_driver_each_worker_keeps_its_static_share(aispark, sim):
    """A Connect client is no driver: no quota broker starts (AIQ_DRIVER_HOST unset), and a lone
    worker keeps 1/workers (here 1/2) of the endpoint's max_concurrency of 4, never more."""
    state = spark_udfs._state(aispark)  # noqa: SLF001
    assert state.quota_broker is None and state.quota_share == pytest.approx(0.5)
    aispark.range(60).coalesce(1).selectExpr("CONCAT('item ', id) AS p").createOrReplaceTempView("items")
    rows = aispark.sql("SELECT ai_query('sim-capped', p) AS r FROM items").collect()
    assert len(rows) == 60 and all(r.r.startswith("echo: item ") for r in rows)
    assert 1 <= sim.stats.peak_concurrency <= 2


def test_aiq_driver_host_starts_the_broker_on_the_client(aispark, registry, sim):
    """Where the executors can reach the client (here every process is on 127.0.0.1), AIQ_DRIVER_HOST
    says so: the broker starts there and the tasks lease from it."""
    os.environ["AIQ_DRIVER_HOST"] = "127.0.0.1"
    try:
        spark_udfs.register(aispark, registry, task_endpoints={"ai_gen": "sim-chat"})
        broker = spark_udfs._state(aispark).quota_broker  # noqa: SLF001
        assert broker is not None and broker.address[0] == "127.0.0.1"
        rows = aispark.sql("SELECT ai_query('sim-capped', p) AS r FROM items").collect()
        assert len(rows) == 60 and sim.stats.peak_concurrency <= 4
    finally:
        os.environ.pop("AIQ_DRIVER_HOST", None)
        spark_udfs.register(aispark, registry, task_endpoints={"ai_gen": "sim-chat"})


def test_files_reach_the_provider_and_a_string_column_is_refused_by_the_udf(aispark):
    """No analyzer on a Connect client: the UDF itself checks the files column's type."""
    import hashlib

    pdf = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
    aispark.createDataFrame([(0, pdf, "text")], "id INT, content BINARY, label STRING").createOrReplaceTempView("files_t")
    row = aispark.sql("SELECT ai_query('sim-chat', 'Describe this file.', files => content) AS r FROM files_t").collect()[0]
    assert row.r == f"echo: Describe this file.\n[application/pdf {len(pdf)} bytes sha256:{hashlib.sha256(pdf).hexdigest()[:8]}]"
    with pytest.raises(Exception, match="BINARY or ARRAY<BINARY>"):
        aispark.sql("SELECT ai_query('sim-chat', 'x', files => label) AS r FROM files_t").collect()


def test_register_refuses_a_connect_session_while_pyspark_is_in_classic_mode(aispark, registry):
    os.environ.pop("SPARK_CONNECT_MODE_ENABLED", None)
    try:
        with pytest.raises(ArgumentError, match=r"builder\.remote"):
            spark_udfs.register(aispark, registry)
    finally:
        os.environ["SPARK_CONNECT_MODE_ENABLED"] = "1"
        spark_udfs.register(aispark, registry, task_endpoints={"ai_gen": "sim-chat"})
