"""A tiny supervisor that runs one model server and guarantees it never outlives its owner.

Started by ``gpu_workers._local_servers`` as::

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

Only the standard library and ``ai_query.process`` (the one copy of the /proc, prctl and
process-group helpers) are used: this must start fast and import nothing heavy.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import subprocess
import sys

from ai_query.process import (
    become_subreaper,
    descendants,
    die_with_parent,
    group_alive,
    reap_children,
    set_parent_death_signal,
    signal_group,
    wait_until,
)


def _log(message: str) -> None:
    sys.stderr.write(f"[aiq-supervisor {os.getpid()}] {message}\n")
    sys.stderr.flush()


def _signal_all(pgid: int, sig: int) -> None:
    """The server's group, and our descendants that escaped it (we are their subreaper)."""
    signal_group(pgid, sig)
    for pid in descendants(os.getpid()):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _all_gone(pgid: int) -> bool:
    reap_children()
    return not group_alive(pgid) and not descendants(os.getpid())


def _shutdown(child: subprocess.Popen, grace: float) -> None:
    """SIGTERM the server's group and our descendants; SIGKILL what survives ``grace`` seconds."""
    pgid = child.pid
    _signal_all(pgid, signal.SIGTERM)
    if wait_until(lambda: _all_gone(pgid), grace):
        return
    _log(f"server did not stop within {grace:.0f}s of SIGTERM; sending SIGKILL")
    _signal_all(pgid, signal.SIGKILL)
    wait_until(lambda: _all_gone(pgid), 5.0, 0.05)
    reap_children()


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

    become_subreaper()
    # The owner may have died between fork and the prctl: then nobody will signal us.
    if not die_with_parent(args.owner_pid):
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
