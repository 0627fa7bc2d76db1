"""The backend seam: what the core asks of every kind of served entity.

A ``Backend`` is the adapter for one served entity. The core never asks *which* kind it holds;
it reads the backend's ``Capabilities`` once and takes one of two paths:

- HTTP backends (``in_process = False``): ``build()`` turns (task, input, parameters) into an
  ``HTTPRequest``, the core's transport sends it, ``parse()`` turns the answer into a
  ``ModelResponse`` or raises the ``EndpointError`` subclass that tells the retry policy what to
  do; ``request_done()`` lets a routing backend (a vLLM pool) count what is outstanding.
- in-process backends (``in_process = True``): ``invoke()`` answers one row, and a backend that
  ``runs_whole_batches`` takes a whole Arrow batch at once through ``invoke_batch()``.

``validate_options()`` checks engine options on the driver, when the config is read, before any
task runs; ``prepare()`` starts or attaches what the entity needs on the driver's node (local
servers, pools); ``start()`` makes this process's backend ready to answer (a warm-up).

``BatchContext`` carries what the engine layer knows about the running task (the GPUs Spark gave
it) into a backend without the core importing that layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Mapping, Protocol, Sequence

from .._errors import ConfigError

if TYPE_CHECKING:
    from ..config import ServedEntity
    from .._schemas import ModelParameters, ModelResponse


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do; the core's one lookup instead of asking which kind it holds."""

    limiter: Literal["aimd", "gradient"] = "aimd"
    """The adaptive limiter under ``concurrency: auto``. AIMD grows the requests in flight until the
    endpoint refuses (429/503) or times out: right for remote endpoints, and for the engines this
    project starts (``local_model``, ``vllm_pool``), where what matters to a batch is throughput:
    vLLM batches whatever is in flight up to ``max_num_seqs``, and a queue at our own engine costs
    no throughput. The latency gradient holds in flight where latency starts to rise, which on a
    CPU engine (latency grows with every sequence added) is far below its throughput: measured,
    a 2-replica CPU pool ran at 7.1 rows/s under the gradient and 12.5 filled
    (bench/results/vllm_pool.md). ``gradient`` suits a shared self-hosted server whose other
    users' latency matters; ``concurrency = "gradient"`` picks it."""
    accepts_files: bool = False
    """``files =>`` (images, PDFs) can be sent to it."""
    runs_whole_batches: bool = False
    """It takes a whole batch at once through ``invoke_batch`` (no limiter, no retries)."""
    in_process: bool = False
    """It answers in this process through ``invoke``, not over HTTP."""
    needs_start: bool = False
    """``start()`` has work to do (a local server to start, a model to load): a server warms it."""
    starts_full: bool = False
    """An engine of this project's own (``local_model``, ``vllm_pool``): under AIMD its requests in
    flight start at ``max_concurrency`` (the worker's share), not at ``initial_concurrency``. There is
    no quota to find (vLLM queues what its batch cannot take), and a slow start from 32 at a
    CPU engine's multi-second latency spent several round trips below its batch (512 rows: 36.0 s
    started full, 37.5-41.2 s from 32)."""


@dataclass(frozen=True)
class BatchContext:
    """What the calling engine layer knows about the task running a batch (none of it is required).

    The Spark layer fills it from the task's ``TaskContext``; the core only passes it through.
    """

    gpu_ids: tuple[str, ...] = ()
    """GPU addresses the scheduler assigned to this task (Spark resource scheduling)."""
    online_only: bool = False
    """Send online even where the endpoint's ``client_config.batch_api`` asks for batches (a job's
    batch phase sent them already)."""

    action: str | None = None
    """The user action the batch is part of (Spark: the root SQL execution of ``collect``,
    ``show``, a write): live progress draws one bar per action."""


@dataclass(frozen=True)
class HTTPRequest:
    method: str
    url: str
    headers: Mapping[str, str]
    json: Mapping[str, Any]


