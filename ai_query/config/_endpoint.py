"""A named endpoint (``EndpointConfig``): its served entities, how traffic splits between them,
fallback, per-key rate limits, tags and the client's settings, in the shape of serving-endpoint JSON::

    {"name": "openai_chat",
     "config": {"served_entities": [{
         "name": "gpt",
         "external_model": {"name": "gpt-4o-mini", "provider": "openai", "task": "llm/v1/chat",
                            "openai_config": {"openai_api_key": "{{secrets/my_scope/openai_key}}"}}}],
                "traffic_config": {"routes": [{"served_model_name": "gpt", "traffic_percentage": 100}]}},
     "ai_gateway": {"fallback_config": {"enabled": false}},
     "rate_limits": [{"calls": 100, "key": "user", "renewal_period": "minute"}],
     "tags": [{"key": "team", "value": "gen-ai"}],
     "client_config": {"max_concurrency": 32}}
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

from .._errors import ConfigError
from ._checks import ConfigStruct, NonEmpty, building, check_keys, mapping
from ._client_config import ClientConfig, RateLimit

BATCH_API_PROVIDERS = ("openai", "anthropic")
"""External-model providers with a batch API (``client_config.batch_api``)."""
from ._entities import ServedEntity


class EndpointConfig(ConfigStruct):
    """A named endpoint: one or more served entities behind one name."""

    name: NonEmpty
    served_entities: tuple[ServedEntity, ...]
    rate_limits: tuple[RateLimit, ...] = ()
    tags: tuple[tuple[str, str], ...] = ()
    client_config: ClientConfig = ClientConfig()
    traffic_routes: tuple[tuple[str, Annotated[int, Meta(ge=0)]], ...] = ()
    """(served entity name, traffic percentage); empty: all traffic to the first entity."""
    fallback_enabled: bool = False
    """On 429 / 5xx / timeouts after retries, try the next served entity (``ai_gateway.fallback_config``)."""

    @property
    def task(self) -> str:
        return self.served_entities[0].task

    @property
    def entity(self) -> ServedEntity:
        """The served entity that takes traffic when the endpoint does not split it."""
        return self.served_entities[0]

    def _check(self, path: str) -> None:
        entities = self.served_entities
        if not entities:
            raise ConfigError(f"{path}.config.served_entities must be a non-empty list of served entities")
        names = [e.name for e in entities]
        routes_path = f"{path}.config.traffic_config.routes"
        for i, (name, percentage) in enumerate(self.traffic_routes):
            if name not in names:
                raise ConfigError(f"{routes_path}[{i}] names {name!r}, which is not a served entity of this endpoint ({', '.join(names)})")
            if isinstance(percentage, bool) or not isinstance(percentage, int) or percentage < 0:
                raise ConfigError(f"{routes_path}[{i}].traffic_percentage must be an integer >= 0, got {percentage!r}")
        total = sum(p for _, p in self.traffic_routes)
        if self.traffic_routes and total != 100:
            raise ConfigError(f"{routes_path}: traffic percentages add up to {total}, not 100")
        if any(e.external_model for e in entities) and len(entities) != 1 and not (self.traffic_routes or self.fallback_enabled):
            raise ConfigError(
                f"{path}: an endpoint with an external_model has exactly one served entity, unless it splits traffic "
                "(config.traffic_config.routes) or falls back (ai_gateway.fallback_config.enabled)"
            )
        tasks = {e.task for e in entities}
        if len(tasks) != 1:
            raise ConfigError(f"{path}: all served entities must share one task, found {sorted(tasks)}")
        if len(set(names)) != len(names):
            raise ConfigError(f"{path}: served entity names must be unique, found {names}")
        if self.client_config.batch_api is not None:
            self._check_batch_api(path)

    def _check_batch_api(self, path: str) -> None:
        entity = self.served_entities[0]
        provider = entity.external_model.provider if entity.external_model is not None else None
        where = f"{path}.client_config.batch_api"
        if len(self.served_entities) != 1:
            raise ConfigError(f"{where} is set on an endpoint with {len(self.served_entities)} served entities; batch mode sends "
                              "every row to one entity's batch API: give the endpoint one served entity, or remove batch_api")
        if provider not in BATCH_API_PROVIDERS and entity.vllm_pool is None:
            what = f"external_model provider {provider!r}" if provider else f"a {entity.kind} entity"
            raise ConfigError(f"{where} is set, but served entity {entity.name!r} is {what}, which has no batch API; "
                              f"batch mode needs an external_model with provider {' or '.join(map(repr, BATCH_API_PROVIDERS))}, "
                              "or a vllm_pool (vLLM's batch runner): point the endpoint at one, or remove client_config.batch_api to send rows online")
        if self.task not in ("llm/v1/chat", "llm/v1/completions"):
            raise ConfigError(f"{where} is set on an endpoint of task {self.task!r}; batch mode sends chat and completions "
                              "requests only: remove client_config.batch_api to send these rows online")

    @classmethod
    def from_dict(cls, data: Any, path: str = "endpoint") -> "EndpointConfig":
        data = mapping(data, path)
        check_keys(data, ("name", "config", "rate_limits", "tags", "client_config", "route_optimized", "ai_gateway"), path)
        name = data.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{path}.name must be a non-empty string, got {name!r:.80}" if name is not None else f"{path}.name is required (a non-empty string)")
        path = f"{path}[{name!r}]"
        if "config" not in data:
            raise ConfigError(f"{path}.config is required: {{\"served_entities\": [...]}}")
        config = mapping(data["config"], f"{path}.config")
        check_keys(config, ("served_entities", "traffic_config", "auto_capture_config"), f"{path}.config")
        entities_raw = config.get("served_entities")
        if not isinstance(entities_raw, list) or not entities_raw:
            raise ConfigError(f"{path}.config.served_entities must be a non-empty list of served entities")
        entities = tuple(ServedEntity.from_dict(e, f"{path}.config.served_entities[{i}]") for i, e in enumerate(entities_raw))
        routes = _traffic_routes(config.get("traffic_config"), f"{path}.config.traffic_config")
        fallback = _fallback_enabled(data.get("ai_gateway"), f"{path}.ai_gateway")
        limits_raw = data.get("rate_limits", [])
        if not isinstance(limits_raw, list):
            raise ConfigError(f"{path}.rate_limits must be a list")
        limits = tuple(RateLimit.from_dict(r, f"{path}.rate_limits[{i}]") for i, r in enumerate(limits_raw))
        tags_raw = data.get("tags", [])
        if not isinstance(tags_raw, list):
            raise ConfigError(f"{path}.tags must be a list of {{\"key\": ..., \"value\": ...}}")
        tags = []
        for i, tag in enumerate(tags_raw):
            tag = mapping(tag, f"{path}.tags[{i}]")
            check_keys(tag, ("key", "value"), f"{path}.tags[{i}]")
            key = tag.get("key")
            if not isinstance(key, str) or not key.strip():
                raise ConfigError(f"{path}.tags[{i}].key must be a non-empty string, got {key!r:.80}")
            tags.append((key, str(tag.get("value", ""))))
        client = ClientConfig.from_dict(data.get("client_config", {}), f"{path}.client_config")
        with building(path):
            return cls(name, entities, limits, tuple(tags), client, routes, fallback)

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
            "rate_limits": [msgspec.structs.asdict(r) for r in self.rate_limits],
            "tags": [{"key": k, "value": v} for k, v in self.tags],
            "client_config": {k: (msgspec.structs.asdict(v) if isinstance(v, msgspec.Struct) else v)
                              for k, v in msgspec.structs.asdict(self.client_config).items()
                              if k != "batch_api" or v is not None},
        }


def _traffic_routes(data: Any, path: str) -> tuple[tuple[str, int], ...]:
    if data is None:
        return ()
    data = mapping(data, path)
    check_keys(data, ("routes",), path)
    routes_raw = data.get("routes")
    if not isinstance(routes_raw, list) or not routes_raw:
        raise ConfigError(f"{path}.routes must be a non-empty list of {{\"served_model_name\": ..., \"traffic_percentage\": ...}}")
    routes = []
    for i, route in enumerate(routes_raw):
        route = mapping(route, f"{path}.routes[{i}]")
        check_keys(route, ("served_model_name", "served_entity_name", "traffic_percentage"), f"{path}.routes[{i}]")
        routes.append((route.get("served_model_name", route.get("served_entity_name")), route.get("traffic_percentage", 0)))
    return tuple(routes)


def _fallback_enabled(data: Any, path: str) -> bool:
    if data is None:
        return False
    data = mapping(data, path)
    check_keys(data, ("fallback_config",), path)
    fallback = mapping(data.get("fallback_config", {}), f"{path}.fallback_config")
    check_keys(fallback, ("enabled",), f"{path}.fallback_config")
    enabled = fallback.get("enabled", False)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{path}.fallback_config.enabled must be true or false, got {enabled!r}")
    return enabled
