"""The pool manager: one process that runs, watches and restarts the replicas of a vLLM pool.

Started by ``gpu_workers._pool`` as::

    python -m gpu_workers._pool_manager --spec <run>/pools/<name>.spec [--owner-pid PID]

The spec (written by the starter) lists, per replica, the server command, its port and the
environment it adds (``CUDA_VISIBLE_DEVICES`` on GPUs, ``VLLM_CPU_OMP_THREADS_BIND`` on CPU).
The manager publishes what it sees in ``<run>/pools/<name>.json`` (written atomically; routers
in Spark tasks read it): per replica ``status`` (``starting``, ``ready``, ``restarting``,
``stopped``), ``pid``, ``restarts``, ``last_exit`` and ``log``.

- Each replica runs in its own session (one ``killpg`` reaches vLLM's API server, engine core and
  workers) with ``PR_SET_PDEATHSIG``; the manager is a child subreaper, so escaped descendants
  are still found and killed.
- Ready means ``/health`` answers 200 and ``/v1/models`` lists the model. A ready replica whose
  ``/health`` fails ``--hung-checks`` times in a row is killed and restarted like a crashed one.
- A replica that exits is restarted after a backoff (1 s, doubling, at most 30 s; back to 1 s
  once it has stayed ready for a minute), on the same port so that routers keep its URL.
- With ``--owner-pid`` the pool stops when its owner dies (a Spark driver, a test session);
  without, it runs until ``SIGTERM`` (``ai-query workers stop``). Stopping SIGTERMs every replica
  group, waits ``grace`` seconds, SIGKILLs the rest, and removes the state file.

Only the standard library and ``ai_query.process`` are used: this must start fast and import
nothing heavy.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from ai_query.process import (
    become_subreaper,
    descendants,
    die_with_parent,
    proc_stat,
    reap_children,
    set_parent_death_signal,
    signal_group,
    stop_process,
)
from gpu_workers._health import _http_get, _serves_model

BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0
STABLE_S = 60.0


def _log(message: str) -> None:
    sys.stderr.write(f"{time.strftime('%H:%M:%S')} [aiq-pool-manager {os.getpid()}] {message}\n")
    sys.stderr.flush()


class Replica:
    """One engine server: started, watched and restarted by its own thread."""

    def __init__(self, manager: "PoolManager", spec: dict[str, Any]) -> None:
        self.manager = manager
        self.index: int = spec["index"]
        self.port: int = spec["port"]
        self.command: list[str] = spec["command"]
        self.env: dict[str, str] = spec.get("env", {})
        self.log_path = pathlib.Path(spec["log"])
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.proc: subprocess.Popen | None = None
        self.status = "starting"
        self.restarts = 0
        self.last_exit: int | None = None
        self.ready_at: float | None = None
        self.ever_ready = False
        self.started_at = 0.0
        self.thread = threading.Thread(target=self._run, name=f"replica-{self.index}", daemon=True)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index, "port": self.port, "base_url": self.base_url, "status": self.status,
            "pid": self.proc.pid if self.proc is not None else None, "restarts": self.restarts,
            "last_exit": self.last_exit, "ever_ready": self.ever_ready, "log": str(self.log_path),
            "env": self.env,
        }

    def _set(self, status: str) -> None:
        if status != self.status:
            self.status = status
            self.manager.publish()

    def _spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} start #{self.restarts} "
                      f"of replica {self.index} on port {self.port} env {self.env}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, **self.env}, close_fds=True, start_new_session=True,
                # The manager is not a Spark driver (no py4j to break): PDEATHSIG straight after fork.
                preexec_fn=lambda: set_parent_death_signal(signal.SIGTERM),
            )
        self.started_at = time.monotonic()
        _log(f"replica {self.index}: started pid {self.proc.pid} on port {self.port}")

    def _ready(self) -> bool:
        return _serves_model(self.base_url, self.manager.served_model_name)

    def stop(self, grace: float) -> None:
        proc = self.proc
        if proc is None:
            return
        stop_process(proc.pid, grace, proc=proc, group=True)

    def _run(self) -> None:
        stop = self.manager.stopping
        backoff = BACKOFF_FIRST_S
        while not stop.is_set():
            self._spawn()
            self._set("starting")
            failed_checks = 0
            assert self.proc is not None
            while not stop.is_set():
                code = self.proc.poll()
                if code is not None:
                    self.last_exit = code
                    _log(f"replica {self.index}: exited with code {code}")
                    break
                if self.status == "starting":
                    if self._ready():
                        self.ever_ready = True
                        self.ready_at = time.monotonic()
                        _log(f"replica {self.index}: ready after {time.monotonic() - self.started_at:.1f} s")
                        self._set("ready")
                    else:
                        stop.wait(0.5)
                    continue
                if self.ready_at is not None and time.monotonic() - self.ready_at > STABLE_S:
                    backoff = BACKOFF_FIRST_S
                status, _ = _http_get(self.base_url[: -len("/v1")] + "/health", 5.0)
                failed_checks = 0 if status == 200 else failed_checks + 1
                if failed_checks >= self.manager.hung_checks:
                    _log(f"replica {self.index}: /health failed {failed_checks} times in a row; killing it")
                    self.last_exit = None
                    break
                stop.wait(self.manager.health_interval)
            if stop.is_set():
                break
            # Crashed or hung: take the whole group down (vLLM's engine core outlives its API server).
            self._set("restarting")
            self.stop(grace=2.0)
            self.restarts += 1
            self.ready_at = None
            self.manager.publish()
            _log(f"replica {self.index}: restarting in {backoff:.0f} s (restart #{self.restarts})")
            stop.wait(backoff)
            backoff = min(BACKOFF_MAX_S, backoff * 2)
        self.status = "stopped"


class PoolManager:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.name: str = spec["name"]
        self.state_path = pathlib.Path(spec["state_path"])
        self.served_model_name: str = spec["served_model_name"]
        self.grace = float(spec.get("grace", 10.0))
        self.health_interval = float(spec.get("health_interval", 2.0))
        self.hung_checks = int(spec.get("hung_checks", 3))
        self.owner_pid: int | None = spec.get("owner_pid")
        self.stopping = threading.Event()
        self._publish_lock = threading.Lock()
        self.replicas = [Replica(self, r) for r in spec["replicas"]]

    def publish(self) -> None:
        """Write the state file atomically (readers never see half a file)."""
        with self._publish_lock:
            if self.stopping.is_set() and not self.state_path.exists():
                return
            state = {k: v for k, v in self.spec.items() if k != "replicas"}
            state.update({"manager_pid": os.getpid(), "updated_at": time.time(),
                          "replicas": [r.to_dict() for r in self.replicas]})
            tmp = self.state_path.with_name(f".{self.state_path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, self.state_path)

    def run(self) -> int:
        reason: list[str] = []

        def on_signal(signum: int, _frame: object) -> None:
            reason.append(signal.Signals(signum).name)
            self.stopping.set()

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, on_signal)
        self.publish()
        for r in self.replicas:
            r.thread.start()
        while not self.stopping.is_set():
            if self.owner_pid is not None and os.getppid() != self.owner_pid:
                reason.append(f"owner {self.owner_pid} died")
                break
            _reap_orphans(self.replicas)
            self.stopping.wait(1.0)
        self.stopping.set()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        _log(f"stopping the pool ({reason[0] if reason else 'stop requested'})")
        for r in self.replicas:
            if r.proc is not None:
                signal_group(r.proc.pid, signal.SIGTERM)
        for r in self.replicas:
            r.stop(self.grace)
        for pid in descendants(os.getpid()):  # anything that escaped its group
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        reap_children()
        for r in self.replicas:
            r.thread.join(timeout=5)
        with self._publish_lock:
            self.state_path.unlink(missing_ok=True)
        _log("pool stopped")
        return 0


def _reap_orphans(replicas: list[Replica]) -> None:
    """Collect exited orphans re-parented to us (we are a subreaper: e.g. the vLLM worker of a
    replica whose API server was killed); our replicas themselves are left to ``Popen``."""
    ours = {r.proc.pid for r in replicas if r.proc is not None}
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in ours:
            continue
        stat = proc_stat(int(entry))
        if stat is not None and stat.state == "Z" and stat.ppid == me:
            try:
                os.waitpid(int(entry), os.WNOHANG)
            except ChildProcessError:
                pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpu_workers._pool_manager")
    parser.add_argument("--spec", required=True, help="the pool spec JSON written by gpu_workers._pool")
    parser.add_argument("--owner-pid", type=int, default=None, help="stop the pool when this process dies")
    args = parser.parse_args(argv)
    spec = json.loads(pathlib.Path(args.spec).read_text())
    spec["owner_pid"] = args.owner_pid
    become_subreaper()
    if args.owner_pid is not None and not die_with_parent(args.owner_pid):
        _log(f"owner {args.owner_pid} is gone before start-up; not starting the pool")
        return 1
    return PoolManager(spec).run()


if __name__ == "__main__":
    sys.exit(main())