class Backend(Protocol):
    """The adapter for one served entity (see the module docstring)."""

    capabilities: Capabilities
    entity: ServedEntity

    @classmethod
    def for_entity(cls, entity: ServedEntity) -> Backend: ...

    @classmethod
    def validate_options(cls, options: Mapping[str, Any], path: str) -> None: ...

    @classmethod
    def prepare(cls, entity: ServedEntity) -> None: ...

    @classmethod
    def model_folder(cls, model: str) -> Path | None: ...

    async def start(self) -> None: ...

    async def build(self, task: str, value: Any, params: ModelParameters, response_format: Mapping[str, Any] | None) -> HTTPRequest: ...

    def parse(self, task: str, status: int, headers: Mapping[str, str], body: bytes, prompt_text: str) -> ModelResponse: ...

    def request_done(self, request: HTTPRequest, error: BaseException | None) -> bool: ...

    async def invoke(self, task: str, value: Any, params: ModelParameters, response_format: Mapping[str, Any] | None,
                     prompt_text: str) -> ModelResponse: ...

    async def invoke_batch(self, task: str, values: Sequence[Any], params: ModelParameters,
                           response_format: Mapping[str, Any] | None,
                           context: BatchContext | None = None) -> list[ModelResponse | Exception]: ...


class BackendBase:
    """Defaults for the optional parts of ``Backend``; a backend overrides what its capabilities promise."""

    capabilities: ClassVar[Capabilities] = Capabilities()
    entity: ServedEntity

    @classmethod
    def for_entity(cls, entity: ServedEntity) -> Backend:
        """The backend for ``entity`` (a kind with several modes picks the class here)."""
        return cls(entity)  # type: ignore[call-arg,return-value]

    @classmethod
    def validate_options(cls, options: Mapping[str, Any], path: str) -> None:
        """Engine options of this kind; a kind without engine options takes none."""
        if options:
            raise ConfigError(f"{path}: this kind of served entity takes no engine options, got {sorted(options)}; remove them")

    @classmethod
    def prepare(cls, entity: ServedEntity) -> None:
        """Start or attach what ``entity`` needs on this node, blocking (nothing for remote endpoints)."""

    @classmethod
    def model_folder(cls, model: str) -> Path | None:
        """The folder of a model this backend knows by name (a local alias), else None."""
        return None

    async def start(self) -> None:
        """Make this process's backend ready to answer (nothing for remote endpoints)."""

    async def build(self, task: str, value: Any, params: ModelParameters, response_format: Mapping[str, Any] | None) -> HTTPRequest:
        raise NotImplementedError(f"{type(self).__name__} answers in process (invoke), not over HTTP")

    def parse(self, task: str, status: int, headers: Mapping[str, str], body: bytes, prompt_text: str) -> ModelResponse:
        raise NotImplementedError(f"{type(self).__name__} answers in process (invoke), not over HTTP")

    def probe_request(self) -> HTTPRequest | None:
        """A cheap, unpaid request that proves the endpoint is there and takes our key (``None``: none exists).

        Jobs and ``ai-query run`` send it once per endpoint before the first paid request: an
        unreachable host, a refused key (401/403) or a wrong URL (404) then stops the job for free.
        """
        return None

    def request_done(self, request: HTTPRequest, error: BaseException | None) -> bool:
        """Called when a request built here finished; True if a retry should go to another replica."""
        return False

    async def invoke(self, task: str, value: Any, params: ModelParameters, response_format: Mapping[str, Any] | None,
                     prompt_text: str) -> ModelResponse:
        raise NotImplementedError(f"{type(self).__name__} answers over HTTP (build/parse), not in process")

    async def invoke_batch(self, task: str, values: Sequence[Any], params: ModelParameters,
                           response_format: Mapping[str, Any] | None,
                           context: BatchContext | None = None) -> list[ModelResponse | Exception]:
        raise NotImplementedError(f"{type(self).__name__} does not run whole batches")
