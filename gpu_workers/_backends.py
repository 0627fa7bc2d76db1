"""The ``local_model`` and ``vllm_pool`` backends, registered with the core through the
``ai_query.backends`` entry-point group (see ``pyproject.toml``).

``LocalModelBackend`` talks to a server on this machine over the OpenAI-compatible API; the
server is found (or started) on first use in each process, one per model shared by the driver
and the Spark Python workers of the node.

``VLLMPoolBackend`` (``mode = "server"``) starts (or attaches to) the pool of its node (one
started by the driver or by ``ai-query workers start``), reads the replicas' state (ready,
restarting, ...) from the pool's state file at most once a second, and routes each request with
``PrefixAffinityRouter``. A connection error takes the replica out of rotation until the pool
manager reports it ready again, so a crashed replica's rows are retried on the others.

``OfflineVLLMBackend`` (``mode = "offline"``) has no HTTP: the client hands it a whole batch
(``invoke_batch``), with the ``BatchContext`` of the task that runs it (the GPUs Spark assigned),
and ``_offline`` runs it through ``vllm.LLM`` in this process.

Only ``ai_query``'s public API is used here; nothing imports vllm until an engine starts.
"""

from __future__ import annotations

import asyncio
import functools
import time
from pathlib import Path
from typing import Any, Callable, Generic, Mapping, Sequence, TypeVar

from ai_query import (
    ConfigError,
    LocalEngineError,
    LocalModel,
    ModelParameters,
    ModelResponse,
    RetryableEndpointError,
    ServedEntity,
    VLLMPool,
)
from ai_query.backends import (
    PATHS,
    Backend,
    BackendBase,
    BatchContext,
    Capabilities,
    HTTPRequest,
    OpenAICompatibleBackend,
    llm_v1_body,
    parse_openai_shape,
)
from ai_query.batch import prompt_text_of
from gpu_workers._models import KNOWN_MODELS, model_path
from gpu_workers._offline import offline_generate
from gpu_workers._pool import ensure_pool, read_pool_state
from gpu_workers._routing import PrefixAffinityRouter
from gpu_workers._local_servers import ensure_local_server
from gpu_workers._server_options import LocalServerOptions

T = TypeVar("T")

__all__ = ["LocalModelBackend", "OfflineVLLMBackend", "VLLMPoolBackend", "prepare_pool", "resolve_local_server"]


class _OnceInThread(Generic[T]):
    """A blocking start-up (a server to find or start), run once in a worker thread; callers wait for it."""

    def __init__(self, start: Callable[..., T], *args: Any) -> None:
        self._start = start
        self._args = args
        self.value: T | None = None
        self._lock: asyncio.Lock | None = None

    async def __call__(self) -> T:
        if self.value is None:
            if self._lock is None:
                self._lock = asyncio.Lock()
            async with self._lock:
                if self.value is None:
                    self.value = await asyncio.get_running_loop().run_in_executor(None, self._start, *self._args)
        return self.value


class _EngineOptions:
    """The engine options of every kind here are ``LocalServerOptions`` fields."""

    @classmethod
    def validate_options(cls, options: Mapping[str, Any], path: str) -> None:
        """Checked on the driver when the config is read, before any task runs."""
        try:
            LocalServerOptions.from_mapping(options)
        except ValueError as exc:
            raise ConfigError(f"{path}: {exc}") from None


def resolve_local_server(local: LocalModel) -> str:
    """Base URL of the local server for ``local`` (started if needed)."""
    try:
        return ensure_local_server(local.model, local.task, dict(local.options))
    except LocalEngineError:
        raise
    except Exception as exc:
        raise LocalEngineError(f"could not start the local model {local.model!r}: {exc}") from exc


def prepare_pool(pool: VLLMPool) -> str | None:
    """Start (or attach to) the pool of this node; the pool's name, or None in offline mode."""
    if pool.is_offline:
        return None
    try:
        return ensure_pool(pool).name
    except LocalEngineError:
        raise
    except Exception as exc:
        raise LocalEngineError(f"could not start the vllm_pool of {pool.model!r} ({pool.replicas} replicas): {exc}") from exc


class LocalModelBackend(_EngineOptions, OpenAICompatibleBackend):
    """A model served on this machine over the OpenAI-compatible API (``local_model``)."""

    capabilities = Capabilities(limiter="aimd", needs_start=True, starts_full=True)  # fill the engine: see Capabilities

    def __init__(self, entity: ServedEntity) -> None:
        assert entity.local_model is not None
        self.entity = entity
        self._model = entity.local_model.model
        self._server = _OnceInThread(resolve_local_server, entity.local_model)

    @classmethod
    def prepare(cls, entity: ServedEntity) -> None:
        assert entity.local_model is not None
        resolve_local_server(entity.local_model)

    @classmethod
    def model_folder(cls, model: str) -> Path | None:
        return model_path(model) if model in KNOWN_MODELS else None

    async def start(self) -> None:
        await self._server()

    async def base_url(self) -> str:
        return await self._server()

    def _headers(self) -> dict[str, str]:
        return {"content-type": "application/json"}


