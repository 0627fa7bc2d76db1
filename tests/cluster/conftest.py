"""A real Spark standalone cluster on 127.0.0.1: one master and two workers (1 core, 1 GiB each),
started from the pyspark installation's jars and stopped (process groups killed) at the end."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from tests.cluster._standalone import spark_home, stop_all, wait_for


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _java(spark_home: Path, cls: str, *args: str, log: Path, env: dict) -> subprocess.Popen:
    cmd = ["java", "-Xmx512m", "-cp", f"{spark_home}/jars/*", cls, *args]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


@pytest.fixture(scope="session")
def standalone_cluster(tmp_path_factory):
    """``spark://127.0.0.1:PORT`` of a master with two registered workers; yields (url, work dir)."""
    root = tmp_path_factory.mktemp("cluster")
    home, scala = spark_home(root)
    env = dict(os.environ, SPARK_HOME=str(home), SPARK_LOCAL_IP="127.0.0.1", SPARK_SCALA_VERSION=scala)
    procs: list[subprocess.Popen] = []
    try:
        port = _free_port()
        master = _java(home, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port),
                       "--webui-port", str(_free_port()), log=root / "master.log", env=env)
        procs.append(master)
        wait_for(root / "master.log", r"Starting Spark master at (spark://\S+)", master)
        url = f"spark://127.0.0.1:{port}"
        for i in range(2):
            work = root / f"worker{i}"
            work.mkdir()
            worker = _java(home, "org.apache.spark.deploy.worker.Worker", url, "--host", "127.0.0.1", "--cores", "1",
                           "--memory", "1g", "--webui-port", str(_free_port()), "--work-dir", str(work),
                           log=root / f"worker{i}.log", env=env)
            procs.append(worker)
        for i in range(2):
            wait_for(root / f"worker{i}.log", r"Successfully registered with master", procs[i + 1])
        yield url, root
    finally:
        stop_all(procs)
