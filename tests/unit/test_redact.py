"""Secrets scrubbed at the source (``ai_query/_redact.py``) and sealed in the serving state file
(``ai_query/serving/_sealed.py``). The end-to-end check over every artefact is
``tests/spark/test_secret_echo.py``."""

from __future__ import annotations

import json
import os
import pickle
import uuid

import pytest

from ai_query import AIQueryClient, AIQueryError, ConfigError, EndpointRegistry, SystemicEndpointError
from ai_query._errors import ServingError, recover_error
from ai_query._redact import REDACTED, redact, remember_headers, remember_secret
from ai_query.backends._http_common import malformed_answer, raise_for_status
from ai_query.serving import EndpointStore
from ai_query.serving._sealed import SEALED_PREFIX, CredentialSealer
from ai_query.transport import MockTransport, Request, Response

from .fakes import json_response


def fresh(prefix: str = "zq") -> str:
    """A secret of no well-known shape: only the known-values net can catch it."""
    return prefix + uuid.uuid4().hex + uuid.uuid4().hex[:8]


@pytest.mark.parametrize("key", [
    "sk-" + "a1B2" * 12,                              # OpenAI (legacy)
    "sk-proj-" + "Xy9_" * 12,                         # OpenAI project key
    "sk-ant-api03-" + "k3y-" * 20,                    # Anthropic
    "dapi" + "0123456789abcdef" * 2,                  # Databricks PAT
    "dapi" + "0123456789abcdef" * 2 + "-3",
    "AKIA" + "ABCDEFGHIJKLMNOP",                      # AWS access key id
    "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz12345678",     # Hugging Face
    "AIza" + "Sy" + "A" * 33,                         # Google
    "ghp_" + "a" * 36,                                # GitHub
    "gsk_" + "b" * 52,                                # Groq
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",  # JWT
])
def test_well_known_key_shapes_are_redacted_and_the_message_stays(key):
    out = redact(f"HTTP 401 from 'x': Incorrect API key provided: {key}. See the docs.")
    assert key not in out and out == f"HTTP 401 from 'x': Incorrect API key provided: {REDACTED}. See the docs."


@pytest.mark.parametrize("text, expected", [
    ("Authorization: Bearer abc.def-123", f"Authorization: Bearer {REDACTED}"),
    ('{"api_key": "abcdef123456"}', f'{{"api_key": "{REDACTED}"}}'),
    ("x-api-key=secretvalue9", f"x-api-key={REDACTED}"),
    ('password: "hunter2hunter2"', f'password: "{REDACTED}"'),
])
def test_credential_assignments_are_redacted(text, expected):
    assert redact(text) == expected


@pytest.mark.parametrize("text", [
    "Rate limit reached for requests per 60 s: limit 600, used 600, requested 1.",
    'openai_api_key must be a secret reference like "{{secrets/my_scope/my_key}}"',
    "the task-0123456789abcdef0123 failed; Bearer tokens are required",
    "max_tokens=4096 is too large for sim-model",
])
def test_ordinary_messages_are_left_alone(text):
    assert redact(text) == text


def test_known_values_of_any_shape_are_redacted_with_their_escaped_forms():
    secret = fresh() + '/"+'
    assert redact(f"echo {secret}") == f"echo {secret}"  # no shape of a key: unknown, it stays
    remember_secret(secret)
    assert redact(f"echo {secret} end") == f"echo {REDACTED} end"
    assert redact("in json " + json.dumps(secret)) == f'in json "{REDACTED}"'
    remember_secret("abc")  # too short to scrub: it would shred every message
    assert redact("abc def") == "abc def"


def test_a_resolved_secret_is_known(monkeypatch, tmp_path):
    from ai_query import resolve_secret

    in_env, in_file = fresh("e"), fresh("f")
    monkeypatch.setenv("AIQ_SECRET_REDACT_ENV", in_env)
    (tmp_path / "s.json").write_text(json.dumps({"redact": {"file": in_file}}))
    monkeypatch.setenv("AIQ_SECRETS_FILE", str(tmp_path / "s.json"))
    assert redact(f"{in_env} {in_file}") == f"{in_env} {in_file}"
    assert (resolve_secret("{{secrets/redact/env}}"), resolve_secret("{{secrets/redact/file}}")) == (in_env, in_file)
    assert redact(f"{in_env} {in_file}") == f"{REDACTED} {REDACTED}"


def test_credential_headers_sent_are_known_without_their_scheme():
    bearer, api_key, other = fresh("b"), fresh("a"), fresh("o")
    remember_headers({"Authorization": "Bearer " + bearer, "x-api-key": api_key, "x-request-id": other})
    assert redact(f"{bearer} {api_key} {other}") == f"{REDACTED} {REDACTED} {other}"


def test_the_credential_a_request_carried_is_scrubbed_from_its_answer():
    """A plaintext key is no resolved secret: the endpoint client notes the header it sends."""
    key = fresh("plain-")
    registry = EndpointRegistry.from_data({"name": "p", "config": {"served_entities": [{"name": "e", "external_model": {
        "name": "m", "provider": "openai", "task": "llm/v1/chat",
        "openai_config": {"openai_api_key_plaintext": key, "openai_api_base": "http://fake.invalid/v1"}}}]}})

    def handler(request: Request) -> Response:
        sent = request.headers["authorization"].removeprefix("Bearer ")
        return json_response(400, {"error": {"message": f"Incorrect API key provided: {sent}"}})

    client = AIQueryClient(registry, transport=MockTransport(handler))
    try:
        result = client.call("p", "hello")
    finally:
        client.close()
    assert result.error is not None and key not in result.error and f"HTTP 400 from served entity 'e': Incorrect API key provided: {REDACTED}" in result.error


