"""A Spark session sized for this project, and what a session can reach (classic or Spark Connect).

``build_session`` binds to 127.0.0.1 only for ``local[*]`` masters: on a cluster master the
executors live on other hosts and must reach the driver at an address of its own
(``SPARK_LOCAL_IP`` / ``spark.driver.host``, else Spark's choice). The Spark UI is on unless asked
(``ui=False``): it is how users watch stages, on a laptop as on a cluster.

The driver-side services (the quota broker with its concurrency leases, the progress collector)
listen where executors can reach them (``services_host``): ``AIQ_DRIVER_HOST`` when set, else
127.0.0.1 for a ``local[*]`` master, else ``spark.driver.host``. A Spark Connect client is not
the driver: the executors belong to a server that may sit in another network (Databricks
serverless), so there the services start only when ``AIQ_DRIVER_HOST`` names an address of the
client that the executors reach; otherwise each task keeps its static ``1/workers`` share of
every quota and concurrency limit (see ``spark_udfs.register``). A loopback address for a master
on another host is refused at once (``check_reachable``): it would otherwise show as executors
that never register, or as a broker nobody calls. tests/cluster/test_netns_cluster.py runs the
master, workers, driver and endpoint in network namespaces of their own to keep this honest.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Mapping
from urllib.parse import urlsplit

from ai_query import ConfigError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


def build_session(master: str | None = None, app_name: str = "ai-query", *, ui: bool = True, **conf: str) -> "SparkSession":
    """Return a (possibly existing) SparkSession for ``master`` (default ``local[2]``).

    The Python workers must run the interpreter that has this project installed, so
    ``PYSPARK_PYTHON`` defaults to ``sys.executable``. The settings come from ``session_conf``;
    ``conf`` overrides them. ``ui=False`` turns the Spark UI off (it is on, at port 4040 or the
    next free one, for users watching stages); Spark's console progress bar stays off, as
    ``spark_udfs.sql(..., progress=True)`` shows rows, tokens and concurrency instead.
    """
    master = master or os.environ.get("AIQ_SPARK_MASTER", "local[2]")
    if is_local_master(master):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    # pandas 3 works for everything ai-query does; pyspark's blanket warning is only noise.
    warnings.filterwarnings("ignore", message="PySpark does not yet fully support pandas", category=FutureWarning)
    builder = SparkSession.builder.master(master).appName(app_name)
    for key, value in session_conf(master, os.environ, ui=ui).items():
        builder = builder.config(key, value)
    for key, value in conf.items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    return session


def session_conf(master: str, env: Mapping[str, str], *, ui: bool = True) -> dict[str, str]:
    """``build_session``'s Spark settings for ``master``: loopback only for ``local[*]``; the UI unless ``ui=False``.

    ``spark.driver.host`` (where executors reach the driver) is ``AIQ_DRIVER_HOST``, else
    ``SPARK_LOCAL_IP``, else 127.0.0.1 for a local master; a cluster master without either keeps
    Spark's own choice (this host's name).
    """
    local = is_local_master(master)
    log4j = Path(__file__).with_name("log4j2.properties")
    conf = {
        "spark.ui.enabled": "true" if ui else "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.shuffle.partitions": "4",
        "spark.python.worker.reuse": "true",
        "spark.sql.session.timeZone": "UTC",
        "spark.driver.extraJavaOptions": f"-Dlog4j2.configurationFile=file:{log4j}",
        "spark.executor.extraJavaOptions": f"-Dlog4j2.configurationFile=file:{log4j}",
    }
    source = next((name for name in ("AIQ_DRIVER_HOST", "SPARK_LOCAL_IP") if (env.get(name) or "").strip()), None)
    host = (env.get(source) or "").strip() if source else ""
    if host:
        check_reachable(master, host, source or "")
    if host or local:
        conf["spark.driver.host"] = host or "127.0.0.1"
    return conf


def check_reachable(master: str | None, host: str, source: str) -> None:
    """Refuse a loopback driver address (``host``, read from ``source``) for a master on another host.

    Executors on other machines cannot reach 127.0.0.1 of the driver: Spark would wait for
    executors that never register, and the quota broker and progress collector would go unheard
    (each task keeping its static share). A cluster whose master is on this host's loopback too
    (a standalone cluster on a laptop, the tests) is fine.
    """
    if master is None or is_local_master(master) or not _is_loopback(host):
        return
    master_host = _master_host(master)
    if master_host is not None and _is_loopback(master_host):
        return
    raise ConfigError(
        f"{source}={host} is a loopback address, but the master {master} runs its executors on other hosts, which "
        "cannot reach the driver (nor its quota broker and progress collector) there; set AIQ_DRIVER_HOST (or "
        "SPARK_LOCAL_IP) to an address of this host that the executors reach, or unset both to let Spark choose")


def _is_loopback(host: str) -> bool:
    name = host.strip().strip("[]").lower()
    return name in ("localhost", "::1", "ip6-localhost") or name.startswith("127.")


def _master_host(master: str) -> str | None:
    """The host of a ``spark://`` (first of a list) or ``k8s://`` master URL; None for others (``yarn``)."""
    for scheme in ("spark://", "k8s://"):
        if master.startswith(scheme):
            rest = master[len(scheme):].split(",")[0]
            return urlsplit(rest if "://" in rest else f"//{rest}").hostname
    return None


