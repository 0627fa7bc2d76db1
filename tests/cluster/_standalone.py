"""What both cluster tests need to run Spark's standalone daemons from the pyspark wheel."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest


def spark_home(root: Path) -> tuple[Path, str]:
    """A SPARK_HOME under ``root`` over the installed pyspark, and its Scala version.

    The wheel has jars/ and bin/ but no RELEASE file, without which Spark's launcher (used by the
    worker to start executors) looks for a source build: the home made here has one.
    """
    import pyspark

    installed = Path(pyspark.__file__).parent
    home = root / "spark-home"
    home.mkdir()
    for name in ("jars", "bin", "python"):
        if (installed / name).exists():
            (home / name).symlink_to(installed / name)
    (home / "RELEASE").write_text(f"Spark {pyspark.__version__} (pyspark wheel)\n")
    scala = next((j.name.split("_")[1].split("-")[0] for j in (installed / "jars").glob("spark-core_*.jar")), "2.13")
    return home, scala


def wait_for(log: Path, pattern: str, proc: subprocess.Popen, timeout: float = 180) -> re.Match:
    """The first match of ``pattern`` in ``log``; fails the test when ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, log.read_text(errors="replace")) if log.exists() else None
        if m:
            return m
        if proc.poll() is not None:
            pytest.fail(f"{' '.join(map(str, proc.args))[:200]} exited early ({proc.returncode}): "
                        f"{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"no {pattern!r} in {log} after {timeout} s: {log.read_text(errors='replace')[-3000:]}")


def stop_all(procs: list[subprocess.Popen]) -> None:
    """Kill each process's group, last started first (a worker's executors die with it)."""
    for proc in reversed(procs):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
