"""One run of a job at a time: a lease in the job's state directory.

Two runs of one job at once (a cron or an Airflow schedule firing while the last run still goes,
a user starting the job by hand meanwhile) would read the same pending keys and both send and pay
for them; the second run's first commit is then refused (delta-rs: the same app transaction), and
its usage rows with it, so the usage table would hold fewer tokens than the endpoint billed.

A run therefore takes ``<state>/run.lock`` before it reads anything or sends a request, and a run
that finds another live run's lock stops at once (:class:`JobRunningError`, naming the holder: run
id, host, pid, when it started, its last heartbeat). The lock is a lease: its holder rewrites it
every ``HEARTBEAT_S`` and removes it when the run ends (finished, failed or stopped by its budget).
A lock is stale, and taken over, when its last heartbeat is older than ``LEASE_S`` (a killed run,
a lost driver), or at once when its holder ran on this host and its process is gone (a run
killed with SIGKILL and started again, as the resume tests do). A run whose lock was taken over
while it was paused (longer than ``LEASE_S`` without a heartbeat) stops before its next chunk.

The lock is created with ``storage.create_exclusive``: locally ``O_EXCL``, so of two runs starting
together one wins. An object store has no exclusive create through ``pyarrow.fs``: a run checks,
puts its lock and reads it back, so of two runs starting within the same few milliseconds both may pass; their chunk
commits then conflict (same app transaction) and one run fails at its first commit, as without a
lock. ``ai-query schedule`` never overlaps its own runs.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from datetime import datetime, timezone
from typing import Any

from ai_query import AIQueryError, get_logger, storage

from ._spec import JobSpec

log = get_logger("batch_runner")

LOCK_NAME = "run.lock"
LEASE_S = 120.0
"""A lock whose last heartbeat is older than this is stale (its run was killed or lost)."""
HEARTBEAT_S = 20.0
"""How often a run rewrites its lock."""


class JobRunningError(AIQueryError):
    """Another run of the same job holds its lock (or took it over from this run)."""


def lock_path(spec: JobSpec) -> str:
    return storage.join(spec.state_path, LOCK_NAME)


def _read(path: str) -> dict[str, Any] | None:
    """The lock's holder (``{}``: a lock that cannot be parsed), ``None`` when there is none."""
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(data)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _process_gone(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process: alive
        return False
    try:  # a zombie (killed, not yet reaped by its parent) is gone too
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def stale_reason(holder: dict[str, Any], now: float | None = None) -> str | None:
    """Why ``holder``'s lock may be taken over (``None``: its run is alive)."""
    now = time.time() if now is None else now
    beat = holder.get("heartbeat")
    if not isinstance(beat, (int, float)):
        return "the lock names no heartbeat"
    if now - beat > LEASE_S:
        return f"its last heartbeat was {now - beat:.0f} s ago (a lease lasts {LEASE_S:.0f} s)"
    if holder.get("host") == socket.gethostname() and _process_gone(holder.get("pid")):
        return f"its process {holder.get('pid')} on this host is gone"
    return None


def _describe(holder: dict[str, Any], now: float) -> str:
    beat = holder.get("heartbeat")
    seen = f"{now - beat:.0f} s ago" if isinstance(beat, (int, float)) else "never"
    return (f"run {holder.get('run_id', '?')} (host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"started {holder.get('started', '?')}, last heartbeat {seen})")


def lock_holder(spec: JobSpec) -> dict[str, Any] | None:
    """The run that holds ``spec``'s lock (``None``: no lock): its record, with ``description``
    (run, host, pid, start, last heartbeat) and ``stale`` (why the next run may take it over,
    ``None`` while its run is alive). For ``ai-query status``."""
    holder = _read(lock_path(spec))
    if holder is None:
        return None
    now = time.time()
    return {**holder, "description": _describe(holder, now), "stale": stale_reason(holder, now)}


class RunLock:
    """The lock of one run of ``spec``: :meth:`acquire` it, :meth:`check` it before each chunk,
    :meth:`release` it when the run ends (``with RunLock.acquire(...)`` does the last)."""

    def __init__(self, spec: JobSpec, run_id: str) -> None:
        self.spec = spec
        self.run_id = run_id
        self.path = lock_path(spec)
        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None

    def _record(self) -> bytes:
        return json.dumps({"run_id": self.run_id, "job": self.spec.name, "host": socket.gethostname(), "pid": os.getpid(),
                           "started": self.started, "heartbeat": time.time()}).encode()

    def _refuse(self, holder: dict[str, Any]) -> JobRunningError:
        return JobRunningError(
            f"job {self.spec.name!r} is being run by {_describe(holder, time.time())}, which holds {self.path}; "
            f"two runs at once would send and pay for the same rows. Wait for that run to end (`ai-query status` shows "
            f"it), or, if it is dead, run again after its lease expires ({LEASE_S:.0f} s after its last heartbeat) or "
            f"delete {self.path}. No request was sent")

    @classmethod
    def acquire(cls, spec: JobSpec, run_id: str) -> "RunLock":
        lock = cls(spec, run_id)
        lock._take()
        lock._thread = threading.Thread(target=lock._beat, name="aiq-run-lock", daemon=True)
        lock._thread.start()
        return lock

    def _take(self) -> None:
        holder = _read(self.path)
        if holder is None:
            if storage.create_exclusive(self.path, self._record()):
                if storage.is_remote(self.path):
                    self._confirm()  # not atomic there: another run may have put its lock meanwhile
                return
            holder = _read(self.path) or {}  # another run created it between the read and ours
        reason = stale_reason(holder)
        if reason is None:
            raise self._refuse(holder)
        log.warning("job %s: taking over the lock of %s: %s", self.spec.name, _describe(holder, time.time()), reason)
        storage.write_bytes(self.path, self._record())
        self._confirm()

    def _confirm(self) -> None:
        """Read the lock back: a run that wrote after this one holds it."""
        mine = _read(self.path)
        if not mine or mine.get("run_id") != self.run_id:
            raise self._refuse(mine or {})

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                holder = _read(self.path)
                if holder is not None and holder.get("run_id") != self.run_id:
                    self.lost = f"{_describe(holder, time.time())} took over {self.path}"
                    log.error("job %s run %s: %s; this run stops before its next chunk", self.spec.name, self.run_id, self.lost)
                    return
                storage.write_bytes(self.path, self._record())
            except OSError as exc:  # the store is unreachable for a moment: the next beat tries again
                log.warning("job %s: the run lock %s could not be renewed: %s", self.spec.name, self.path, exc)

    def check(self) -> None:
        """Raise if another run took the lock over (this run was paused past its lease)."""
        if self.lost:
            raise JobRunningError(f"job {self.spec.name!r} run {self.run_id} stopped: {self.lost} while this run was "
                                  f"paused for more than the {LEASE_S:.0f} s lease; its committed chunks stay, the other "
                                  "run does the rest")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            holder = _read(self.path)
            if holder is not None and holder.get("run_id") == self.run_id:
                storage.remove(self.path)
        except OSError as exc:  # a lock left behind expires with its lease (or its process is gone)
            log.warning("job %s: the run lock %s could not be removed: %s", self.spec.name, self.path, exc)

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


__all__ = ["HEARTBEAT_S", "LEASE_S", "JobRunningError", "RunLock", "lock_holder", "lock_path", "stale_reason"]
