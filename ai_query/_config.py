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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

from ._errors import ConfigError, UnknownEndpointError
from ._secrets import is_secret_ref

Task = Literal["llm/v1/chat", "llm/v1/completions", "llm/v1/embeddings"]
TASKS: tuple[str, ...] = ("llm/v1/chat", "llm/v1/completions", "llm/v1/embeddings")
PROVIDERS: tuple[str, ...] = ("openai",)


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


def _task(data: Mapping[str, Any], path: str) -> str:
    task = _string(data, "task", path)
    if task not in TASKS:
        raise ConfigError(f"{path}.task is {task!r}; use one of {', '.join(TASKS)}")
    return task  # type: ignore[return-value]


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
        key = _string(data, "openai_api_key", path, required=False)
        plain = _string(data, "openai_api_key_plaintext", path, required=False)
        if key is not None and not is_secret_ref(key):
            raise ConfigError(
                f"{path}.openai_api_key must be a secret reference like '{{{{secrets/my_scope/openai_key}}}}' "
                "(the value itself must not live in a config file); put the key in the environment variable "
                "that reference names, or use openai_api_key_plaintext if you really must"
            )
        if key is not None and plain is not None:
            raise ConfigError(f"{path}: set only one of openai_api_key and openai_api_key_plaintext")
        base = _string(data, "openai_api_base", path, required=False, default=cls.openai_api_base)
        assert base is not None
        if not base.startswith(("http://", "https://")):
            raise ConfigError(f"{path}.openai_api_base must be an http(s) URL, got {base!r}")
        return cls(key, plain, base.rstrip("/"), _string(data, "openai_organization", path, required=False))

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
class ExternalModel:
    """A model hosted by a provider, reached over its HTTP API."""

    name: str
    provider: str
    task: str
    openai_config: OpenAIConfig | None = None

    @classmethod
    def from_dict(cls, data: Any, path: str) -> "ExternalModel":
        data = _mapping(data, path)
        _check_keys(data, ("name", "provider", "task", "openai_config"), path)
        name = _string(data, "name", path)
        provider = _string(data, "provider", path)
        if provider not in PROVIDERS:
            raise ConfigError(f"{path}.provider is {provider!r}; supported providers are {', '.join(PROVIDERS)}")
        task = _task(data, path)
        config_key = f"{provider}_config"
        if config_key not in data:
            raise ConfigError(f"{path}.{config_key} is required for provider {provider!r} (it holds the API key and base URL)")
        openai_config = OpenAIConfig.from_dict(data[config_key], f"{path}.{config_key}")
        return cls(name, provider, task, openai_config)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "provider": self.provider, "task": self.task}
        if self.openai_config is not None:
            out["openai_config"] = self.openai_config.to_dict()
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


@dataclass(frozen=True)
class ServedEntity:
    """One model behind an endpoint: exactly one of ``external_model`` or ``local_model``."""

    name: str
    external_model: ExternalModel | None = None
    local_model: LocalModel | None = None

    @property
    def task(self) -> str:
        model = self.external_model or self.local_model
        assert model is not None
        return model.task

    @property
    def model_name(self) -> str:
        """The model name sent in requests and reported in ``aiq_model``."""
        if self.external_model is not None:
            return self.external_model.name
        assert self.local_model is not None
        return self.local_model.model

    @classmethod
    def from_dict(cls, data: Any, path: str) -> "ServedEntity":
        data = _mapping(data, path)
        _check_keys(data, ("name", "external_model", "local_model"), path)
        kinds = [k for k in ("external_model", "local_model") if k in data]
        if len(kinds) != 1:
            raise ConfigError(f"{path} must have exactly one of external_model or local_model, found {kinds or 'neither'}")
        external = ExternalModel.from_dict(data["external_model"], f"{path}.external_model") if "external_model" in data else None
        local = LocalModel.from_dict(data["local_model"], f"{path}.local_model") if "local_model" in data else None
        default_name = (external.name if external else local.model) if (external or local) else None  # type: ignore[union-attr]
        name = _string(data, "name", path, required=False, default=default_name)
        assert name is not None
        return cls(name, external, local)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.external_model is not None:
            out["external_model"] = self.external_model.to_dict()
        if self.local_model is not None:
            out["local_model"] = self.local_model.to_dict()
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
    """Upper bound on requests in flight per Python worker process."""
    initial_concurrency: int = 8
    """Where the adaptive limiter starts; it grows while the endpoint keeps up."""
    request_timeout_s: float = 120.0
    max_attempts: int = 6
    """Attempts per row for 5xx, timeouts, resets and malformed bodies."""
    rate_limit_wait_s: float = 600.0
    """How long a row may keep waiting through 429s (quota windows) before it is failed."""

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
        _check_keys(data, ("name", "config", "rate_limits", "tags", "client_config", "route_optimized"), path)
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
        if any(e.external_model for e in entities) and len(entities) != 1:
            raise ConfigError(f"{path}: an endpoint with an external_model must have exactly one served entity")
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
        return cls(name, entities, limits, tuple(tags), client)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        """The endpoint as JSON-able data; secrets appear only as references or masked."""
        return {
            "name": self.name,
            "config": {"served_entities": [e.to_dict() for e in self.served_entities]},
            "rate_limits": [{"calls": r.calls, "key": r.key, "renewal_period": r.renewal_period} for r in self.rate_limits],
            "tags": [{"key": k, "value": v} for k, v in self.tags],
            "client_config": dict(self.client_config.__dict__),
        }


def _endpoint_list(data: Any, source: str) -> list[Any]:
    if isinstance(data, Mapping) and "endpoints" in data:
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
        items = _endpoint_list(data, source)
        return cls(EndpointConfig.from_dict(item, f"{source}[{i}]") for i, item in enumerate(items))

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
