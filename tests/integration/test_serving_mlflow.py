"""``mlflow.deployments`` against the serving endpoint, and MLflow pyfunc models as served entities.

The server runs in this process (uvicorn in a thread) with a file model registry
(``MLFLOW_ALLOW_FILE_STORE=true``); the MLflow client is MLflow's own, through our plugin.
"""

from __future__ import annotations

import textwrap
import time
import warnings

import pytest

from ai_query.serving import ServingServer
from ai_query.testing import ProviderSimulator

pytestmark = pytest.mark.integration

TOKEN = "tok-mlflow-admin-0001"

SHOUT = """
    import time
    import mlflow
    from mlflow.pyfunc import PythonModel

    class Shout(PythonModel):
        def load_context(self, context):
            time.sleep({delay})   # a model that takes a while to deploy

        def predict(self, context, model_input: list[str], params=None) -> list[str]:
            return [{transform} for t in model_input]

    mlflow.models.set_model(Shout())
"""


def register(tmp_path, name: str, delay: float, transform: str) -> None:
    import mlflow
    import mlflow.pyfunc

    source = tmp_path / f"{name}-{time.monotonic_ns()}.py"
    source.write_text(textwrap.dedent(SHOUT.format(delay=delay, transform=transform)))
    with warnings.catch_warnings(), mlflow.start_run():
        warnings.simplefilter("ignore")
        mlflow.pyfunc.log_model(name="model", python_model=str(source), registered_model_name=name, pip_requirements=[])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("mlflow-serving")
    mp.setenv("MLFLOW_TRACKING_URI", (root / "mlruns").as_uri())
    mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mp.setenv("AIQ_SERVING_TOKEN", TOKEN)
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def server(env):
    with ProviderSimulator(api_key="sk-sim") as sim, ServingServer(state_dir=env / "state", include_registry=False) as s:
        s.sim = sim
        yield s


@pytest.fixture(scope="module")
def client(server):
    from mlflow.deployments import get_deploy_client

    return get_deploy_client(f"ai-query:{server.url}")


def test_the_reference_mlflow_calls_work_through_the_plugin(client, server):
    sim = server.sim
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MLflow's deprecation notes on create/update_endpoint
        endpoint = client.create_endpoint(name="chat", config={"served_entities": [{"name": "completions", "external_model": {
            "name": "gpt-4", "provider": "openai", "task": "llm/v1/chat",
            "openai_config": {"openai_api_key": "{{secrets/sim/key}}", "openai_api_base": sim.base_url}}}]})
        updated = client.update_endpoint(endpoint="chat", config={"served_entities": [{"name": "chats", "external_model": {
            "name": "gpt-4", "provider": "openai", "task": "llm/v1/chat",
            "openai_config": {"openai_api_key": "{{secrets/sim/key}}", "openai_api_base": sim.base_url}}}]})
        rate_limits = client.update_endpoint(endpoint="chat", config={"rate_limits": [{"key": "user", "renewal_period": "minute", "calls": 10}]})
    assert endpoint["name"] == "chat" and endpoint["creator"] == "admin" and len(endpoint["id"]) == 32
    assert set(endpoint) >= {"creation_timestamp", "last_updated_timestamp", "state", "config", "tags", "id"}
    assert updated["config"]["served_entities"][0]["name"] == "chats" and updated["config"]["config_version"] == 2
    assert rate_limits == {"rate_limits": [{"key": "user", "renewal_period": "minute", "calls": 10}]}
    answer = client.predict(endpoint="chat", inputs={"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16})
    assert answer["choices"][0]["message"]["content"] == "echo: Hello!" and answer["usage"]["total_tokens"] == 3
    assert client.get_endpoint(endpoint="chat")["rate_limits"][0]["calls"] == 10
    assert "chat" in [e["name"] for e in client.list_endpoints()]
    tags = client.update_endpoint_tags(endpoint="chat", config={"add_tags": [{"key": "project", "value": "test"}]})
    assert tags == {"tags": [{"key": "project", "value": "test"}]}
    client.delete_endpoint(endpoint="chat")
    assert "chat" not in [e["name"] for e in client.list_endpoints()]


def test_a_registered_pyfunc_model_is_served_and_an_update_keeps_the_old_config_until_the_new_is_ready(client, server, env):
    from requests.exceptions import HTTPError  # what MLflow's Databricks client raises too

    register(env, "shouter", 0.0, "t.upper()")
    register(env, "shouter", 3.0, "t.upper() + '!'")  # version 2 takes 3 s to load
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the provisioned-throughput reference body: entity_name + entity_version, no task (read from the model)
        created = client.create_endpoint(config={"name": "shout", "config": {"served_entities": [
            {"entity_name": "shouter", "entity_version": 1}]}})
    for _ in range(200):
        if client.get_endpoint(endpoint="shout")["state"]["ready"] == "READY":
            break
        time.sleep(0.05)
    assert created["config"]["served_entities"][0]["task"] == "llm/v1/completions"
    assert client.predict(endpoint="shout", inputs={"prompt": "hello"})["choices"][0]["text"] == "HELLO"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pending = client.update_endpoint(endpoint="shout", config={"served_entities": [{"entity_name": "shouter", "entity_version": "2"}]})
        assert pending["state"]["config_update"] == "IN_PROGRESS" and pending["pending_config"]["config_version"] == 2
        with pytest.raises(HTTPError, match="update in progress"):
            client.update_endpoint(endpoint="shout", config={"served_entities": [{"entity_name": "shouter", "entity_version": "1"}]})
    # while version 2 loads, version 1 answers
    assert client.predict(endpoint="shout", inputs={"prompt": "still one"})["choices"][0]["text"] == "STILL ONE"
    for _ in range(300):
        got = client.get_endpoint(endpoint="shout")
        if got["state"]["config_update"] == "NOT_UPDATING":
            break
        time.sleep(0.05)
    assert got["config"]["config_version"] == 2 and "pending_config" not in got
    assert client.predict(endpoint="shout", inputs={"prompt": "now two"})["choices"][0]["text"] == "NOW TWO!"
    # created without an external model: it cannot add one
    with pytest.raises(HTTPError, match="cannot add one"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            client.update_endpoint(endpoint="shout", config={"served_entities": [{"name": "x", "external_model": {
                "name": "m", "provider": "openai", "task": "llm/v1/completions", "openai_config": {"openai_api_key": "{{secrets/sim/key}}"}}}]})
    client.delete_endpoint(endpoint="shout")


def test_model_optimization_info(server, env):
    import httpx

    headers = {"Authorization": f"Bearer {TOKEN}"}
    register(env, "tiny-pyfunc", 0.0, "t")
    pyfunc = httpx.get(server.url + "/api/2.0/serving-endpoints/get-model-optimization-info/tiny-pyfunc/1", headers=headers)
    local = httpx.get(server.url + "/api/2.0/serving-endpoints/get-model-optimization-info/smollm2-135m-instruct/1", headers=headers)
    missing = httpx.get(server.url + "/api/2.0/serving-endpoints/get-model-optimization-info/nothing/3", headers=headers)
    assert pyfunc.json() == {"optimizable": False, "model_type": "pyfunc"}
    assert local.json() == {"optimizable": True, "model_type": "llama", "throughput_chunk_size": 250}
    assert missing.status_code == 404 and missing.json()["error_code"] == "RESOURCE_DOES_NOT_EXIST"
