"""``ai-query serve --workers N``: N server processes on one port, and the supervisor that runs them.

One event loop serves at most about 1 / (CPU per request) requests per second (~0.5 ms: ~2,000
req/s on one core), so a server with more cores runs several. The supervisor (the process you
start) reserves the port, creates the shared control file (``_shared.SharedControl``: rate-limit
counters and the endpoints' change counter), starts the workers and waits until each says it is
ready, then prints the URL:

- **one port**: every worker binds the port with ``SO_REUSEPORT`` and the kernel spreads new
  connections over them; the supervisor holds the port bound but not listening, so it keeps it
  between worker restarts and takes no connections itself;
- **supervision**: a worker that dies is started again; one that dies three times in a row within
  ``QUICK_EXIT_S`` of its start stops the server (exit status 1) with the worker's exit status;
- **stopping**: SIGTERM / SIGINT (Ctrl-C) on the supervisor stop every worker gracefully (they
  finish their requests and flush the usage tables), then the supervisor exits. Workers run in
  their own session (a terminal's Ctrl-C reaches only the supervisor) and get SIGTERM from the
  kernel if the supervisor itself is killed (``PR_SET_PDEATHSIG``): no worker outlives it;
- **state**: the workers share rate limits and see every management change at once (see
  ``_shared``); each takes 1/N of every endpoint's concurrency and quota to its backend, as the
  workers of a batch job do; each appends its own usage rows to the same Delta tables (appends
  do not conflict; a failed commit is retried at the next flush);
- **metrics**: the workers write their Prometheus values into one temporary directory
  (``PROMETHEUS_MULTIPROC_DIR``, see ``_metrics``), so a scrape of any worker sums them all.
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Sequence

from .._logging import get_logger
from ..process import die_with_parent
from ._metrics import MULTIPROC_ENV, worker_exited
from ._shared import SharedControl

log = get_logger("ai_query.serving")

QUICK_EXIT_S = 10.0
"""A worker that exits this soon after its start, three times in a row, stops the server."""
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with ``SO_REUSEPORT`` and not listening: the port stays ours.

    First a plain bind: ``SO_REUSEPORT`` alone would let a second server of the same user join
    the port of a running one and silently take half its connections.
    """
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind((host, port))  # EADDRINUSE if anything listens there, with SO_REUSEPORT or not
        port = probe.getsockname()[1]
    finally:
        probe.close()
    return _bind_shared(host, port)


