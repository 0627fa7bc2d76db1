"""What to run for a local server: its options, the resolved target, its command and environment.

``LocalServerOptions`` is validated at construction (on the driver, through the ``local_model``
endpoint's ``options``). Every option except ``startup_timeout`` and ``grace`` is part of the
server's identity: ``_resolve`` hashes them, with the model folder, the served name, the kind
of task and the backend, into the key under which the processes of a node share one server.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from gpu_workers._models import KNOWN_MODELS, prepare_model

Task = Literal["llm/v1/chat", "llm/v1/completions", "llm/v1/embeddings"]
TASKS: tuple[str, ...] = ("llm/v1/chat", "llm/v1/completions", "llm/v1/embeddings")
_GENERATE_TASKS = ("llm/v1/chat", "llm/v1/completions")
_HOST = "127.0.0.1"


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
    """Extra command-line arguments for the server, appended verbatim (in ``vllm_pool`` offline mode,
    the same ``vllm serve`` flags become ``vllm.LLM`` arguments)."""
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
    identity = {"model_path": str(path), "served_model_name": served, "kind": kind, "backend": backend,
                "options": options.identity()}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    key = f"{_slug(served)}-{kind}-{digest}"
    return _Target(key, path, served, kind, backend, options, digest)  # type: ignore[arg-type]


def _server_command(target: _Target, port: int) -> list[str]:
    opts = target.options
    embed_server = target.backend == "sentence-transformers"
    # The `vllm` console script fails for the vllm-cpu distribution (PackageNotFoundError).
    module = "gpu_workers._embed_server" if embed_server else "vllm.entrypoints.openai.api_server"
    cmd = [sys.executable, "-m", module, "--model", str(target.model_path), "--host", _HOST, "--port", str(port),
           "--served-model-name", target.served_model_name]
    if embed_server:
        if opts.max_model_len:
            cmd += ["--max-seq-length", str(opts.max_model_len)]
        if opts.threads:
            cmd += ["--threads", str(opts.threads)]
        return cmd + list(opts.extra_args)
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


def run_batch_command(target: _Target, input_path: str | pathlib.Path, output_path: str | pathlib.Path) -> list[str]:
    """vLLM's batch runner over an OpenAI batch JSONL, with the engine options a server of ``target`` gets."""
    server = _server_command(target, 0)
    engine = server[server.index("--dtype"):]  # the engine options, after the server's own
    engine = [a for a in engine if a not in ("--disable-uvicorn-access-log",)]
    return [sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(input_path), "-o", str(output_path),
            "--model", str(target.model_path), "--served-model-name", target.served_model_name, *engine]


def _default_max_model_len(target: _Target) -> int | None:
    """2048 for generation (or less if the model is shorter); the model's own for embeddings.

    2048 keeps the KV cache per sequence small on CPU; vLLM rejects a length above the model's
    ``max_position_embeddings``, so shorter models get theirs.
    """
    return None if target.kind == "embed" else _generate_max_model_len(target.model_path)


def _generate_max_model_len(model_path: str | pathlib.Path) -> int:
    """2048, or the model's ``max_position_embeddings`` if shorter."""
    try:
        limit = json.loads((pathlib.Path(model_path) / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        limit = None
    return min(2048, limit) if isinstance(limit, int) and limit > 0 else 2048


def _server_env(target: _Target) -> dict[str, str]:
    env = dict(os.environ)
    package_root = str(pathlib.Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
               PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", VLLM_CPU_KVCACHE_SPACE=str(target.options.kv_cache_gib))
    # An in-process engine is for offline use; the server must run its engine in a subprocess.
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    opts = target.options
    if opts.cpu_bind:
        env["VLLM_CPU_OMP_THREADS_BIND"] = opts.cpu_bind
    elif opts.threads:
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{opts.threads - 1}" if opts.threads > 1 else "0"
    env.update(dict(opts.env))
    return env