def is_local_master(master: str | None) -> bool:
    """True for ``local``, ``local[N]``, ``local[*]`` and ``local[N,F]``: every process on this host."""
    return master is not None and (master == "local" or master.startswith("local["))


def is_connect(spark: "SparkSession") -> bool:
    """True for a Spark Connect session (no SparkContext, no JVM on this side)."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


def services_host(spark: "SparkSession") -> str | None:
    """The address the driver-side services bind and announce to executors, or None: none can be reached.

    ``AIQ_DRIVER_HOST`` wins; a Connect client without it starts none (its executors may not
    reach it); a ``local[*]`` master uses 127.0.0.1; a cluster master ``spark.driver.host``.
    """
    configured = os.environ.get("AIQ_DRIVER_HOST", "").strip()
    if configured:
        if not is_connect(spark):
            check_reachable(spark.conf.get("spark.master", None), configured, "AIQ_DRIVER_HOST")
        return configured
    if is_connect(spark):
        return None
    if is_local_master(spark.conf.get("spark.master", None)):
        return "127.0.0.1"
    return spark.conf.get("spark.driver.host", None) or "127.0.0.1"


def worker_environment(spark: "SparkSession", name: str) -> list[str | None]:
    """The values of environment variable ``name`` that Spark's Python workers of ``spark`` start with.

    Every worker is started by a JVM and inherits its environment: the driver's JVM (Delta data
    source planning and commits, and the executors of a ``local[*]`` master) and, on a cluster,
    the executors' (``spark.executorEnv.<name>``). Empty for a Spark Connect session (not knowable)."""
    if is_connect(spark):
        return []
    values = [spark.sparkContext._jvm.java.lang.System.getenv(name)]  # type: ignore[union-attr]
    if not is_local_master(spark.conf.get("spark.master", None)):
        values.append(spark.conf.get(f"spark.executorEnv.{name}", None))
    return values


def default_parallelism(spark: "SparkSession") -> int:
    """How many tasks run at once: ``defaultParallelism``; on Connect, the partitions of a default range."""
    if not is_connect(spark):
        return int(spark.sparkContext.defaultParallelism)
    # A range without numPartitions is split into spark.sql.leafNodeDefaultParallelism, by default
    # the server's defaultParallelism; 65,536 rows leave no partition empty.
    row = spark.sql("SELECT count(DISTINCT p) AS n FROM (SELECT spark_partition_id() AS p FROM range(65536))").first()
    return max(1, int(row["n"])) if row is not None else 1
