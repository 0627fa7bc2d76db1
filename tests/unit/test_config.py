import json

import pytest

from ai_query import ConfigError, EndpointRegistry, UnknownEndpointError
from ai_query.config import resolve_secret, secret_env_var
from ai_query import SecretNotFoundError

DOC_EXAMPLE = {
    "name": "openai_endpoint",
    "config": {"served_entities": [{"name": "openai_embeddings", "external_model": {
        "name": "text-embedding-ada-002", "provider": "openai", "task": "llm/v1/embeddings",
        "openai_config": {"openai_api_key": "{{secrets/my_scope/my_openai_api_key}}"}}}]},
    "rate_limits": [{"calls": 100, "key": "user", "renewal_period": "minute"}],
    "tags": [{"key": "team", "value": "gen-ai"}],
}


def test_reference_document_example_loads_and_round_trips():
    registry = EndpointRegistry.from_data(DOC_EXAMPLE)
    ep = registry.get("openai_endpoint")
    assert ep.task == "llm/v1/embeddings"
    assert ep.entity.model_name == "text-embedding-ada-002"
    assert ep.rate_limits[0].calls == 100
    assert ep.tags == (("team", "gen-ai"),)
    again = EndpointRegistry.from_data(ep.to_dict()).get("openai_endpoint")
    assert again == ep


def test_builtin_endpoints_are_ordinary_entries():
    registry = EndpointRegistry.builtin()
    assert {"local-chat", "local-embed"} <= set(registry.names())
    assert registry.get("local-embed").task == "llm/v1/embeddings"
    assert registry.get("local-chat").entity.local_model is not None


def test_unknown_endpoint_lists_known_ones():
    with pytest.raises(UnknownEndpointError) as info:
        EndpointRegistry.builtin().get("no-such-endpoint")
    assert "'no-such-endpoint'" in str(info.value) and "'local-chat'" in str(info.value)


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d["config"]["served_entities"][0]["external_model"].update(provider="bogus"), "provider is 'bogus'"),
        (lambda d: d["config"]["served_entities"][0]["external_model"].update(task="llm/v2/chat"), "task is 'llm/v2/chat'"),
        (lambda d: d["config"]["served_entities"][0]["external_model"]["openai_config"].update(openai_api_key="sk-123"), "secret reference"),
        (lambda d: d["config"]["served_entities"][0]["external_model"].update(temprature=1), "unknown field(s) 'temprature'"),
        (lambda d: d["config"]["served_entities"].append(dict(d["config"]["served_entities"][0], name="b")), "exactly one served entity"),
        (lambda d: d["rate_limits"][0].update(calls=0), "calls must be >= 1"),
        (lambda d: d.update(client_config={"initial_concurrency": 100, "max_concurrency": 4}), "initial_concurrency (100)"),
        (lambda d: d["config"].update(served_entities=[]), "non-empty list"),
        (lambda d: d["config"]["served_entities"][0]["external_model"].pop("openai_config"), "openai_config is required"),
    ],
)
def test_bad_configs_name_the_field_and_the_fix(mutate, expected):
    data = json.loads(json.dumps(DOC_EXAMPLE))
    mutate(data)
    with pytest.raises(ConfigError) as info:
        EndpointRegistry.from_data(data)
    assert expected in str(info.value)
    assert "openai_endpoint" in str(info.value)


def test_registry_file_and_override(tmp_path, monkeypatch):
    path = tmp_path / "endpoints.json"
    override = dict(json.loads(json.dumps(DOC_EXAMPLE)), name="local-chat")
    path.write_text(json.dumps({"endpoints": [DOC_EXAMPLE, override]}))
    monkeypatch.setenv("AIQ_ENDPOINTS", str(path))
    registry = EndpointRegistry.default()
    assert registry.get("local-chat").entity.external_model is not None
    assert "openai_endpoint" in registry


def test_bad_json_file_names_the_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json is not valid JSON"):
        EndpointRegistry.from_file(path)


