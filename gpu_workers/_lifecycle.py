"""The lifecycle of a process this one owns (a server's supervisor, a pool's manager).

- **start** from one long-lived launcher thread: ``PR_SET_PDEATHSIG`` is tied to the *thread*
  that forked the child, and ``ai_query`` asks for servers from short-lived executor threads, so
  a child forked from one of those would be told its parent died as soon as that thread exits;
- **wait ready**: poll a readiness check until it passes, the process exits, or a deadline;
- **stop** with escalation (SIGTERM, ``grace`` seconds, SIGKILL): ``ai_query.process.stop_process``.

A forked child (a Spark Python worker) owns none of its parent's processes or threads.
"""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from gpu_workers._server_options import _HOST


def _free_port() -> int:
    """A port free on 127.0.0.1 now (another program may still take it before the server binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return sock.getsockname()[1]


class _LauncherThread:
    """Forks every owned process (a server's supervisor, a pool's manager) from one long-lived daemon thread.

    ``PR_SET_PDEATHSIG`` is tied to the *thread* that forked the child: a supervisor forked
    from a thread-pool thread would be told its parent died as soon as that thread exits
    (``loop.run_in_executor`` threads do), and would stop a healthy server. This thread lives
    until the process exits, which is exactly the lifetime we want to tie servers to.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="aiq-server-launcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            fn, fut = self._jobs.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:  # handed to the caller, who re-raises it
                fut.set_exception(exc)

    def call(self, fn: Callable[[], Any]) -> Any:
        fut: Future = Future()
        self._jobs.put((fn, fut))
        return fut.result()


_lock = threading.RLock()
_launcher: _LauncherThread | None = None


def _reset_after_fork() -> None:
    """A forked child owns none of its parent's threads."""
    global _launcher, _lock
    _launcher = None
    _lock = threading.RLock()


os.register_at_fork(after_in_child=_reset_after_fork)


def _get_launcher() -> _LauncherThread:
    global _launcher
    with _lock:
        if _launcher is None or _launcher.pid != os.getpid():
            _launcher = _LauncherThread()
        return _launcher


def wait_ready(proc: subprocess.Popen, ready: Callable[[], bool], deadline: float, interval: float = 0.5) -> bool:
    """Poll ``ready()`` until it passes (True) or ``proc`` exits (False, ``proc.returncode`` says how).

    Raises ``TimeoutError`` once ``time.monotonic()`` passes ``deadline``.
    """
    while True:
        if proc.poll() is not None:
            return False
        if time.monotonic() > deadline:
            raise TimeoutError
        if ready():
            return True
        time.sleep(interval)