def _bind_shared(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def worker_socket(host: str, port: int) -> socket.socket:
    """A worker's listening socket on the supervisor's port (one of the ``SO_REUSEPORT`` group)."""
    sock = _bind_shared(host, port)
    sock.listen(2048)  # connections queue from now on, while the app starts
    return sock


def die_with_supervisor(supervisor: int) -> None:
    """Ask the kernel for SIGTERM when the supervisor exits, however it exits (Linux; elsewhere the
    supervisor's SIGTERM is the only stop)."""
    if not die_with_parent(supervisor):  # it exited before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


class Supervisor:
    """Runs ``workers`` copies of ``ai-query serve`` (``argv`` plus the worker options) on one port."""

    def __init__(self, argv: Sequence[str], workers: int, host: str, port: int, state_dir: str) -> None:
        if workers < 2:
            raise ValueError(f"a supervisor runs 2 or more workers, not {workers}")
        self.argv = list(argv)
        self.workers = workers
        self.host = host
        self.sock = reserve_port(host, port)
        self.port: int = self.sock.getsockname()[1]
        self.state_dir = state_dir
        self.control = SharedControl.create()
        self._ready_r, self._ready_w = os.pipe()
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * workers
        self._started_at = [0.0] * workers
        self._quick_exits = [0] * workers
        self._stop_signal: int | None = None
        # one directory for every worker's metrics, so that any worker's /metrics sums all of them
        self._own_metrics_dir = not os.environ.get(MULTIPROC_ENV)
        self.metrics_dir = tempfile.mkdtemp(prefix="aiq-metrics-") if self._own_metrics_dir else os.environ[MULTIPROC_ENV]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _spawn(self, index: int) -> None:
        cmd = [sys.executable, "-m", "ai_query.serving", *self.argv, "--host", self.host, "--port", str(self.port),
               "--state-dir", self.state_dir, "--workers", str(self.workers),
               "--worker-control", str(self.control.fd), "--worker-ready-fd", str(self._ready_w),
               "--worker-supervisor", str(os.getpid()), "--worker-index", str(index)]
        self.procs[index] = subprocess.Popen(cmd, pass_fds=(self._ready_w, self.control.fd), start_new_session=True,
                                            env={**os.environ, MULTIPROC_ENV: self.metrics_dir})
        self._started_at[index] = time.monotonic()

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stop_signal = signum

    def run(self) -> int:
        """Start the workers, print the URL once all are ready, keep them running until a signal."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for i in range(self.workers):
                self._spawn(i)
            if not self._wait_ready():
                return 0 if self._stop_signal is not None else 1
            print(f"ai-query serving on {self.url} ({self.workers} workers, state in {self.state_dir})", flush=True)
            return self._watch()
        finally:
            self._stop_all()
            for s, handler in previous.items():
                signal.signal(s, handler)
            os.close(self._ready_r)
            os.close(self._ready_w)
            self.control.close()
            self.sock.close()
            if self._own_metrics_dir:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _wait_ready(self) -> bool:
        ready: set[int] = set()
        deadline = time.monotonic() + START_TIMEOUT_S
        buffer = b""
        while len(ready) < self.workers:
            if self._stop_signal is not None:
                return False
            for i, proc in enumerate(self.procs):
                assert proc is not None
                code = proc.poll()
                if code is not None:
                    log.error("worker %d exited with status %s while starting (see its log above); stopping", i, code)
                    return False
            if time.monotonic() > deadline:
                log.error("the workers did not start within %g s; stopping", START_TIMEOUT_S)
                return False
            readable, _, _ = select.select([self._ready_r], [], [], 0.2)
            if readable:
                buffer += os.read(self._ready_r, 4096)
                *lines, buffer = buffer.split(b"\n")
                ready.update(int(line) for line in lines if line.strip())
        return True

    def _watch(self) -> int:
        while self._stop_signal is None:
            for i, proc in enumerate(self.procs):
                assert proc is not None
                code = proc.poll()
                if code is None or self._stop_signal is not None:
                    continue
                quick = time.monotonic() - self._started_at[i] < QUICK_EXIT_S
                self._quick_exits[i] = self._quick_exits[i] + 1 if quick else 0
                if self._quick_exits[i] >= 3:
                    log.error("worker %d exited with status %s three times in a row within %g s of its start; stopping "
                              "the server", i, code, QUICK_EXIT_S)
                    return 1
                log.warning("worker %d (pid %d) exited with status %s; starting it again", i, proc.pid, code)
                worker_exited(proc.pid, self.metrics_dir)
                self._spawn(i)
            try:  # drain late readiness lines (restarted workers), and wait a little
                if select.select([self._ready_r], [], [], 0.2)[0]:
                    os.read(self._ready_r, 4096)
            except InterruptedError:  # pragma: no cover - PEP 475 retries; a signal handler ran
                pass
        log.info("signal %d: stopping %d workers", self._stop_signal, self.workers)
        return 0

    def _stop_all(self) -> None:
        procs = [p for p in self.procs if p is not None and p.poll() is None]
        for proc in procs:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:  # pragma: no cover - exited just now
                pass
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d did not stop within %g s: killing it", proc.pid, STOP_TIMEOUT_S)
                proc.kill()
                proc.wait()


def default_workers() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def add_worker_options(parser: argparse.ArgumentParser) -> None:
    """``--workers`` and the hidden options the supervisor starts each worker with."""
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="server processes on the port (default: the number of cores, here "
                             f"{default_workers()}); 1 serves from this process. Workers share rate limits and "
                             "endpoint changes; each takes 1/N of every endpoint's concurrency and quota")
    parser.add_argument("--worker-control", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-ready-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-supervisor", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
