"""A real Spark standalone cluster on 127.0.0.1: one master and two workers (1 core, 1 GiB each),
started from the pyspark installation's jars and stopped (process groups killed) at the end."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _java(spark_home: Path, cls: str, *args: str, log: Path, env: dict) -> subprocess.Popen:
    cmd = ["java", "-Xmx512m", "-cp", f"{spark_home}/jars/*", cls, *args]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait_for(path: Path, pattern: str, proc: subprocess.Popen, timeout: float = 180) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, path.read_text(errors="replace")) if path.exists() else None
        if m:
            return m
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[4]} exited early: {path.read_text()[-2000:]}")
        time.sleep(0.2)
    pytest.fail(f"no {pattern!r} in {path} after {timeout} s: {path.read_text()[-2000:]}")


@pytest.fixture(scope="session")
def standalone_cluster(tmp_path_factory):
    """``spark://127.0.0.1:PORT`` of a master with two registered workers; yields (url, work dir)."""
    import pyspark

    root = tmp_path_factory.mktemp("cluster")
    # The wheel has jars/ and bin/ but no RELEASE file, without which Spark's launcher (used by the
    # worker to start executors) looks for a source build: give it a SPARK_HOME that has one.
    installed = Path(pyspark.__file__).parent
    spark_home = root / "spark-home"
    spark_home.mkdir()
    for name in ("jars", "bin", "python"):
        if (installed / name).exists():
            (spark_home / name).symlink_to(installed / name)
    (spark_home / "RELEASE").write_text(f"Spark {pyspark.__version__} (pyspark wheel)\n")
    scala = next((j.name.split("_")[1].split("-")[0] for j in (installed / "jars").glob("spark-core_*.jar")), "2.13")
    env = dict(os.environ, SPARK_HOME=str(spark_home), SPARK_LOCAL_IP="127.0.0.1", SPARK_SCALA_VERSION=scala)
    procs: list[subprocess.Popen] = []
    try:
        port = _free_port()
        master = _java(spark_home, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port),
                       "--webui-port", str(_free_port()), log=root / "master.log", env=env)
        procs.append(master)
        _wait_for(root / "master.log", r"Starting Spark master at (spark://\S+)", master)
        url = f"spark://127.0.0.1:{port}"
        for i in range(2):
            work = root / f"worker{i}"
            work.mkdir()
            worker = _java(spark_home, "org.apache.spark.deploy.worker.Worker", url, "--host", "127.0.0.1", "--cores", "1",
                           "--memory", "1g", "--webui-port", str(_free_port()), "--work-dir", str(work),
                           log=root / f"worker{i}.log", env=env)
            procs.append(worker)
        for i in range(2):
            _wait_for(root / f"worker{i}.log", r"Successfully registered with master", procs[i + 1])
        yield url, root
    finally:
        for proc in reversed(procs):  # each in its own group: the worker's executors die with it
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)
