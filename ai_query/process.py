"""Processes we start and must not leave behind: /proc reads, parent-death signals, process groups,
and one way to stop a process (SIGTERM, a grace period, then SIGKILL).

Local model servers, vLLM pools and the serving endpoint's workers all run child processes whose
own children (vLLM's engine core and workers) do not die with them. The pieces that close that gap
are here once:

- ``proc_stat`` reads ``/proc/<pid>/stat`` (state, parent, start time) by splitting after the
  *last* ``)``: the command name in field 2 may contain spaces and parentheses. ``pid:start-time``
  (``process_identity``) names a process where a pid alone may be reused.
- ``set_parent_death_signal`` asks the kernel to signal this process when the *thread* that
  forked it exits (``PR_SET_PDEATHSIG``). It is safe in a ``preexec_fn``: ``prctl`` is resolved
  at import, so the child makes one libc call. There is a window between fork and the ``prctl``:
  ``die_with_parent`` closes it by checking ``getppid()`` right after.
- A child started with ``start_new_session=True`` leads its own process group, so one ``killpg``
  reaches the whole tree; a child subreaper (``become_subreaper``) also finds and reaps
  descendants that escaped the group.
- ``stop_process`` is the one escalation: SIGTERM (to the process or its group), wait ``grace``
  seconds, SIGKILL, wait a little more.

Linux first, as the rest of the engine stack: without ``/proc`` the readers return ``None`` (or
the pid alone), without ``prctl`` the parent-death signal is a no-op and the owner's own SIGTERM
is the only stop. Standard library only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Callable

__all__ = [
    "ProcStat", "become_subreaper", "children_of", "cmdline", "descendants", "die_with_parent", "group_alive",
    "is_gone", "proc_stat", "process_identity", "process_state", "reap_children", "set_parent_death_signal",
    "signal_group", "stop_process", "tree_rss_bytes", "wait_until",
]

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def _load_prctl() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl: Any = libc.prctl
    except (OSError, AttributeError):  # not Linux
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


_prctl = _load_prctl()


# --------------------------------------------------------------------------- /proc


@dataclass(frozen=True)
class ProcStat:
    """The fields of ``/proc/<pid>/stat`` we use."""

    state: str
    """``R`` running, ``S`` sleeping, ``Z`` zombie, ``X`` dead, ..."""
    ppid: int
    start_time: int
    """Clock ticks since boot (field 22): with the pid, a name no later process reuses."""


def proc_stat(pid: int) -> ProcStat | None:
    """``pid``'s stat, or ``None`` if it does not exist (or there is no ``/proc``)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rpartition(b")")[2].split()
        return ProcStat(fields[0].decode(), int(fields[1]), int(fields[19]))
    except (OSError, IndexError, ValueError):
        return None


def process_state(pid: int) -> str | None:
    """``pid``'s state letter (``Z``: a zombie), or ``None`` if it does not exist."""
    stat = proc_stat(pid)
    return None if stat is None else stat.state


def is_gone(pid: int) -> bool:
    """No such process, or only its zombie is left."""
    return process_state(pid) in (None, "Z", "X")


def cmdline(pid: int) -> bytes:
    """``pid``'s NUL-separated command line; empty if it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def process_identity(pid: int | None = None) -> str:
    """``pid:start-time`` of a process (this one by default): unlike a pid, never reused."""
    pid = os.getpid() if pid is None else pid
    stat = proc_stat(pid)
    return str(pid) if stat is None else f"{pid}:{stat.start_time}"  # no /proc (not Linux): the pid alone


def children_of(pid: int) -> list[int]:
    """Live (not zombie) direct children of ``pid``, read from /proc (no psutil: supervisors stay light)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat is not None and stat.ppid == pid and stat.state != "Z":
                out.append(int(entry))
    return out


def descendants(pid: int) -> list[int]:
    """Live descendants of ``pid``, children first."""
    found: list[int] = []
    frontier = [pid]
    while frontier:
        kids = [k for p in frontier for k in children_of(p)]
        found.extend(kids)
        frontier = kids
    return found


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and its descendants (a server, vLLM's engine and worker)."""
    total = 0
    page = os.sysconf("SC_PAGE_SIZE")
    for p in [pid, *descendants(pid)]:
        try:
            with open(f"/proc/{p}/statm") as fh:
                total += int(fh.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            pass
    return total


# --------------------------------------------------------------------------- parent death, reaping


def set_parent_death_signal(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``sig`` to this process when the thread that forked it exits.

    Safe to call between fork and exec (``preexec_fn``): ``prctl`` was resolved at import time.
    """
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def die_with_parent(parent: int, sig: int = signal.SIGTERM) -> bool:
    """``set_parent_death_signal(sig)``; False if ``parent`` already exited before it took effect."""
    set_parent_death_signal(sig)
    return os.getppid() == parent


def become_subreaper() -> None:
    """Orphaned descendants are re-parented to this process (so they can be found and reaped)."""
    if _prctl is not None:
        _prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def reap_children() -> None:
    """Collect every exited child without blocking (a subreaper inherits other processes' orphans)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


# --------------------------------------------------------------------------- groups, stopping


def signal_group(pgid: int, sig: int) -> None:
    """``killpg`` that ignores a group already gone (or not ours to signal)."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` exists (one we may not signal counts)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_until(done: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Poll ``done`` until it is true (True) or ``timeout`` seconds have passed (False)."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def stop_process(pid: int, grace: float, *, proc: subprocess.Popen | None = None, group: bool = False,
                 kill_wait: float = 5.0) -> bool:
    """SIGTERM ``pid`` (its process group with ``group``), SIGKILL it if still there after ``grace``.

    ``proc`` (our own ``Popen`` of ``pid``) is polled, which also reaps it; without it the process
    counts as gone once only its zombie is left. With ``group`` every member of the group must be
    gone. Returns True if it stopped within ``grace``, False if it took a SIGKILL.
    """

    def gone() -> bool:
        leader_gone = proc.poll() is not None if proc is not None else is_gone(pid)
        return leader_gone and not (group and group_alive(pid))

    def send(sig: int) -> None:
        if group:
            signal_group(pid, sig)
        else:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    send(signal.SIGTERM)
    if wait_until(gone, grace):
        return True
    send(signal.SIGKILL)
    wait_until(gone, kill_wait, 0.05)
    return False