def test_a_key_at_the_cut_of_a_long_provider_message_leaves_no_part_behind():
    secret = fresh()
    remember_secret(secret)
    body = json.dumps({"error": {"message": "x" * 280 + " key " + secret}}).encode()
    with pytest.raises(SystemicEndpointError) as info:
        raise_for_status(401, {}, body, "served entity 'e'")
    message = str(info.value)
    assert secret[:10] not in message and message.startswith("HTTP 401 from served entity 'e': xxx")


def test_malformed_answers_quote_the_body_redacted():
    secret = fresh()
    remember_secret(secret)
    from ai_query.config import ServedEntity

    entity = ServedEntity.from_dict({"name": "e", "external_model": {"name": "m", "provider": "openai", "task": "llm/v1/chat",
                                     "openai_config": {"openai_api_key": "{{secrets/s/k}}"}}}, "e")
    exc = malformed_answer(entity, "llm/v1/chat", 200, {}, ('{"choices": "' + secret).encode(), ValueError("x"))
    assert secret[:6] not in str(exc) and REDACTED in str(exc)


def test_every_error_message_is_scrubbed_and_stays_so_across_pickling_and_spark_text():
    secret = fresh()
    remember_secret(secret)
    for error in (AIQueryError(f"a {secret}"), SystemicEndpointError(f"b {secret}", status_code=401),
                  ServingError(502, "UPSTREAM_ERROR", f"c {secret}")):
        for seen in (error, pickle.loads(pickle.dumps(error))):
            assert secret not in str(seen) and REDACTED in str(seen)
    assert ServingError(502, "X", f"c {secret}").message == f"c {REDACTED}"
    recovered = recover_error(f"Traceback ...\nai_query._errors.ServingError: sent {secret}\n", AIQueryError)
    assert recovered is not None and secret not in str(recovered)


# -- the serving state file ------------------------------------------------------------------

def _plain_endpoint(name: str, key: str) -> dict:
    return {"name": name, "config": {"served_entities": [{"name": "p", "external_model": {
        "name": "m", "provider": "openai", "task": "llm/v1/chat",
        "openai_config": {"openai_api_key_plaintext": key, "openai_api_base": "http://127.0.0.1:9/v1"}}}]}}


def test_the_state_file_keeps_api_keys_sealed_and_they_come_back_after_a_restart(tmp_path):
    key, key_file = fresh("sk-"), tmp_path / "keys" / "state.key"
    store = EndpointStore(EndpointRegistry(), tmp_path / "state", state_key_file=key_file)
    store.create(_plain_endpoint("plain", key), "alice")
    text = (tmp_path / "state" / "endpoints.json").read_text()
    assert key not in text and SEALED_PREFIX in text
    assert oct(key_file.stat().st_mode & 0o777) == "0o600" and oct(key_file.parent.stat().st_mode & 0o777) == "0o700"
    again = EndpointStore(EndpointRegistry(), tmp_path / "state", state_key_file=key_file)
    config = again.config_of(again.get("plain"))
    assert config.entity.external_model.config.credential() == (None, key)
    # without its key file, or with another one, it cannot be opened, and the error says what to do
    with pytest.raises(ConfigError, match="key file .*missing.key does not exist: restore it"):
        EndpointStore(EndpointRegistry(), tmp_path / "state", state_key_file=tmp_path / "missing.key")
    CredentialSealer(tmp_path / "other.key").seal({"x_plaintext": "y"})  # makes another key
    with pytest.raises(ConfigError, match="other.key is not the one they were sealed with"):
        EndpointStore(EndpointRegistry(), tmp_path / "state", state_key_file=tmp_path / "other.key")


def test_a_state_file_with_clear_keys_loads_and_is_rewritten_sealed(tmp_path):
    key, key_file = fresh("sk-"), tmp_path / "state.key"
    state = tmp_path / "state"
    state.mkdir()
    old = {"endpoints": [{"name": "old", "spec": {k: v for k, v in _plain_endpoint("old", key).items() if k != "name"},
                          "id": "1", "creator": "bob", "creation_timestamp": 1, "last_updated_timestamp": 1, "config_version": 1,
                          "pending_spec": None, "update_state": "NOT_UPDATING", "update_message": "", "update_owner": None}]}
    (state / "endpoints.json").write_text(json.dumps(old))
    store = EndpointStore(EndpointRegistry(), state, state_key_file=key_file)
    assert store.config_of(store.get("old")).entity.external_model.config.credential() == (None, key)
    assert key not in (state / "endpoints.json").read_text() and SEALED_PREFIX in (state / "endpoints.json").read_text()


def test_a_key_file_others_can_read_is_refused(tmp_path):
    key_file = tmp_path / "state.key"
    sealer = CredentialSealer(key_file)
    sealed = sealer.seal({"openai_api_key_plaintext": "sk-x", "openai_api_key": "{{secrets/a/b}}"})
    assert sealed["openai_api_key"] == "{{secrets/a/b}}" and sealed["openai_api_key_plaintext"].startswith(SEALED_PREFIX)
    os.chmod(key_file, 0o644)
    with pytest.raises(ConfigError, match=f"can be read by others .*chmod 600 {key_file}"):
        CredentialSealer(key_file).unseal(sealed, "state")


def test_the_servers_log_filter_scrubs_messages_and_tracebacks():
    import logging
    import sys

    from ai_query.serving._server import SecretMaskingFilter

    secret = fresh()
    remember_secret(secret)
    try:
        raise ValueError(f"a library's error quoting {secret}")  # not ours: its message was never scrubbed
    except ValueError:
        record = logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, "failed with %s", (secret,), sys.exc_info())
    SecretMaskingFilter().filter(record)
    text = logging.Formatter().format(record)
    assert secret not in text and f"failed with {REDACTED}" in text and f"quoting {REDACTED}" in text
