"""A tiny supervisor that runs one model server and guarantees it never outlives its owner.

Started by ``gpu_workers._server`` as::

    python -m gpu_workers._supervisor --owner-pid PID [--grace S] -- python -m vllm... --port N

Why a separate process rather than starting vLLM directly: vLLM's API server spawns an engine
process (and that one a worker), and none of them die when the Python process that asked for
the server dies, least of all on SIGKILL. The supervisor closes that gap:

- it receives ``SIGTERM`` when its owner dies (``PR_SET_PDEATHSIG``, set by the owner in
  ``preexec_fn`` and set again here), and also polls ``getppid()`` as a second line of defence;
- it runs the server in a new session, so the whole tree shares one process group that can be
  signalled at once, and it is a child subreaper, so descendants that escape the group are
  reparented to it and can still be found and reaped;
- on ``SIGTERM``/``SIGINT``/``SIGHUP``, owner death or the server's own exit, it sends
  ``SIGTERM`` to the group, waits ``--grace`` seconds, then ``SIGKILL``s whatever is left.

The server gets ``PR_SET_PDEATHSIG(SIGTERM)`` too, so even a ``SIGKILL`` of the supervisor
itself makes the server shut down its engine.

Only the standard library is used: this must start fast and import nothing heavy.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int


def set_parent_death_signal(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``sig`` to this process when the thread that forked it exits.

    Safe to call between fork and exec (``preexec_fn``): ``_prctl`` is resolved at import time,
    so the child only makes a plain libc call.
    """
    _prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def _log(message: str) -> None:
    sys.stderr.write(f"[aiq-supervisor {os.getpid()}] {message}\n")
    sys.stderr.flush()


def _children_of(pid: int) -> list[int]:
    """Direct children of ``pid``, read from /proc (no psutil: this process must stay light)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read().decode(errors="replace")
        except OSError:
            continue
        # the command name (field 2) may contain spaces and parentheses: split after the last ')'
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry))
    return out


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    frontier = [pid]
    while frontier:
        kids = [k for p in frontier for k in _children_of(p)]
        found.extend(kids)
        frontier = kids
    return found


def _reap() -> None:
    """Collect exited children (we are a subreaper, so orphans of the server land here)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_all(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    for pid in _descendants(os.getpid()):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _shutdown(child: subprocess.Popen, grace: float) -> None:
    """SIGTERM the server's group and our descendants; SIGKILL what survives ``grace`` seconds."""
    pgid = child.pid
    _signal_all(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap()
        if not _group_alive(pgid) and not _descendants(os.getpid()):
            return
        time.sleep(0.1)
    _log(f"server did not stop within {grace:.0f}s of SIGTERM; sending SIGKILL")
    _signal_all(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and (_group_alive(pgid) or _descendants(os.getpid())):
        _reap()
        time.sleep(0.05)
    _reap()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpu_workers._supervisor")
    parser.add_argument("--owner-pid", type=int, required=True, help="the process whose death stops the server")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    parser.add_argument("--key", default="", help="the server key (lets callers recognise this process)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the server command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no server command given after --")

    set_parent_death_signal(signal.SIGTERM)
    _prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    # The owner may have died between fork and the prctl above: then nobody will signal us.
    if os.getppid() != args.owner_pid:
        _log(f"owner {args.owner_pid} is gone before start-up; not starting the server")
        return 1

    stop_reason: list[str] = []

    def on_signal(signum: int, _frame: object) -> None:
        stop_reason.append(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)

    child = subprocess.Popen(
        command,
        start_new_session=True,  # own session and process group: one killpg reaches the tree
        preexec_fn=lambda: set_parent_death_signal(signal.SIGTERM),
    )
    _log(f"started server pid {child.pid} for owner {args.owner_pid}: {' '.join(command[:4])} ...")
    exit_code = 0
    while True:
        if stop_reason:
            _log(f"received {stop_reason[0]}; stopping the server")
            break
        if os.getppid() != args.owner_pid:
            _log(f"owner {args.owner_pid} died; stopping the server")
            break
        try:
            code = child.wait(timeout=0.25)
        except subprocess.TimeoutExpired:
            continue
        except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for clarity
            continue
        _log(f"server exited on its own with code {code}")
        exit_code = code if code and code > 0 else 1
        break
    # Signals during shutdown must not interrupt the cleanup.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    _shutdown(child, args.grace)
    try:
        child.wait(timeout=1)
    except (subprocess.TimeoutExpired, ChildProcessError, OSError) as exc:
        if getattr(exc, "errno", None) not in (None, errno.ECHILD):
            raise
    _log("server stopped")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
