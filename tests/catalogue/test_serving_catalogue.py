"""Bad-input catalogue, serving surface: the query routes, the OpenAI-compatible routes and the
management API of a real ``ai-query serve`` app (uvicorn on 127.0.0.1) in front of the provider
simulator.

Each case sends one bad request and asserts: the status; the JSON error shape (Databricks'
``{"error_code", "message"}``, or OpenAI's ``{"error": {"message", "type", "code"}}`` on the
``/v1`` routes an OpenAI client calls); that the message names the bad value and the fix; that
the simulator received no request (nothing forwarded, nothing paid); and that the server's
endpoints are unchanged (nothing written).
"""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from ai_query.serving import ServingServer
from ai_query.testing import ProviderSimulator

pytestmark = pytest.mark.integration

ALICE, BOB = "tok-alice-catalogue-01", "tok-bob-catalogue-02"
LIMIT = 64 * 1024
API = "/api/2.0/serving-endpoints"


def external(sim, task: str) -> dict:
    return {"name": "sim", "external_model": {"name": "sim-model", "provider": "openai", "task": task,
                                             "openai_config": {"openai_api_key_plaintext": "sk-sim", "openai_api_base": sim.base_url}}}


@pytest.fixture(scope="module")
def sim():
    with ProviderSimulator(api_key="sk-sim", endpoint_names=["*"]) as s:
        yield s


@pytest.fixture(scope="module")
def server(sim, tmp_path_factory):
    root = tmp_path_factory.mktemp("serving-catalogue")
    (root / "endpoints.json").write_text(json.dumps([
        {"name": "chat", "config": {"served_entities": [external(sim, "llm/v1/chat")]}},
        {"name": "embed", "config": {"served_entities": [external(sim, "llm/v1/embeddings")]}},
    ]))
    (root / "tokens.json").write_text(json.dumps({"tokens": [
        {"user": "alice", "token": ALICE, "permissions": {"*": "CAN_MANAGE"}},
        {"user": "bob", "token": BOB, "permissions": {"chat": "CAN_QUERY"}},
    ]}))
    with ServingServer(endpoints=root / "endpoints.json", tokens=root / "tokens.json", state_dir=root / "state",
                       include_registry=False, max_request_bytes=LIMIT) as s:
        with httpx.Client(base_url=s.url, headers={"Authorization": f"Bearer {ALICE}"}) as c:
            created = c.post(API, json={"name": "managed", "config": {"served_entities": [external(sim, "llm/v1/chat")]}})
            assert created.status_code == 200, created.text
        yield s


def _snapshot(server) -> str:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ALICE}"}) as c:
        return json.dumps(sorted(c.get(API).json()["endpoints"], key=lambda e: e["name"]), sort_keys=True)


CHAT = "/serving-endpoints/chat/invocations"
OK_CHAT = {"messages": [{"role": "user", "content": "hi"}]}
BIG = {"messages": [{"role": "user", "content": "x" * (LIMIT + 10)}]}

