"""A Spark session sized for this project: the venv's Python on the workers, loopback, the Spark UI unless asked."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


def build_session(master: str | None = None, app_name: str = "ai-query", *, ui: bool = True, **conf: str) -> "SparkSession":
    """Return a (possibly existing) SparkSession for ``master`` (default ``local[2]``).

    The Python workers must run the interpreter that has this project installed, so
    ``PYSPARK_PYTHON`` defaults to ``sys.executable``; Spark binds to 127.0.0.1 unless
    ``SPARK_LOCAL_IP`` says otherwise. ``ui=False`` turns the Spark UI off (it is on, at port 4040
    or the next free one, for users watching stages); Spark's console progress bar stays off, as
    ``spark_udfs.sql(..., progress=True)`` shows rows, tokens and concurrency instead.
    """
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    # pandas 3 works for everything ai-query does; pyspark's blanket warning is only noise.
    warnings.filterwarnings("ignore", message="PySpark does not yet fully support pandas", category=FutureWarning)
    log4j = Path(__file__).with_name("log4j2.properties")
    builder = (
        SparkSession.builder.master(master or os.environ.get("AIQ_SPARK_MASTER", "local[2]"))
        .appName(app_name)
        .config("spark.ui.enabled", "true" if ui else "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.python.worker.reuse", "true")
        .config("spark.driver.host", os.environ["SPARK_LOCAL_IP"])
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.driver.extraJavaOptions", f"-Dlog4j2.configurationFile=file:{log4j}")
        .config("spark.executor.extraJavaOptions", f"-Dlog4j2.configurationFile=file:{log4j}")
    )
    for key, value in conf.items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    return session
