"""[1 resolve] Endpoint configs, the endpoint registry and secret references.

Configs are frozen msgspec Structs checked at construction (bounds and choices in their
annotations, cross-field rules in ``_check``), whether built by ``from_dict`` from serving-endpoint
JSON or directly in code; every error names the field's path, the value and the fix.

    _checks.py            ConfigStruct, the checks and the translation of msgspec's errors into ours
    _external.py          OpenAIConfig, AnthropicConfig, ServingEndpointConfig, ExternalModel
    _entities.py          LocalModel, VLLMPool, Pricing, ServedEntity (one of four kinds: ``kind``)
    _client_config.py     ClientConfig, RateLimit
    _endpoint.py          EndpointConfig (traffic split, fallback)
    _endpoint_registry.py EndpointRegistry
    _secrets.py           {{secrets/scope/key}} references
"""

from ._checks import TASKS, ConfigStruct, Task, building
from ._client_config import BatchAPIConfig, ClientConfig, RateLimit, duration_s
from ._endpoint import EndpointConfig
from ._entities import ENTITY_KINDS, POOL_DEVICES, POOL_MODES, EntityKind, LocalModel, Pricing, ServedEntity, VLLMPool
from ._external import PROVIDER_CONFIGS, AnthropicConfig, ExternalModel, OpenAIConfig, ProviderConfig, ServingEndpointConfig
from ._endpoint_registry import EndpointRegistry
from ._secrets import SECRET_REF, is_secret_ref, mask, resolve_secret, secret_env_var

__all__ = [
    "AnthropicConfig",
    "BatchAPIConfig",
    "ClientConfig",
    "ConfigStruct",
    "ENTITY_KINDS",
    "EndpointConfig",
    "EndpointRegistry",
    "EntityKind",
    "ExternalModel",
    "LocalModel",
    "OpenAIConfig",
    "POOL_DEVICES",
    "POOL_MODES",
    "PROVIDER_CONFIGS",
    "Pricing",
    "ProviderConfig",
    "RateLimit",
    "SECRET_REF",
    "ServedEntity",
    "ServingEndpointConfig",
    "TASKS",
    "Task",
    "VLLMPool",
    "building",
    "duration_s",
    "is_secret_ref",
    "mask",
    "resolve_secret",
    "secret_env_var",
]
