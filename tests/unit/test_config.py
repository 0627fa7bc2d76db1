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