def test_secrets_resolve_from_env_then_file_and_never_echo(tmp_path, monkeypatch):
    ref = "{{secrets/my_scope/my-key}}"
    assert secret_env_var("my_scope", "my-key") == "AIQ_SECRET_MY_SCOPE_MY_KEY"
    monkeypatch.delenv("AIQ_SECRET_MY_SCOPE_MY_KEY", raising=False)
    monkeypatch.delenv("AIQ_SECRETS_FILE", raising=False)
    with pytest.raises(SecretNotFoundError, match="AIQ_SECRET_MY_SCOPE_MY_KEY"):
        resolve_secret(ref)
    secrets = tmp_path / "secrets.json"
    secrets.write_text(json.dumps({"my_scope": {"my-key": "from-file"}}))
    monkeypatch.setenv("AIQ_SECRETS_FILE", str(secrets))
    assert resolve_secret(ref) == "from-file"
    monkeypatch.setenv("AIQ_SECRET_MY_SCOPE_MY_KEY", "from-env")
    assert resolve_secret(ref) == "from-env"


def test_plaintext_key_is_masked_everywhere():
    data = json.loads(json.dumps(DOC_EXAMPLE))
    cfg = data["config"]["served_entities"][0]["external_model"]["openai_config"]
    cfg.pop("openai_api_key")
    cfg["openai_api_key_plaintext"] = "sk-very-secret"
    ep = EndpointRegistry.from_data(data).get("openai_endpoint")
    assert "sk-very-secret" not in repr(ep)
    assert "sk-very-secret" not in json.dumps(ep.to_dict())


# --- typed configs: checked at construction, whatever builds them ---------------------------

import pickle  # noqa: E402

from ai_query.config import (  # noqa: E402
    ClientConfig,
    EndpointConfig,
    LocalModel,
    OpenAIConfig,
    Pricing,
    RateLimit,
    ServedEntity,
    VLLMPool,
)


@pytest.mark.parametrize(
    "build, expected",
    [
        (lambda: ClientConfig(initial_concurrency=100, max_concurrency=1),
         "ClientConfig.initial_concurrency (100) is larger than max_concurrency (1); lower it or raise max_concurrency"),
        (lambda: ClientConfig(max_concurrency=0), "ClientConfig.max_concurrency must be >= 1, got 0"),
        (lambda: ClientConfig(request_timeout_s="soon"), "ClientConfig.request_timeout_s must be a number >= 0.001, got 'soon'"),
        (lambda: ClientConfig(concurrency="fast"), "ClientConfig.concurrency is 'fast'; use one of auto, aimd, gradient"),
        (lambda: ClientConfig(deduplicate="yes"), "ClientConfig.deduplicate must be true or false, got 'yes'"),
        (lambda: ClientConfig().replace(max_attempts=0), "ClientConfig.max_attempts must be >= 1, got 0"),
        (lambda: RateLimit(0), "RateLimit.calls must be >= 1, got 0"),
        (lambda: VLLMPool("m", "llm/v1/chat", gpu_memory_utilization=1.5),
         "VLLMPool.gpu_memory_utilization must be a fraction in (0, 1], e.g. 0.9, got 1.5"),
        (lambda: VLLMPool("m", "llm/v1/chat", replicas=2, gpu_ids=(0,)), "needs 2; list 2 GPUs or change replicas"),
        (lambda: LocalModel("", "llm/v1/chat"), "LocalModel.model must be a non-empty string, got ''"),
        (lambda: OpenAIConfig(openai_api_key="sk-123"), "OpenAIConfig.openai_api_key must be a secret reference"),
        (lambda: ServedEntity("x"), "ServedEntity must have exactly one of external_model, local_model"),
        (lambda: ServedEntity("x", local_model=LocalModel("m", "llm/v1/chat"), min_provisioned_throughput=5),
         "min_provisioned_throughput needs max_provisioned_throughput"),
        (lambda: Pricing(-1.0, 0.0), "Pricing.input_usd_per_million_tokens must be >= 0, got -1.0"),
        (lambda: EndpointConfig("e", ()), "EndpointConfig.config.served_entities must be a non-empty list"),
        (lambda: EndpointConfig("e", (ServedEntity("a", local_model=LocalModel("m", "llm/v1/chat")),), traffic_routes=(("b", 100),)),
         "EndpointConfig.config.traffic_config.routes[0] names 'b', which is not a served entity of this endpoint (a)"),
    ],
)
def test_configs_built_directly_are_checked_with_the_same_messages(build, expected):
    with pytest.raises(ConfigError) as info:
        build()
    assert expected in str(info.value)