# (id, method, path, kwargs, token, status, error_code, fragments the message must hold)
CASES = [
    # -- queries: Databricks invocations ------------------------------------------------------
    ("invocations-not-json", "POST", CHAT, {"content": b"{nope"}, ALICE, 400, "MALFORMED_REQUEST", ["not valid JSON"]),
    ("invocations-too-large", "POST", CHAT, {"json": BIG}, ALICE, 413, "REQUEST_TOO_LARGE", ["64 KB", "65536 bytes", "--max-request-mb"]),
    ("invocations-too-large-chunked", "POST", CHAT, {"content": iter([b'{"messages": [{"role": "user", "content": "',
                                                                      b"y" * (LIMIT + 1), b'"}]}'])},
     ALICE, 413, "REQUEST_TOO_LARGE", ["65536 bytes", "--max-request-mb"]),
    ("invocations-unknown-endpoint", "POST", "/serving-endpoints/nope/invocations", {"json": OK_CHAT}, ALICE, 404,
     "RESOURCE_DOES_NOT_EXIST", ["'nope'"]),
    ("invocations-no-token", "POST", CHAT, {"json": OK_CHAT}, None, 401, "UNAUTHENTICATED", ["Authorization: Bearer"]),
    ("invocations-bad-token", "POST", CHAT, {"json": OK_CHAT}, "not-a-token", 401, "UNAUTHENTICATED", ["invalid access token"]),
    ("invocations-no-permission", "POST", "/serving-endpoints/embed/invocations", {"json": {"input": "x"}}, BOB, 403,
     "PERMISSION_DENIED", ["'bob'", "'embed'", "CAN_QUERY", "tokens file"]),
    ("invocations-messages-not-a-list", "POST", CHAT, {"json": {"messages": "hi"}}, ALICE, 400, "INVALID_PARAMETER_VALUE", ["messages"]),
    ("invocations-no-messages", "POST", CHAT, {"json": {"prompt": "hi"}}, ALICE, 400, "INVALID_PARAMETER_VALUE", ["messages"]),
    ("invocations-negative-max-tokens", "POST", CHAT, {"json": {**OK_CHAT, "max_tokens": -1}}, ALICE, 400,
     "INVALID_PARAMETER_VALUE", ["max_tokens", "-1"]),
    ("invocations-body-a-list", "POST", CHAT, {"json": [OK_CHAT]}, ALICE, 400, "INVALID_PARAMETER_VALUE", ["messages"]),
    ("invocations-get", "GET", CHAT, {}, ALICE, 405, "METHOD_NOT_ALLOWED", ["GET", CHAT, "POST"]),
    ("invocations-put", "PUT", CHAT, {"json": OK_CHAT}, ALICE, 405, "METHOD_NOT_ALLOWED", ["PUT", "POST"]),
    # -- queries: OpenAI-compatible (OpenAI's error shape) -------------------------------------
    ("openai-no-model", "POST", "/v1/chat/completions", {"json": OK_CHAT}, ALICE, 400, "openai:INVALID_PARAMETER_VALUE",
     ["'model' is required", "/v1/models"]),
    ("openai-wrong-task", "POST", "/v1/embeddings", {"json": {"model": "chat", "input": "x"}}, ALICE, 400,
     "openai:INVALID_PARAMETER_VALUE", ["'chat'", "llm/v1/chat", "llm/v1/embeddings"]),
    ("openai-unknown-model", "POST", "/v1/chat/completions", {"json": {**OK_CHAT, "model": "gpt-nope"}}, ALICE, 404,
     "openai:RESOURCE_DOES_NOT_EXIST", ["'gpt-nope'"]),
    ("openai-too-large", "POST", "/v1/chat/completions", {"json": {**BIG, "model": "chat"}}, ALICE, 413, "REQUEST_TOO_LARGE",
     ["65536 bytes"]),
    ("openai-not-json", "POST", "/v1/completions", {"content": b"\xff\xfe"}, ALICE, 400, "openai:MALFORMED_REQUEST", ["JSON"]),
    ("openai-chat-get", "GET", "/v1/chat/completions", {}, ALICE, 405, "METHOD_NOT_ALLOWED", ["GET", "POST"]),
    ("openai-embeddings-delete", "DELETE", "/v1/embeddings", {}, ALICE, 405, "METHOD_NOT_ALLOWED", ["DELETE", "POST"]),
    ("openai-models-post", "POST", "/v1/models", {"json": {}}, ALICE, 405, "METHOD_NOT_ALLOWED", ["POST", "/v1/models", "GET"]),
    # -- unknown routes -------------------------------------------------------------------------
    ("route-unknown-get", "GET", "/nope", {}, ALICE, 404, "ENDPOINT_NOT_FOUND", ["GET /nope", "README"]),
    ("route-unknown-post", "POST", "/v2/chat", {"json": OK_CHAT}, ALICE, 404, "ENDPOINT_NOT_FOUND", ["POST /v2/chat"]),
    ("route-invocations-nested-name", "POST", "/serving-endpoints/a/b/invocations", {"json": OK_CHAT}, ALICE, 404,
     "ENDPOINT_NOT_FOUND", ["/serving-endpoints/a/b/invocations"]),
    ("route-api-unknown-subpath", "GET", API + "/chat/nope", {}, ALICE, 404, "ENDPOINT_NOT_FOUND", [API + "/chat/nope"]),
    ("route-health-post", "POST", "/health", {}, ALICE, 405, "METHOD_NOT_ALLOWED", ["POST", "/health", "GET"]),
    # -- management API: create -----------------------------------------------------------------
    ("create-body-a-list", "POST", API, {"json": [{"name": "x"}]}, ALICE, 400, "MALFORMED_REQUEST", ["a list", '"name"']),
    ("create-body-a-string", "POST", API, {"json": "x"}, ALICE, 400, "MALFORMED_REQUEST", ["a string", '"config"']),
    ("create-not-json", "POST", API, {"content": b"{'name': 1}"}, ALICE, 400, "MALFORMED_REQUEST", ["not valid JSON"]),
    ("create-no-name", "POST", API, {"json": {"config": {"served_entities": []}}}, ALICE, 400, "INVALID_PARAMETER_VALUE", ["'name'"]),
    ("create-exists", "POST", API, {"json": {"name": "managed", "config": {"served_entities": [{"name": "s"}]}}}, ALICE, 409,
     "RESOURCE_ALREADY_EXISTS", ["'managed'"]),
    ("create-unknown-provider", "POST", API, {"json": {"name": "n1", "config": {"served_entities": [{"name": "s", "external_model": {
        "name": "m", "provider": "nope", "task": "llm/v1/chat"}}]}}}, ALICE, 400, "INVALID_PARAMETER_VALUE", ["provider", "'nope'"]),
    ("create-no-served-entities", "POST", API, {"json": {"name": "n2", "config": {}}}, ALICE, 400, "INVALID_PARAMETER_VALUE",
     ["served_entities"]),
    ("create-bad-task", "POST", API, {"json": {"name": "n3", "config": {"served_entities": [{"name": "s", "external_model": {
        "name": "m", "provider": "openai", "task": "llm/v9/chat", "openai_config": {"openai_api_key_plaintext": "k"}}}]}}},
     ALICE, 400, "INVALID_PARAMETER_VALUE", ["llm/v9/chat"]),
    ("create-needs-manage", "POST", API, {"json": {"name": "n4", "config": {"served_entities": [{"name": "s"}]}}}, BOB, 403,
     "PERMISSION_DENIED", ["'bob'", "CAN_MANAGE"]),
    ("create-too-large", "POST", API, {"json": {"name": "n5", "pad": "x" * (LIMIT + 1)}}, ALICE, 413, "REQUEST_TOO_LARGE",
     ["65536 bytes"]),
    ("create-wrong-method", "DELETE", API, {}, ALICE, 405, "METHOD_NOT_ALLOWED", ["DELETE", "GET, POST"]),
    # -- management API: one endpoint -----------------------------------------------------------
    ("get-unknown", "GET", API + "/nope", {}, ALICE, 404, "RESOURCE_DOES_NOT_EXIST", ["'nope'"]),
    ("delete-unknown", "DELETE", API + "/nope", {}, ALICE, 404, "RESOURCE_DOES_NOT_EXIST", ["'nope'"]),
    ("delete-needs-manage", "DELETE", API + "/chat", {}, BOB, 403, "PERMISSION_DENIED", ["'bob'", "CAN_MANAGE"]),
    ("endpoint-post", "POST", API + "/managed", {"json": {}}, ALICE, 405, "METHOD_NOT_ALLOWED", ["POST", "DELETE, GET"]),
    ("config-body-a-list", "PUT", API + "/managed/config", {"json": []}, ALICE, 400, "MALFORMED_REQUEST", ["a list", "served_entities"]),
    ("config-unknown-field", "PUT", API + "/managed/config", {"json": {"served_entities": [], "colour": "red"}}, ALICE, 400,
     "INVALID_PARAMETER_VALUE", ["colour", "served_entities"]),
    ("config-other-name", "PUT", API + "/managed/config", {"json": {"name": "other", "served_entities": []}}, ALICE, 400,
     "INVALID_PARAMETER_VALUE", ["'other'", "'managed'"]),
    ("config-unknown-endpoint", "PUT", API + "/nope/config", {"json": {"served_entities": []}}, ALICE, 404,
     "RESOURCE_DOES_NOT_EXIST", ["'nope'"]),
    ("config-get", "GET", API + "/managed/config", {}, ALICE, 405, "METHOD_NOT_ALLOWED", ["GET", "PUT"]),
    ("rate-limits-body-a-list", "PUT", API + "/managed/rate-limits", {"json": [{"calls": 1}]}, ALICE, 400, "MALFORMED_REQUEST",
     ["a list", '"rate_limits"', "renewal_period"]),
    ("rate-limits-not-a-list", "PUT", API + "/managed/rate-limits", {"json": {"rate_limits": {"calls": 1}}}, ALICE, 400,
     "INVALID_PARAMETER_VALUE", ["rate_limits must be a list", '{"calls":1}']),
    ("rate-limits-negative-calls", "PUT", API + "/managed/rate-limits",
     {"json": {"rate_limits": [{"calls": -5, "key": "user", "renewal_period": "minute"}]}}, ALICE, 400, "INVALID_PARAMETER_VALUE",
     ["calls", "-5"]),
    ("rate-limits-bad-period", "PUT", API + "/managed/rate-limits",
     {"json": {"rate_limits": [{"calls": 5, "key": "user", "renewal_period": "fortnight"}]}}, ALICE, 400, "INVALID_PARAMETER_VALUE",
     ["renewal_period", "'fortnight'"]),
    ("rate-limits-bad-key", "PUT", API + "/managed/rate-limits",
     {"json": {"rate_limits": [{"calls": 5, "key": "planet", "renewal_period": "minute"}]}}, ALICE, 400, "INVALID_PARAMETER_VALUE",
     ["key", "'planet'"]),
    ("rate-limits-not-json", "PUT", API + "/managed/rate-limits", {"content": b"[1,"}, ALICE, 400, "MALFORMED_REQUEST", ["JSON"]),
    ("rate-limits-unknown-endpoint", "PUT", API + "/nope/rate-limits", {"json": {"rate_limits": []}}, ALICE, 404,
     "RESOURCE_DOES_NOT_EXIST", ["'nope'"]),
    ("rate-limits-post", "POST", API + "/managed/rate-limits", {"json": {"rate_limits": []}}, ALICE, 405, "METHOD_NOT_ALLOWED",
     ["POST", "PUT"]),
    ("tags-body-a-string", "PATCH", API + "/managed/tags", {"json": "team=a"}, ALICE, 400, "MALFORMED_REQUEST",
     ["a string", "add_tags", "delete_tags"]),
    ("tags-body-a-number", "PATCH", API + "/managed/tags", {"json": 7}, ALICE, 400, "MALFORMED_REQUEST", ["a number", "add_tags"]),
    ("tags-add-not-a-list", "PATCH", API + "/managed/tags", {"json": {"add_tags": {"key": "a"}}}, ALICE, 400,
     "INVALID_PARAMETER_VALUE", ["add_tags must be a list"]),
    ("tags-add-without-key", "PATCH", API + "/managed/tags", {"json": {"add_tags": [{"value": "v"}]}}, ALICE, 400,
     "INVALID_PARAMETER_VALUE", ["add_tags", "'value': 'v'", '"key"']),
    ("tags-delete-not-strings", "PATCH", API + "/managed/tags", {"json": {"delete_tags": [{"key": "a"}]}}, ALICE, 400,
     "INVALID_PARAMETER_VALUE", ["delete_tags", '{"key":"a"}', "strings"]),
    ("tags-needs-manage", "PATCH", API + "/chat/tags", {"json": {"add_tags": []}}, BOB, 403, "PERMISSION_DENIED", ["CAN_MANAGE"]),
    ("tags-put", "PUT", API + "/managed/tags", {"json": {}}, ALICE, 405, "METHOD_NOT_ALLOWED", ["PUT", "PATCH"]),
    ("optimization-info-unknown-model", "GET", API + "/get-model-optimization-info/no-such-model/1", {}, ALICE, 404,
     "RESOURCE_DOES_NOT_EXIST", ["'no-such-model'"]),
]


