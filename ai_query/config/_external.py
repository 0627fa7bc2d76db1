"""Models hosted by a provider and reached over its HTTP API: the provider configs and ``ExternalModel``.

A credential is a secret reference (``{{secrets/scope/key}}``, resolved at call time) or, if one
really must, a plain value in a ``*_plaintext`` field that is masked in every repr and dict.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import msgspec

from .._errors import ConfigError
from ._checks import TASKS, ConfigStruct, HttpUrl, NonEmpty, Task, building, check_keys, decode, mapping
from ._secrets import is_secret_ref


class _ProviderConfig(ConfigStruct):
    """What the provider configs share: a credential (a secret reference or a plain value, at
    most one) and a base URL given without its trailing slash."""

    _credential_fields: ClassVar[tuple[str, str]]
    """(the secret reference's field, the plain value's field)"""
    _url_field: ClassVar[str]
    _accepted: ClassVar[tuple[str, ...]] = ()
    """Fields of the Databricks format accepted and ignored."""

    def _check(self, path: str) -> None:
        ref_key, plain_key = self._credential_fields
        ref, plain = self.credential()
        if ref is not None and not is_secret_ref(ref):
            raise ConfigError(
                f"{path}.{ref_key} must be a secret reference like '{{{{secrets/my_scope/my_key}}}}' "
                "(the value itself must not live in a config file); put the value in the environment variable "
                f"that reference names, or use {plain_key} if you really must"
            )
        if ref is not None and plain is not None:
            raise ConfigError(f"{path}: set only one of {ref_key} and {plain_key}")

    @classmethod
    def from_dict(cls, data: Any, path: str) -> Any:
        data = mapping(data, path)
        url = data.get(cls._url_field)
        if isinstance(url, str):
            data = {**data, cls._url_field: url.rstrip("/")}
        return decode(cls, data, path, accepted=cls._accepted)

    def credential(self) -> tuple[str | None, str | None]:
        """(secret reference, plain value); at most one is set."""
        ref_key, plain_key = self._credential_fields
        return getattr(self, ref_key), getattr(self, plain_key)

    def to_dict(self) -> dict[str, Any]:
        """The config as a dict: unset fields left out, a plain-text credential masked."""
        return {
            name: "********" if name.endswith("_plaintext") else value
            for name, value in msgspec.to_builtins(self).items()
            if value is not None
        }


class OpenAIConfig(_ProviderConfig):
    """Credentials and base URL of an OpenAI-compatible API (any ``openai_api_base``)."""

    _credential_fields = ("openai_api_key", "openai_api_key_plaintext")
    _url_field = "openai_api_base"
    _accepted = ("openai_api_type",)

    openai_api_key: NonEmpty | None = None
    """A secret reference ``{{secrets/scope/key}}``; resolved at call time."""
    openai_api_key_plaintext: NonEmpty | None = None
    """A key in plain text; discouraged, never printed. Prefer ``openai_api_key``."""
    openai_api_base: HttpUrl = "https://api.openai.com/v1"
    openai_organization: NonEmpty | None = None


class AnthropicConfig(_ProviderConfig):
    """Credentials of the Anthropic Messages API."""

    _credential_fields = ("anthropic_api_key", "anthropic_api_key_plaintext")
    _url_field = "anthropic_api_base"

    anthropic_api_key: NonEmpty | None = None
    anthropic_api_key_plaintext: NonEmpty | None = None
    anthropic_api_base: HttpUrl = "https://api.anthropic.com"
    anthropic_version: NonEmpty = "2023-06-01"


class ServingEndpointConfig(_ProviderConfig):
    """A serving endpoint of a workspace: ``POST {workspace_url}/serving-endpoints/{name}/invocations``."""

    _credential_fields = ("databricks_api_token", "databricks_api_token_plaintext")
    _url_field = "databricks_workspace_url"

    databricks_workspace_url: HttpUrl
    databricks_api_token: NonEmpty | None = None
    databricks_api_token_plaintext: NonEmpty | None = None


ProviderConfig = OpenAIConfig | AnthropicConfig | ServingEndpointConfig
Provider = Literal["openai", "anthropic", "databricks-model-serving"]
# provider name -> (its config key, its config class, the tasks it serves)
PROVIDER_CONFIGS: dict[str, tuple[str, type, tuple[str, ...]]] = {
    "openai": ("openai_config", OpenAIConfig, TASKS),
    "anthropic": ("anthropic_config", AnthropicConfig, ("llm/v1/chat", "llm/v1/completions")),
    "databricks-model-serving": ("databricks_model_serving_config", ServingEndpointConfig, TASKS),
}


class ExternalModel(ConfigStruct):
    """A model hosted by a provider, reached over its HTTP API."""

    name: NonEmpty
    provider: Provider
    task: Task
    config: ProviderConfig | None = None

    @property
    def openai_config(self) -> OpenAIConfig | None:
        return self.config if isinstance(self.config, OpenAIConfig) else None

    def _check(self, path: str) -> None:
        config_key, config_cls, tasks = PROVIDER_CONFIGS[self.provider]
        if self.task not in tasks:
            raise ConfigError(
                f"{path}.task is {self.task!r}, which provider {self.provider!r} does not serve; use one of {', '.join(tasks)}"
            )
        if self.config is not None and not isinstance(self.config, config_cls):
            raise ConfigError(f"{path}: a {type(self.config).__name__} does not go with provider {self.provider!r}; use {config_key}")

    @classmethod
    def from_dict(cls, data: Any, path: str) -> "ExternalModel":
        data = mapping(data, path)
        config_keys = [key for key, _, _ in PROVIDER_CONFIGS.values()]
        check_keys(data, ("name", "provider", "task", *config_keys), path)
        provider = data.get("provider")
        if provider not in PROVIDER_CONFIGS:
            raise ConfigError(f"{path}.provider is {provider!r}; supported providers are {', '.join(PROVIDER_CONFIGS)}")
        config_key, config_cls, _ = PROVIDER_CONFIGS[provider]
        if config_key not in data:
            raise ConfigError(f"{path}.{config_key} is required for provider {provider!r} (it holds the credentials and the URL)")
        others = [k for k in config_keys if k in data and k != config_key]
        if others:
            raise ConfigError(f"{path}: {', '.join(others)} does not go with provider {provider!r}; use {config_key}")
        config = config_cls.from_dict(data[config_key], f"{path}.{config_key}")  # type: ignore[attr-defined]
        with building(path):
            return cls(data.get("name"), provider, data.get("task"), config)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "provider": self.provider, "task": self.task}
        if self.config is not None:
            out[PROVIDER_CONFIGS[self.provider][0]] = self.config.to_dict()
        return out