def _client_config(client_config):
    data = json.loads(json.dumps(DOC_EXAMPLE))
    data["client_config"] = client_config
    return {"endpoints": [data]}


@pytest.mark.parametrize(
    "client_config, expected",
    [
        ({"max_concurrency": 0}, "endpoints[0]['openai_endpoint'].client_config.max_concurrency must be >= 1, got 0"),
        ({"max_concurrency": True}, "endpoints[0]['openai_endpoint'].client_config.max_concurrency must be an integer >= 1, got True"),
        ({"max_concurrency": 2.5}, "client_config.max_concurrency must be an integer >= 1, got 2.5"),
        ({"retry_budget": "lots"}, "client_config.retry_budget must be a number >= 0, got 'lots'"),
        ({"prefix_ordering": "sometimes"}, "client_config.prefix_ordering is 'sometimes'; use one of auto, on, off"),
        ({"max_concurency": 4, "retries": 2}, "client_config: unknown field(s) 'max_concurency', 'retries'; allowed fields are"),
        ([1], "client_config: expected a JSON object, got list"),
    ],
)
def test_from_dict_translates_msgspec_errors_into_messages_naming_the_path(client_config, expected):
    with pytest.raises(ConfigError) as info:
        EndpointRegistry.from_data(_client_config(client_config), "endpoints")
    assert expected in str(info.value)
    assert "Expected `" not in str(info.value)  # msgspec's own wording never reaches a user


def test_from_dict_coerces_json_numbers_and_keeps_defaults():
    ep = EndpointRegistry.from_data(_client_config({"request_timeout_s": 5, "max_concurrency": 16})).get("openai_endpoint")
    assert ep.client_config.request_timeout_s == 5.0 and isinstance(ep.client_config.request_timeout_s, float)
    assert ep.client_config.max_concurrency == 16 and ep.client_config.initial_concurrency == 8


def test_configs_are_frozen_hashable_and_pickle():
    registry = EndpointRegistry.builtin().with_endpoints(EndpointRegistry.from_data(DOC_EXAMPLE))
    for ep in registry:
        again = pickle.loads(pickle.dumps(ep))
        assert again == ep and hash(again) == hash(ep)
    with pytest.raises(AttributeError):
        registry.get("openai_endpoint").client_config.max_concurrency = 3  # type: ignore[misc]


def test_served_entity_kind_names_the_one_of():
    registry = EndpointRegistry.builtin().with_endpoints(EndpointRegistry.from_data([
        DOC_EXAMPLE,
        {"name": "pool", "config": {"served_entities": [{"vllm_pool": {"model": "tiny-llama", "task": "llm/v1/chat"}}]}},
        {"name": "mlflow", "config": {"served_entities": [{"entity_name": "m", "entity_version": 3, "task": "llm/v1/chat"}]}},
    ]))
    assert registry.get("openai_endpoint").entity.kind == "external_model"
    assert registry.get("local-chat").entity.kind == "local_model"
    assert registry.get("pool").entity.kind == "vllm_pool"
    mlflow = registry.get("mlflow").entity
    assert mlflow.kind == "mlflow" and mlflow.entity_version == "3" and mlflow.model_name == "models:/m/3"


def test_plaintext_credentials_are_masked_in_repr_of_configs_built_directly():
    config = OpenAIConfig(openai_api_key_plaintext="sk-very-secret")
    assert "sk-very-secret" not in repr(config)
    assert config.to_dict()["openai_api_key_plaintext"] == "********"
