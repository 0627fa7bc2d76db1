"""The serving endpoint on a real uvicorn server, in front of the provider simulator.

Queries through the official ``openai`` client and plain HTTP, the management API with the
reference documents' bodies, tokens and permission levels, rate limits, persistence across a
restart (also through ``ai-query serve``), masked secrets, and the usage table.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time

import httpx
import pytest

from ai_query import AIQueryClient, EndpointRegistry
from ai_query.sinks import USAGE_SCHEMA
from ai_query.serving import ServingServer
from ai_query.testing import ProviderSimulator

pytestmark = pytest.mark.integration

TOKENS = {"alice": "tok-alice-0123456789", "bob": "tok-bob-0123456789", "carol": "tok-carol-0123456789"}


def external(sim, task, name="sim", **extra):
    return {"name": name, "external_model": {"name": "sim-model", "provider": "openai", "task": task,
                                            "openai_config": {"openai_api_key": "{{secrets/sim/key}}", "openai_api_base": sim.base_url, **extra}}}


@pytest.fixture(scope="module")
def sim():
    with ProviderSimulator(api_key="sk-sim", endpoint_names=["*"]) as s:
        yield s


@pytest.fixture(scope="module")
def files(sim, tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    endpoints = [
        {"name": "sim-chat", "config": {"served_entities": [external(sim, "llm/v1/chat")]}},
        {"name": "sim-completions", "config": {"served_entities": [external(sim, "llm/v1/completions")]}},
        {"name": "sim-embed", "config": {"served_entities": [external(sim, "llm/v1/embeddings")]}},
    ]
    (root / "endpoints.json").write_text(json.dumps(endpoints))
    tokens = {"tokens": [
        {"user": "alice@example.com", "token": TOKENS["alice"], "permissions": {"*": "CAN_MANAGE"}},
        {"user": "bob@example.com", "token": TOKENS["bob"], "permissions": {"sim-chat": "CAN_QUERY", "sim-embed": "CAN_QUERY", "limited": "CAN_QUERY"}},
        {"user": "carol@example.com", "token": TOKENS["carol"], "permissions": {}},
    ]}
    (root / "tokens.json").write_text(json.dumps(tokens))
    return root


@pytest.fixture(scope="module")
def server(files):
    with ServingServer(endpoints=files / "endpoints.json", tokens=files / "tokens.json", state_dir=files / "state",
                       usage_table=str(files / "usage"), include_registry=False) as s:
        yield s


def http(server, user="alice"):
    headers = {"Authorization": f"Bearer {TOKENS[user]}"} if user else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=30)


def openai_client(server, user="alice"):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=TOKENS[user], max_retries=0)


# -- queries ---------------------------------------------------------------------------------

def test_openai_client_chat_completions_embeddings_and_models_match_the_batch_path(server, files):
    client = openai_client(server)
    chat = client.chat.completions.create(model="sim-chat", messages=[{"role": "user", "content": "hello there friend"}],
                                          max_tokens=3, temperature=0.0)
    completion = client.completions.create(model="sim-completions", prompt="once upon a time", max_tokens=8)
    embedding = client.embeddings.create(model="sim-embed", input=["a cat", "a dog"])
    # The same requests through the batch path (AIQueryClient, as a Spark task sends them).
    batch = AIQueryClient(EndpointRegistry.from_file(files / "endpoints.json"))
    try:
        [b_chat] = batch.map("sim-chat", ["hello there friend"], {"max_tokens": 3, "temperature": 0.0})
        [b_completion] = batch.map("sim-completions", ["once upon a time"], {"max_tokens": 8})
        b_embed = batch.map("sim-embed", ["a cat", "a dog"])
    finally:
        batch.close()
    assert chat.choices[0].message.content == b_chat.value == "echo: hello there"
    assert chat.choices[0].finish_reason == "length"
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (b_chat.prompt_tokens, b_chat.completion_tokens) == (3, 3)
    assert completion.choices[0].text == b_completion.value
    assert [d.embedding for d in embedding.data] == [r.value for r in b_embed]
    assert embedding.usage.prompt_tokens == sum(r.prompt_tokens for r in b_embed) == 4
    assert {m.id for m in client.models.list()} == {"sim-chat", "sim-completions", "sim-embed"}


def test_openai_client_streams_server_sent_events(server):
    stream = openai_client(server).chat.completions.create(
        model="sim-chat", messages=[{"role": "user", "content": "stream me please"}], max_tokens=16, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: stream me please"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.total_tokens == 3 + 4


def test_invocations_speak_the_llm_v1_schemas(server):
    with http(server) as c:
        chat = c.post("/serving-endpoints/sim-chat/invocations",
                      json={"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], "max_tokens": 10})
        completions = c.post("/serving-endpoints/sim-completions/invocations", json={"prompt": ["one two", "three"], "max_tokens": 5})
        embed = c.post("/serving-endpoints/sim-embed/invocations", json={"input": "some text"})
        bad = c.post("/serving-endpoints/sim-chat/invocations", json={"messages": [{"role": "user", "content": "x"}], "max_tokens": -1})
        unknown = c.post("/serving-endpoints/sim-chat/invocations", json={"messages": [{"role": "user", "content": "x"}], "frobnicate": 1})
        wrong_task = c.post("/v1/embeddings", json={"model": "sim-chat", "input": "x"})
        missing = c.post("/serving-endpoints/nope/invocations", json={"prompt": "x"})
        upstream = c.post("/serving-endpoints/sim-chat/invocations", json={"messages": [{"role": "user", "content": "[[status:400]] x"}]})
    assert chat.status_code == 200, chat.text
    body = chat.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"] == {"role": "assistant", "content": "echo: be brief\nhi"}
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    texts = [c["text"] for c in completions.json()["choices"]]
    assert texts == ["echo: one two", "echo: three"] and completions.json()["usage"]["prompt_tokens"] == 3
    vec = embed.json()["data"][0]["embedding"]
    assert len(vec) == 8 and abs(sum(x * x for x in vec) - 1) < 1e-6
    assert bad.status_code == 400 and "max_tokens" in bad.json()["message"]
    assert unknown.status_code == 400 and "frobnicate" in unknown.json()["message"]
    assert wrong_task.status_code == 400 and "llm/v1/chat" in wrong_task.json()["error"]["message"]
    assert missing.status_code == 404 and missing.json()["error_code"] == "RESOURCE_DOES_NOT_EXIST"
    assert upstream.status_code == 400 and "HTTP 400" in upstream.json()["message"]


# -- auth --------------------------------------------------------------------------------------

def test_bearer_tokens_and_permission_levels(server):
    with http(server, None) as anon, http(server, "bob") as bob, http(server, "carol") as carol:
        none = anon.post("/serving-endpoints/sim-chat/invocations", json={"messages": [{"role": "user", "content": "x"}]})
        wrong = anon.get("/api/2.0/serving-endpoints", headers={"Authorization": "Bearer not-a-real-token-42"})
        basic = anon.get("/api/2.0/serving-endpoints", headers={"Authorization": "Basic abc"})
        bob_query = bob.post("/serving-endpoints/sim-chat/invocations", json={"messages": [{"role": "user", "content": "x"}]})
        bob_other = bob.post("/serving-endpoints/sim-completions/invocations", json={"prompt": "x"})
        bob_manage = bob.put("/api/2.0/serving-endpoints/sim-chat/rate-limits", json={"rate_limits": []})
        bob_create = bob.post("/api/2.0/serving-endpoints", json={"name": "mine", "config": {"served_entities": []}})
        bob_list = bob.get("/api/2.0/serving-endpoints").json()["endpoints"]
        carol_query = carol.post("/serving-endpoints/sim-chat/invocations", json={"messages": [{"role": "user", "content": "x"}]})
        carol_openai = carol.post("/v1/chat/completions", json={"model": "sim-chat", "messages": [{"role": "user", "content": "x"}]})
    assert none.status_code == 401 and "Authorization: Bearer" in none.json()["message"]
    assert wrong.status_code == 401 and "not-a-real-token-42" not in wrong.text and "invalid access token" in wrong.json()["message"]
    assert basic.status_code == 401 and "Bearer" in basic.json()["message"]
    assert bob_query.status_code == 200
    assert bob_other.status_code == 403 and bob_other.json()["error_code"] == "PERMISSION_DENIED"
    assert "bob@example.com" in bob_other.json()["message"] and "CAN_QUERY" in bob_other.json()["message"]
    assert bob_manage.status_code == 403 and "has CAN_QUERY" in bob_manage.json()["message"] and "CAN_MANAGE" in bob_manage.json()["message"]
    assert bob_create.status_code == 403
    assert {e["name"]: e["permission_level"] for e in bob_list} == {"sim-chat": "CAN_QUERY", "sim-embed": "CAN_QUERY"}
    assert carol_query.status_code == 403 and "has no permission" in carol_query.json()["message"]
    assert carol_openai.status_code == 403 and carol_openai.json()["error"]["type"] == "permission_error"


# -- rate limits ---------------------------------------------------------------------------------

def test_rate_limits_per_user_and_per_endpoint_answer_429_with_retry_after(server, sim):
    body = {"name": "limited", "config": {"served_entities": [external(sim, "llm/v1/chat")]},
            "rate_limits": [{"calls": 3, "key": "user", "renewal_period": "minute"}]}
    ask = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with http(server) as alice, http(server, "bob") as bob:
        assert alice.post("/api/2.0/serving-endpoints", json=body).status_code == 200
        codes = [alice.post("/serving-endpoints/limited/invocations", json=ask).status_code for _ in range(4)]
        refused = alice.post("/serving-endpoints/limited/invocations", json=ask)
        assert codes == [200, 200, 200, 429] and refused.status_code == 429
        assert 1 <= int(refused.headers["Retry-After"]) <= 20
        assert "3 calls per minute per user" in refused.json()["message"]
        assert bob.post("/serving-endpoints/limited/invocations", json=ask).status_code == 200  # per user: bob has his own
        openai_refused = alice.post("/v1/chat/completions", json={"model": "limited", **ask})
        assert openai_refused.status_code == 429 and openai_refused.json()["error"]["type"] == "rate_limit_error"
        put = alice.put("/api/2.0/serving-endpoints/limited/rate-limits",
                        json={"rate_limits": [{"calls": 2, "key": "endpoint", "renewal_period": "minute"}]})
        assert put.status_code == 200 and put.json() == {"rate_limits": [{"calls": 2, "key": "endpoint", "renewal_period": "minute"}]}
        codes = [alice.post("/serving-endpoints/limited/invocations", json=ask).status_code for _ in range(2)]
        assert codes == [200, 200]
        assert bob.post("/serving-endpoints/limited/invocations", json=ask).status_code == 429  # per endpoint: shared
        assert alice.get("/api/2.0/serving-endpoints/limited").json()["rate_limits"][0]["key"] == "endpoint"
        assert alice.delete("/api/2.0/serving-endpoints/limited").status_code == 200


# -- management API ----------------------------------------------------------------------------

REFERENCE_CREATE = {  # create-genai-serving-endpoints: the REST API example, verbatim
    "name": "openai_endpoint",
    "config": {"served_entities": [{"name": "openai_embeddings", "external_model": {
        "name": "text-embedding-ada-002", "provider": "openai", "task": "llm/v1/embeddings",
        "openai_config": {"openai_api_key": "{{secrets/my_scope/my_openai_api_key}}"}}}]},
    "rate_limits": [{"calls": 100, "key": "user", "renewal_period": "minute"}],
    "tags": [{"key": "team", "value": "gen-ai"}],
}


def test_reference_create_body_works_verbatim_and_the_response_has_the_documented_fields(server):
    with http(server) as c:
        created = c.post("/api/2.0/serving-endpoints", json=REFERENCE_CREATE)
        assert created.status_code == 200, created.text
        again = c.post("/api/2.0/serving-endpoints", json=REFERENCE_CREATE)
        got = c.get("/api/2.0/serving-endpoints/openai_endpoint").json()
        tags = c.patch("/api/2.0/serving-endpoints/openai_endpoint/tags",
                       json={"add_tags": [{"key": "project", "value": "parity"}], "delete_tags": ["team"]})
        listed = [e["name"] for e in c.get("/api/2.0/serving-endpoints").json()["endpoints"]]
        # the documented rule: an update cannot drop the external model
        drop = c.put("/api/2.0/serving-endpoints/openai_endpoint/config",
                     json={"served_entities": [{"entity_name": "m", "entity_version": "1", "task": "llm/v1/embeddings"}]})
        deleted = c.delete("/api/2.0/serving-endpoints/openai_endpoint")
        gone = c.get("/api/2.0/serving-endpoints/openai_endpoint")
    body = created.json()
    assert body["name"] == "openai_endpoint" and body["creator"] == "alice@example.com" and len(body["id"]) == 32
    assert body["state"]["ready"] == "READY" and body["permission_level"] == "CAN_MANAGE" and body["route_optimized"] is False
    assert body["creation_timestamp"] == body["last_updated_timestamp"] > 0
    entity = body["config"]["served_entities"][0]
    assert entity["state"] == {"deployment": "DEPLOYMENT_READY", "deployment_state_message": ""}
    assert entity["external_model"]["openai_config"]["openai_api_key"] == "{{secrets/my_scope/my_openai_api_key}}"
    assert body["config"]["traffic_config"]["routes"][0] == {"served_model_name": "openai_embeddings", "served_entity_name": "openai_embeddings", "traffic_percentage": 100}
    assert body["config"]["config_version"] == 1
    assert body["tags"] == [{"key": "team", "value": "gen-ai"}] and body["rate_limits"] == REFERENCE_CREATE["rate_limits"]
    assert again.status_code == 409 and again.json()["error_code"] == "RESOURCE_ALREADY_EXISTS"
    assert got["id"] == body["id"]
    assert tags.json() == {"tags": [{"key": "project", "value": "parity"}]}
    assert "openai_endpoint" in listed
    assert drop.status_code == 400 and "cannot drop its external_model" in drop.json()["message"]
    assert deleted.status_code == 200 and gone.status_code == 404


def test_config_rules_are_enforced(server, sim):
    two = {"name": "two", "config": {"served_entities": [external(sim, "llm/v1/chat", "a"), external(sim, "llm/v1/chat", "b")]}}
    bad_field = {"name": "bad", "config": {"served_entities": [{"name": "x", "external_model": {"name": "m", "provider": "openai",
                 "task": "llm/v1/chat", "openai_config": {"openai_api_key": "sk-in-plain-text-should-not-be-here"}}}]}}
    with http(server) as c:
        r_two = c.post("/api/2.0/serving-endpoints", json=two)
        r_bad = c.post("/api/2.0/serving-endpoints", json=bad_field)
        readonly = c.put("/api/2.0/serving-endpoints/sim-chat/config", json={"served_entities": [external(sim, "llm/v1/chat")]})
    assert r_two.status_code == 400 and "exactly one served entity" in r_two.json()["message"]
    assert r_bad.status_code == 400 and "secret reference" in r_bad.json()["message"]
    assert "sk-in-plain-text" not in r_bad.text
    assert readonly.status_code == 400 and "read-only" in readonly.json()["message"]


def test_update_config_swaps_the_served_model_and_bumps_the_version(server, sim):
    body = {"name": "swap", "config": {"served_entities": [external(sim, "llm/v1/chat", "first")]}}
    ask = {"messages": [{"role": "user", "content": "hi"}]}
    with http(server) as c:
        c.post("/api/2.0/serving-endpoints", json=body)
        updated = c.put("/api/2.0/serving-endpoints/swap/config", json={"name": "swap", "served_entities": [external(sim, "llm/v1/chat", "second")]})
        assert updated.status_code == 200, updated.text
        got = c.get("/api/2.0/serving-endpoints/swap").json()
        assert c.post("/serving-endpoints/swap/invocations", json=ask).status_code == 200
        c.delete("/api/2.0/serving-endpoints/swap")
    assert got["config"]["config_version"] == 2 and got["config"]["served_entities"][0]["name"] == "second"
    assert got["state"]["config_update"] == "NOT_UPDATING" and got["last_updated_timestamp"] >= got["creation_timestamp"]


def test_secrets_are_masked_in_responses_logs_and_the_state_file(server, sim, files, caplog):
    secret = "sk-plaintext-9f8e7d6c5b4a"
    body = {"name": "plain", "config": {"served_entities": [{"name": "p", "external_model": {"name": "sim-model", "provider": "openai",
            "task": "llm/v1/chat", "openai_config": {"openai_api_key_plaintext": secret, "openai_api_base": sim.base_url}}}]}}
    with caplog.at_level(logging.DEBUG):
        with http(server) as c:
            created = c.post("/api/2.0/serving-endpoints", json=body)
            got = c.get("/api/2.0/serving-endpoints/plain")
            listed = c.get("/api/2.0/serving-endpoints")
            # the simulator wants sk-sim: the backend's 401 is reported without the key
            failed = c.post("/serving-endpoints/plain/invocations", json={"messages": [{"role": "user", "content": "x"}]})
            c.delete("/api/2.0/serving-endpoints/plain")
    for response in (created, got, listed, failed):
        assert secret not in response.text
    assert created.json()["config"]["served_entities"][0]["external_model"]["openai_config"]["openai_api_key_plaintext"] == "********"
    assert failed.status_code == 502 and "HTTP 401" in failed.json()["message"]
    assert secret not in caplog.text and TOKENS["alice"] not in caplog.text
    state = files / "state" / "endpoints.json"
    assert oct(state.stat().st_mode & 0o777) == "0o600"


# -- persistence, the CLI, the usage table -------------------------------------------------------

def test_endpoints_persist_across_a_restart_and_ai_query_serve(server, sim, files, tmp_path):
    state = tmp_path / "state"
    body = {"name": "durable", "config": {"served_entities": [external(sim, "llm/v1/chat")]},
            "tags": [{"key": "k", "value": "v"}]}
    with ServingServer(state_dir=state, include_registry=False) as first:
        created = httpx.post(first.url + "/api/2.0/serving-endpoints", json=body).json()
    env = {**os.environ, "AIQ_SERVING_TOKEN": "tok-cli-admin-0001"}
    proc = subprocess.Popen([sys.executable, "-m", "batch_runner.cli", "serve", "--port", "0", "--state-dir", str(state),
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
        headers = {"Authorization": "Bearer tok-cli-admin-0001"}
        for _ in range(100):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        got = httpx.get(url + "/api/2.0/serving-endpoints/durable", headers=headers).json()
        answer = httpx.post(url + "/serving-endpoints/durable/invocations", headers=headers,
                            json={"messages": [{"role": "user", "content": "still here"}]}).json()
        names = {e["name"] for e in httpx.get(url + "/api/2.0/serving-endpoints", headers=headers).json()["endpoints"]}
        unauthorized = httpx.get(url + "/api/2.0/serving-endpoints")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert (got["id"], got["creator"], got["creation_timestamp"], got["tags"]) == (created["id"], "anonymous", created["creation_timestamp"], body["tags"])
    assert answer["choices"][0]["message"]["content"] == "echo: still here"
    assert {"durable", "local-chat", "local-embed"} <= names  # the CLI also serves the registry's endpoints
    assert unauthorized.status_code == 401


def test_usage_table_gets_one_row_per_request_in_the_batch_schema(server, files):
    from deltalake import DeltaTable

    with http(server, "bob") as bob:
        marker = "usage marker row"
        assert bob.post("/serving-endpoints/sim-chat/invocations", json={"messages": [{"role": "user", "content": marker}]},
                        headers={"X-Client-Request-Id": "client-42"}).status_code == 200
    path = str(files / "usage")
    rows: list = []
    for _ in range(100):  # appended in the background, about once a second
        if DeltaTable.is_deltatable(path):
            rows = [r for r in DeltaTable(path).to_pyarrow_table().to_pylist() if r["client_request_id"] == "client-42"]
            if rows:
                break
        time.sleep(0.1)
    assert DeltaTable(path).to_pyarrow_table().schema.names == USAGE_SCHEMA.names
    [row] = rows
    assert (row["endpoint_name"], row["requester"], row["source"], row["status_code"]) == ("sim-chat", "bob@example.com", "serving", 200)
    assert (row["input_token_count"], row["output_token_count"], row["input_character_count"]) == (3, 4, len(marker))


@pytest.mark.parametrize("http_client", ["httptools", "aiohttp"])
def test_backend_timeouts_and_refused_connections_become_502_through_either_http_client(sim, tmp_path, http_client):
    with socket_closed_port() as port:
        endpoints = [
            {"name": "slow", "config": {"served_entities": [external(sim, "llm/v1/chat")]},
             "client_config": {"request_timeout_s": 0.3, "max_attempts": 1}},
            {"name": "down", "config": {"served_entities": [{"name": "gone", "external_model": {
                "name": "m", "provider": "openai", "task": "llm/v1/chat",
                "openai_config": {"openai_api_key": "{{secrets/sim/key}}", "openai_api_base": f"http://127.0.0.1:{port}/v1"}}}]},
             "client_config": {"max_attempts": 1}},
        ]
        (tmp_path / "e.json").write_text(json.dumps(endpoints))
        with ServingServer(endpoints=tmp_path / "e.json", state_dir=tmp_path / "state", include_registry=False,
                           http_client=http_client) as s, httpx.Client(base_url=s.url, timeout=30) as c:
            slow = c.post("/serving-endpoints/slow/invocations", json={"messages": [{"role": "user", "content": "[[delay:2]] hi"}]})
            down = c.post("/serving-endpoints/down/invocations", json={"messages": [{"role": "user", "content": "hi"}]})
            fine = c.post("/serving-endpoints/slow/invocations", json={"messages": [{"role": "user", "content": "hi"}]})
    assert slow.status_code == 502 and "timed out after 0.3 s" in slow.json()["message"]
    assert down.status_code == 502 and f"connection error calling 'down': cannot connect to http://127.0.0.1:{port}: Connection refused" in down.json()["message"]
    assert fine.status_code == 200 and fine.json()["choices"][0]["message"]["content"] == "echo: hi"


class socket_closed_port:
    """A port on 127.0.0.1 that nothing listens on (bound, then closed)."""

    def __enter__(self) -> int:
        import socket

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        return port

    def __exit__(self, *exc) -> None:
        return None
