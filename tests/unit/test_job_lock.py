"""One run of a job at a time: the run lock in the job's state directory (local paths)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from batch_runner import JobRunningError, JobSpec
from batch_runner import _job_lock
from batch_runner._job_lock import LEASE_S, RunLock, lock_path

SPEC = '''name = "nightly"
key = ["id"]
query = "SELECT id, ai_query('e', text) AS answer FROM t"
[sources]
t = "t"
[output]
path = "{out}"
mode = "merge"
'''


def _spec(tmp_path, out: str = "out") -> JobSpec:
    (tmp_path / "j.toml").write_text(SPEC.format(out=out))
    return JobSpec.load(tmp_path / "j.toml")


def _holder(spec: JobSpec) -> dict:
    return json.loads(open(lock_path(spec), "rb").read())


def test_a_second_run_is_refused_while_the_first_holds_the_lock_and_may_run_after(tmp_path):
    spec = _spec(tmp_path)
    with RunLock.acquire(spec, "run-1"):
        held = _holder(spec)
        assert held["run_id"] == "run-1" and held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        with pytest.raises(JobRunningError) as refused:
            RunLock.acquire(spec, "run-2")
        message = str(refused.value)
        for part in ("job 'nightly' is being run by run run-1", f"pid {os.getpid()}", lock_path(spec), "No request was sent"):
            assert part in message, message
        assert _holder(spec)["run_id"] == "run-1"  # the refused run left the lock alone
    assert not os.path.exists(lock_path(spec))  # released
    with RunLock.acquire(spec, "run-2"):
        assert _holder(spec)["run_id"] == "run-2"


def test_the_lock_of_a_killed_run_on_this_host_is_taken_over_at_once(tmp_path):
    spec = _spec(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    child.kill()
    child.wait()
    os.makedirs(os.path.dirname(lock_path(spec)), exist_ok=True)
    with open(lock_path(spec), "w") as fh:
        json.dump({"run_id": "killed", "host": socket.gethostname(), "pid": child.pid, "heartbeat": time.time()}, fh)
    with RunLock.acquire(spec, "run-2"):
        assert _holder(spec)["run_id"] == "run-2"


def test_a_lock_is_stale_when_its_heartbeat_is_older_than_the_lease(tmp_path):
    spec = _spec(tmp_path)
    os.makedirs(os.path.dirname(lock_path(spec)), exist_ok=True)
    other = {"run_id": "elsewhere", "host": "another-host", "pid": 1, "heartbeat": time.time() - 10}
    with open(lock_path(spec), "w") as fh:
        json.dump(other, fh)
    with pytest.raises(JobRunningError, match="host another-host"):  # a live run on another host
        RunLock.acquire(spec, "run-2")
    other["heartbeat"] = time.time() - LEASE_S - 5
    with open(lock_path(spec), "w") as fh:
        json.dump(other, fh)
    with RunLock.acquire(spec, "run-2"):  # its driver was lost: the lease ran out
        assert _holder(spec)["run_id"] == "run-2"


def test_the_heartbeat_renews_the_lock_and_a_run_taken_over_stops(tmp_path, monkeypatch):
    monkeypatch.setattr(_job_lock, "HEARTBEAT_S", 0.05)
    spec = _spec(tmp_path)
    lock = RunLock.acquire(spec, "run-1")
    first = _holder(spec)["heartbeat"]
    deadline = time.monotonic() + 10
    while _holder(spec)["heartbeat"] == first and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _holder(spec)["heartbeat"] > first
    lock.check()  # still ours
    # another run took the job over (this one was paused past its lease)
    with open(lock_path(spec), "w") as fh:
        json.dump({"run_id": "run-2", "host": "another-host", "pid": 1, "heartbeat": time.time()}, fh)
    while lock.lost is None and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(JobRunningError, match="run-1 stopped: run run-2 .* took over"):
        lock.check()
    lock.release()
    assert _holder(spec)["run_id"] == "run-2"  # not ours: left alone


def test_status_names_the_run_going_now_and_a_lock_a_killed_run_left(tmp_path):
    # mutations caught: the run going now listed as 'interrupted' (what status said before: the
    # refusal told the user to look there); a stale lock shown as a run going now
    from batch_runner._job_lock import lock_holder
    from batch_runner._job_state import JobStatus

    spec = _spec(tmp_path)
    runs = [{"run_id": "old", "started": "2026-12-01T02:00:00", "status": "running"},
            {"run_id": "run-1", "started": "2026-12-05T02:00:00", "status": "running"}]

    def render() -> str:
        return JobStatus("nightly", 3, 0, 5, runs, 0, 0, 0, None, lock=lock_holder(spec)).render()

    assert lock_holder(spec) is None and "running now" not in render()
    with RunLock.acquire(spec, "run-1"):
        text = render()
        assert f"running now   run run-1 (host {socket.gethostname()}, pid {os.getpid()}" in text, text
        assert [line.split()[1] for line in text.splitlines() if line.startswith("    2026-")] == ["interrupted", "running"]
    held = {"run_id": "run-1", "host": "elsewhere", "pid": 1, "started": "x", "heartbeat": time.time() - LEASE_S - 5}
    with open(lock_path(spec), "w") as fh:
        json.dump(held, fh)
    text = render()
    assert "running now" not in text and "lock          left by run run-1 (host elsewhere" in text, text
    assert "stale (its last heartbeat was" in text and "the next run takes it over" in text
    assert [line.split()[1] for line in text.splitlines() if line.startswith("    2026-")] == ["interrupted", "interrupted"]