@pytest.mark.parametrize("method,path,kwargs,token,status,code,fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request_is_refused_with_json_and_nothing_is_sent_or_written(server, sim, method, path, kwargs, token, status, code,
                                                                       fragments):
    before_sent, before_state = sim.stats.requests, _snapshot(server)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as c:
        answer = c.request(method, path, **kwargs)
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/json"), answer.headers
    body = answer.json()
    if code.startswith("openai:"):
        assert set(body) == {"error"} and body["error"]["code"] == code.split(":", 1)[1], body
        message = body["error"]["message"]
    else:
        assert set(body) == {"error_code", "message"} and body["error_code"] == code, body
        message = body["message"]
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    if status == 405:
        assert answer.headers.get("allow"), answer.headers
    assert sim.stats.requests == before_sent, "a refused request reached the provider"
    assert _snapshot(server) == before_state, "a refused request changed the server's endpoints"


def test_the_default_limit_is_16_mb_and_a_32_mb_body_is_refused_unsent(sim, tmp_path):
    """The issue's case: a 32 MB body was forwarded; now 413 naming the limit, nothing sent."""
    (tmp_path / "endpoints.json").write_text(json.dumps([{"name": "chat", "config": {"served_entities": [external(sim, "llm/v1/chat")]}}]))
    before = sim.stats.requests
    with ServingServer(endpoints=tmp_path / "endpoints.json", state_dir=tmp_path / "state", include_registry=False) as s:
        body = json.dumps({"messages": [{"role": "user", "content": "z" * (32 * 1024 * 1024)}]}).encode()
        with httpx.Client(base_url=s.url, timeout=60) as c:
            answer = c.post(CHAT, content=body, headers={"content-type": "application/json"})
            fits = c.post(CHAT, json=OK_CHAT)
    assert answer.status_code == 413 and answer.json()["error_code"] == "REQUEST_TOO_LARGE"
    assert "16 MB" in answer.json()["message"] and str(16 * 1024 * 1024) in answer.json()["message"]
    assert fits.status_code == 200 and sim.stats.requests == before + 1


def test_a_content_length_that_is_not_a_number_is_400_json(server, sim):
    before = sim.stats.requests
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
        conn.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE}\r\nContent-Length: 12x\r\n\r\n".encode())
        reply = conn.recv(65536).decode("latin-1")
    # the HTTP parser may refuse it first (400 of its own); either way no request is forwarded
    assert reply.startswith("HTTP/1.1 400") and sim.stats.requests == before
