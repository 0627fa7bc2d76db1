"""Shared fixtures: one local Spark session per test session (it takes 8-10 s to start)."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

import pytest

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Secrets are read where requests are sent, i.e. in Spark's Python workers, which inherit the
# environment of the JVM at start-up: set the simulator's key before the session starts.
os.environ.setdefault("AIQ_SECRET_SIM_KEY", "sk-sim")
# The serving state seals plaintext keys with a key file outside the state dir: one per test
# session (its processes inherit it), not the user's ~/.config/ai-query/serving-state.key.
_STATE_KEY_DIR = tempfile.mkdtemp(prefix="aiq-tests-")
atexit.register(shutil.rmtree, _STATE_KEY_DIR, True)
os.environ.setdefault("AIQ_SERVING_STATE_KEY", os.path.join(_STATE_KEY_DIR, "serving-state.key"))
# Object storage tests talk to an S3 server (moto) on 127.0.0.1 that ``s3_server`` starts on
# demand; the address is set now for the same reason as the key above (and so that no test
# ever reaches a real AWS account). pyarrow.fs and delta-rs both read these variables.
from tests.s3_server import s3_environment  # noqa: E402

os.environ.update(s3_environment())


@pytest.fixture(scope="session")
def s3_server():
    """The S3 server (``tests.s3_server.S3Server``) at ``AWS_ENDPOINT_URL``, started once per session."""
    from tests.s3_server import S3Server

    with S3Server(os.environ["AWS_ENDPOINT_URL"]) as server:
        yield server


@pytest.fixture(scope="session")
def azurite():
    """An Azure Blob endpoint (``tests.azurite_server.AzuriteServer``: Azurite, from npm), started once per session."""
    from tests.azurite_server import AzuriteServer

    with AzuriteServer() as server:
        yield server


@pytest.fixture(scope="session")
def spark():
    from spark_udfs._session import build_session

    session = build_session(app_name="ai-query-tests", ui=False)  # tests need no UI (and no port of its own)
    yield session
    session.stop()


_ENGINE_MARKERS = ("vllm.entrypoints.openai.api_server", "gpu_workers._pool_manager", "gpu_workers._supervisor",
                   "gpu_workers._embed_server")
# Every process this session starts inherits the tag (servers, pools, CLI-started detached pools
# included), so the end-of-session check finds its own processes and never another session's.
_SESSION_TAG = f"AIQ_TEST_SESSION={os.getpid()}-{os.urandom(4).hex()}"
os.environ["AIQ_TEST_SESSION"] = _SESSION_TAG.split("=", 1)[1]


def _engine_processes_of_this_session() -> list[tuple[int, str]]:
    """Model servers and pool managers started (directly or not) by this test session."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().decode(errors="replace").split("\0")
            if not any(m in cmd for m in _ENGINE_MARKERS):
                continue
            with open(f"/proc/{entry}/environ", "rb") as fh:
                tagged = _SESSION_TAG.encode() in fh.read().split(b"\0")
        except OSError:
            continue
        if tagged:
            out.append((int(entry), " ".join(cmd)[:160]))
    return out


def pytest_sessionfinish(session, exitstatus):
    """No engine process may outlive the test session: stop what the session owns, then look."""
    try:
        import gpu_workers
    except ImportError:
        return
    gpu_workers.stop_pools(owned_only=True)
    gpu_workers.stop_local_servers(owned_only=True)
    left = _engine_processes_of_this_session()
    if left:
        import signal

        for pid, _ in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        sys.stderr.write(f"\nERROR: {len(left)} engine process(es) outlived the test session (killed now):\n"
                         + "\n".join(f"  pid {pid}: {cmd}" for pid, cmd in left) + "\n")
        session.exitstatus = 1
