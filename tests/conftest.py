"""Shared fixtures: one local Spark session per test session (it takes 8-10 s to start)."""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Secrets are read where requests are sent, i.e. in Spark's Python workers, which inherit the
# environment of the JVM at start-up: set the simulator's key before the session starts.
os.environ.setdefault("AIQ_SECRET_SIM_KEY", "sk-sim")


@pytest.fixture(scope="session")
def spark():
    from spark_udfs._session import build_session

    session = build_session(app_name="ai-query-tests")
    yield session
    session.stop()
