"""The ``vllm_pool`` endpoint kind: routing over the replicas of a node's vLLM pool, and offline mode.

``PrefixAffinityRouter`` picks a replica for each request. It keeps, per replica, the requests
this process has outstanding there and a bounded memory of the prompt prefixes it has sent
there, as a chain of block hashes (block ``k`` hashes the prompt's first ``k`` blocks of
``block_chars`` characters, so two prompts share hash ``k`` exactly when they share their first
``k`` blocks, as in vLLM's own prefix cache)::

    match(r)  = leading blocks of the prompt that replica r has seen
    least     = fewest outstanding requests among the ready replicas
    warm      = the replica with the longest match (ties: fewest outstanding)
    cold      = rendezvous hash of the first block over the replicas (the same in every process)
    pick      = warm if match > 0 and outstanding(warm) <= least + max_imbalance
                else cold if outstanding(cold) <= least + max_imbalance
                else least (round robin among equals)

so requests that share a prefix go to the replica whose KV cache already holds it, until that
replica has ``max_imbalance`` more requests outstanding than the idlest one; then the prefix
spreads to a second replica, which remembers it too. Prompts shorter than one block have no
prefix worth sharing and go to the least loaded replica.

``VLLMPoolProvider`` (``mode = "server"``) asks ``gpu_workers`` for the pool of its node
(attaching to one started by the driver or by ``ai-query workers start``, else starting it),
reads the replicas' state (ready, restarting, ...) from the pool's state file at most once a
second, and routes each request. A connection error takes the replica out of rotation until the
pool manager reports it ready again, so a crashed replica's rows are retried on the others.

``OfflineVLLMProvider`` (``mode = "offline"``) has no HTTP: the client hands it a whole batch
(``invoke_batch``) and ``gpu_workers`` runs it through ``vllm.LLM`` in this process.

Nothing here imports vllm: the engines live in ``gpu_workers``, imported when first needed.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from .config import ServedEntity, VLLMPool
from ._errors import LocalEngineError, RetryableEndpointError
from ._providers import _PATHS, HTTPRequest, _parse_openai_shape, llm_v1_body
from ._schemas import ModelParameters, ModelResponse, Usage
from .batch.request import prompt_text_of

__all__ = ["OfflineVLLMProvider", "PrefixAffinityRouter", "VLLMPoolProvider", "prefix_hashes"]


def prefix_hashes(text: str, block_chars: int, limit: int = 64) -> list[bytes]:
    """Chain hashes of the prompt's full leading blocks (at most ``limit``)."""
    out: list[bytes] = []
    previous = b""
    for k in range(min(len(text) // block_chars, limit)):
        previous = hashlib.blake2b(previous + text[k * block_chars:(k + 1) * block_chars].encode(), digest_size=8).digest()
        out.append(previous)
    return out


@dataclass
class _Replica:
    url: str
    outstanding: int = 0
    sent: int = 0
    down_until: float = 0.0
    seen: OrderedDict[bytes, None] = field(default_factory=OrderedDict)


class PrefixAffinityRouter:
    """Least outstanding requests with prefix affinity over a changing set of replica URLs.

    Thread-safe; the clock is injected so tests need no real time.
    """

    def __init__(self, block_chars: int = 256, max_imbalance: int = 8, *, memory: int = 50_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if block_chars < 1 or max_imbalance < 0 or memory < 1:
            raise ValueError(f"need block_chars >= 1 ({block_chars}), max_imbalance >= 0 ({max_imbalance}), memory >= 1 ({memory})")
        self.block_chars = block_chars
        self.max_imbalance = max_imbalance
        self.memory = memory
        self._clock = clock
        self._replicas: dict[str, _Replica] = {}
        self._ready: list[str] = []
        self._round_robin = 0
        self._lock = threading.Lock()

    def set_ready(self, urls: Sequence[str]) -> None:
        """The replicas that take requests now; counts and memories of known ones are kept."""
        with self._lock:
            for url in urls:
                self._replicas.setdefault(url, _Replica(url))
            self._ready = list(urls)

    def mark_down(self, url: str, seconds: float) -> None:
        """Take a replica out of rotation for ``seconds`` (it refused a connection); forget its cache."""
        with self._lock:
            replica = self._replicas.get(url)
            if replica is not None:
                replica.down_until = self._clock() + seconds
                replica.seen.clear()  # a restarted engine starts with an empty cache

    def available(self) -> list[str]:
        now = self._clock()
        with self._lock:
            return [u for u in self._ready if self._replicas[u].down_until <= now]

    def pick(self, prompt_text: str) -> str | None:
        """The replica for this prompt (its outstanding count is taken); None if none is available."""
        hashes = prefix_hashes(prompt_text, self.block_chars)
        now = self._clock()
        with self._lock:
            live = [self._replicas[u] for u in self._ready if self._replicas[u].down_until <= now]
            if not live:
                return None
            least = min(r.outstanding for r in live)
            ceiling = least + self.max_imbalance
            chosen: _Replica | None = None
            if hashes:
                best, best_match = None, 0
                for r in live:
                    match = 0
                    for h in hashes:
                        if h not in r.seen:
                            break
                        match += 1
                    if match > best_match or (match == best_match and match and best is not None and r.outstanding < best.outstanding):
                        best, best_match = r, match
                if best is not None and best_match and best.outstanding <= ceiling:
                    chosen = best
                else:
                    cold = max(live, key=lambda r: hashlib.blake2b(hashes[0] + r.url.encode(), digest_size=8).digest())
                    if cold.outstanding <= ceiling:
                        chosen = cold
            if chosen is None:
                idlest = [r for r in live if r.outstanding == least]
                chosen = idlest[self._round_robin % len(idlest)]
                self._round_robin += 1
            chosen.outstanding += 1
            chosen.sent += 1
            for h in hashes:
                chosen.seen[h] = None
                chosen.seen.move_to_end(h)
            while len(chosen.seen) > self.memory:
                chosen.seen.popitem(last=False)
            return chosen.url

    def done(self, url: str) -> None:
        with self._lock:
            replica = self._replicas.get(url)
            if replica is not None and replica.outstanding > 0:
                replica.outstanding -= 1

    def outstanding(self) -> dict[str, int]:
        with self._lock:
            return {u: r.outstanding for u, r in self._replicas.items()}

    def sent(self) -> dict[str, int]:
        """Requests sent to each replica so far (for tests and benchmarks)."""
        with self._lock:
            return {u: r.sent for u, r in self._replicas.items()}


def _gpu_workers():
    try:
        import gpu_workers
    except ImportError as exc:  # pragma: no cover - the package ships together
        raise LocalEngineError("a vllm_pool endpoint needs the gpu_workers package: pip install 'ai-query[local]'") from exc
    return gpu_workers


def prepare_pool(pool: VLLMPool) -> str | None:
    """Start (or attach to) the pool of this node; the pool's name, or None in offline mode."""
    if pool.is_offline:
        return None
    try:
        return _gpu_workers().ensure_pool(pool).name
    except LocalEngineError:
        raise
    except Exception as exc:
        raise LocalEngineError(f"could not start the vllm_pool of {pool.model!r} ({pool.replicas} replicas): {exc}") from exc


class VLLMPoolProvider:
    """Routes each request to a replica of the node's pool (``mode = "server"``)."""

    REFRESH_S = 1.0
    DOWN_S = 5.0

    def __init__(self, entity: ServedEntity, *, clock: Callable[[], float] = time.monotonic) -> None:
        assert entity.vllm_pool is not None
        self.entity = entity
        self.pool = entity.vllm_pool
        self.router = PrefixAffinityRouter(self.pool.prefix_block_chars, self.pool.max_load_imbalance, clock=clock)
        self._clock = clock
        self._name: str | None = None
        self._model: str = self.pool.model
        self._statuses: dict[str, str] = {}
        self._refreshed = -1e9
        self._lock: asyncio.Lock | None = None

    async def _ensure(self) -> None:
        if self._name is None:
            if self._lock is None:
                self._lock = asyncio.Lock()
            async with self._lock:
                if self._name is None:
                    loop = asyncio.get_running_loop()
                    self._name = await loop.run_in_executor(None, prepare_pool, self.pool)
        if self._clock() - self._refreshed >= self.REFRESH_S:
            self._refresh()

    def _refresh(self) -> None:
        assert self._name is not None
        state = _gpu_workers().read_pool_state(self._name)
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
        await self._ensure()
        url = self.router.pick(prompt_text_of(value))
        if url is None:
            self._refreshed = -1e9  # look at the state file again on the retry
            raise RetryableEndpointError(
                f"no replica of the vllm_pool {self._name!r} is ready (replicas: {self._statuses or 'none'}); "
                "the pool manager restarts crashed replicas, retrying"
            )
        body = {"model": self._model, **llm_v1_body(task, value, params, response_format)}
        return HTTPRequest("POST", url + _PATHS[task], {"content-type": "application/json"}, body)

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
        return _parse_openai_shape(self.entity, task, status, headers, body, prompt_text, self._model)


class OfflineVLLMProvider:
    """Runs whole batches through ``vllm.LLM`` in this process (``mode = "offline"``)."""

    def __init__(self, entity: ServedEntity) -> None:
        assert entity.vllm_pool is not None
        self.entity = entity
        self.pool = entity.vllm_pool

    async def invoke_batch(self, task: str, values: Sequence[Any], params: ModelParameters,
                           response_format: Mapping[str, Any] | None) -> list[ModelResponse | Exception]:
        """One result per value, in order: a ``ModelResponse`` or the row's error."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                None, _gpu_workers().offline_generate, self.pool, task, list(values), params.as_dict(), response_format
            )
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


def offline_response(text: str, prompt_tokens: int, completion_tokens: int, model: str, finish_reason: str | None) -> ModelResponse:
    """A ``ModelResponse`` from a ``vllm.RequestOutput``'s fields (usage is counted, not estimated)."""
    return ModelResponse(text, Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens), model,
                         None, finish_reason)