class VLLMPoolBackend(_EngineOptions, BackendBase):
    """Routes each request to a replica of the node's pool (``mode = "server"``)."""

    capabilities = Capabilities(limiter="aimd", accepts_files=True, starts_full=True)  # a vision model reads the images; fill the replicas
    REFRESH_S = 1.0
    DOWN_S = 5.0

    @classmethod
    def for_entity(cls, entity: ServedEntity) -> Backend:
        assert entity.vllm_pool is not None
        return OfflineVLLMBackend(entity) if entity.vllm_pool.is_offline else cls(entity)  # type: ignore[return-value]

    @classmethod
    def prepare(cls, entity: ServedEntity) -> None:
        assert entity.vllm_pool is not None
        prepare_pool(entity.vllm_pool)

    @classmethod
    def batch_api(cls, entity: ServedEntity, *, max_requests: int | None = None) -> Any:
        """``client_config.batch_api`` on a pool: vLLM's batch runner over the OpenAI batch JSONL."""
        from ._run_batch import VLLMRunBatch

        return VLLMRunBatch(entity, max_requests=max_requests)

    def __init__(self, entity: ServedEntity, *, clock: Callable[[], float] = time.monotonic) -> None:
        assert entity.vllm_pool is not None
        self.entity = entity
        self.pool = entity.vllm_pool
        self.router = PrefixAffinityRouter(self.pool.prefix_block_chars, self.pool.max_load_imbalance, clock=clock)
        self._clock = clock
        self._pool_name = _OnceInThread(prepare_pool, self.pool)
        self._model: str = self.pool.model
        self._statuses: dict[str, str] = {}
        self._refreshed = -1e9

    @property
    def _name(self) -> str | None:
        return self._pool_name.value

    def _refresh(self) -> None:
        assert self._name is not None
        state = read_pool_state(self._name)
        self._refreshed = self._clock()
        if state is None:
            raise LocalEngineError(
                f"the vllm_pool {self._name!r} of {self.pool.model!r} is gone (stopped with `ai-query workers stop`?); "
                "start it again or rerun the query"
            )
        self._model = state.get("served_model_name", self._model)
        replicas = state.get("replicas", [])
        self._statuses = {r["base_url"]: r.get("status", "?") for r in replicas}
        self.router.set_ready([r["base_url"] for r in replicas if r.get("status") == "ready"])

    async def build(self, task: str, value: Any, params: ModelParameters, response_format: Mapping[str, Any] | None) -> HTTPRequest:
        await self._pool_name()
        if self._clock() - self._refreshed >= self.REFRESH_S:
            self._refresh()
        url = self.router.pick(prompt_text_of(value))
        if url is None:
            self._refreshed = -1e9  # look at the state file again on the retry
            raise RetryableEndpointError(
                f"no replica of the vllm_pool {self._name!r} is ready (replicas: {self._statuses or 'none'}); "
                "the pool manager restarts crashed replicas, retrying"
            )
        body = {"model": self._model, **llm_v1_body(task, value, params, response_format)}
        return HTTPRequest("POST", url + PATHS[task], {"content-type": "application/json"}, body)

    def request_done(self, request: HTTPRequest, error: BaseException | None) -> bool:
        """Called by the client when a request built here has finished, however it finished.

        True when the replica, not the request, failed (no HTTP status: the connection was refused
        or lost, the replica crashed or is restarting) and other replicas can take the retry.
        """
        for url in self._statuses:
            if request.url.startswith(url + "/"):
                self.router.done(url)
                if isinstance(error, RetryableEndpointError) and error.status_code is None and "timed out" not in str(error):
                    self.router.mark_down(url, self.DOWN_S)
                    self._refreshed = -1e9
                    return bool(self.router.available())
                return False
        return False

    def parse(self, task: str, status: int, headers: Mapping[str, str], body: bytes, prompt_text: str) -> ModelResponse:
        return parse_openai_shape(self.entity, task, status, headers, body, prompt_text, self._model)


class OfflineVLLMBackend(_EngineOptions, BackendBase):
    """Runs whole batches through ``vllm.LLM`` in this process (``mode = "offline"``)."""

    capabilities = Capabilities(accepts_files=True, runs_whole_batches=True, in_process=True)

    def __init__(self, entity: ServedEntity) -> None:
        assert entity.vllm_pool is not None
        self.entity = entity
        self.pool = entity.vllm_pool

    async def invoke_batch(self, task: str, values: Sequence[Any], params: ModelParameters,
                           response_format: Mapping[str, Any] | None,
                           context: BatchContext | None = None) -> list[ModelResponse | Exception]:
        """One result per value, in order: a ``ModelResponse`` or the row's error."""
        loop = asyncio.get_running_loop()
        gpu_ids = context.gpu_ids if context is not None else ()
        try:
            return await loop.run_in_executor(
                None, functools.partial(offline_generate, self.pool, task, list(values), params.as_dict(), response_format,
                                        gpu_ids=gpu_ids))
        except LocalEngineError:
            raise
        except Exception as exc:  # the engine could not start: no row can succeed
            raise LocalEngineError(f"the offline vLLM engine for {self.pool.model!r} failed: {type(exc).__name__}: {exc}") from exc

    async def invoke(self, task: str, value: Any, params: ModelParameters, response_format: Mapping[str, Any] | None,
                     prompt_text: str) -> ModelResponse:
        (result,) = await self.invoke_batch(task, [value], params, response_format)
        if isinstance(result, Exception):
            raise result
        return result
