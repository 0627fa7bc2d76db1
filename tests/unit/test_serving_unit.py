"""Serving-endpoint pieces without a server: rate limits (injected clock), tokens and levels,
request parsing, masking."""

from __future__ import annotations

import logging
import os

import pytest

from ai_query import ArgumentError, ConfigError, RateLimit
from ai_query.serving import RateLimitedError, RateLimiter, ServingError, TokenAuthenticator, mask_text, masked
from ai_query.serving._server import SecretMaskingFilter
from ai_query.serving._shared import PROBES, SharedCells, SharedControl
from ai_query.serving._bodies import parse_request


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["one process", "shared by workers"])
def limiters(request):
    """Two rate limiters of one server: the same object, or two workers' over one control file."""
    clock = Clock()
    if request.param == "one process":
        limiter = RateLimiter(clock)
        yield clock, limiter, limiter
        return
    first = SharedControl.create(slots=64)
    second = SharedControl.inherited(os.dup(first.fd))  # a worker's own open of the supervisor's file
    yield clock, RateLimiter(clock, SharedCells(first)), RateLimiter(clock, SharedCells(second))
    first.close()
    second.close()


def test_rate_limit_admits_a_burst_of_calls_then_one_per_interval_with_exact_retry_after(limiters):
    clock, a, b = limiters
    limit = [RateLimit(3, "user")]
    for limiter in (a, b, a):
        limiter.admit("ep", limit, "alice")
    with pytest.raises(RateLimitedError) as info:
        b.admit("ep", limit, "alice")
    assert info.value.retry_after == pytest.approx(20.0)  # 60 s / 3 calls
    a.admit("ep", limit, "bob")  # per user: bob has his own allowance
    clock.now += 19.9
    with pytest.raises(RateLimitedError):
        b.admit("ep", limit, "alice")
    clock.now += 0.1
    b.admit("ep", limit, "alice")
    with pytest.raises(RateLimitedError) as again:
        a.admit("ep", limit, "alice")
    assert again.value.retry_after == pytest.approx(20.0)


def test_endpoint_key_is_shared_and_a_refusal_costs_nothing(limiters):
    clock, a, b = limiters
    limits = [RateLimit(2, "endpoint"), RateLimit(60, "user")]
    a.admit("ep", limits, "alice")
    b.admit("ep", limits, "bob")
    with pytest.raises(RateLimitedError) as info:
        a.admit("ep", limits, "carol")
    assert "for the whole endpoint" in str(info.value)
    b.admit("other", limits, "carol")  # endpoints do not share counters
    a.admit("other", limits, "dave")
    with pytest.raises(RateLimitedError):
        b.admit("other", limits, "frank")
    clock.now += 30
    b.admit("ep", limits, "carol")  # the refusal cost nothing: one call came back after 30 s
    with pytest.raises(RateLimitedError):
        a.admit("ep", limits, "erin")
    a.forget("ep")  # one worker forgets for all
    b.admit("ep", limits, "erin")
    b.admit("other", limits, "frank")
    with pytest.raises(RateLimitedError):
        a.admit("other", limits, "george")  # the other endpoint's counts were kept


def test_shared_cells_reuse_expired_slots_and_admit_uncounted_when_a_window_is_full(caplog):
    clock = Clock()
    control = SharedControl.create(slots=1)  # every key lands in the same window of PROBES slots
    limiter = RateLimiter(clock, SharedCells(control))
    limit = [RateLimit(1, "user")]
    for i in range(PROBES):
        limiter.admit("ep", limit, f"user{i}")
    with caplog.at_level(logging.WARNING, logger="ai_query.serving"):
        limiter.admit("ep", limit, "one-too-many")
        limiter.admit("ep", limit, "one-too-many")  # not counted: the window is full of live cells
    assert "rate-limit table is full" in caplog.text
    with pytest.raises(RateLimitedError):
        limiter.admit("ep", limit, "user0")  # the counted keys still hold
    clock.now += 60.0  # every cell has expired: its slot is free again
    limiter.admit("ep", limit, "newcomer")
    with pytest.raises(RateLimitedError):
        limiter.admit("ep", limit, "newcomer")
    control.close()


def test_tokens_permission_levels_and_messages():
    auth = TokenAuthenticator([
        {"user": "alice", "token": "a-token", "permissions": {"*": "CAN_MANAGE"}},
        {"user": "bob", "token": "b-token", "permissions": {"chat": "CAN_QUERY"}},
    ])
    alice, bob = auth.authenticate("Bearer a-token"), auth.authenticate("bearer b-token")
    assert alice.level("anything") == "CAN_MANAGE"
    assert bob.level("chat") == "CAN_QUERY" and bob.level("embed") is None
    assert bob.level("mine", creator="bob") == "CAN_MANAGE"  # creators manage what they made
    with pytest.raises(ServingError) as denied:
        bob.require("CAN_MANAGE", "chat")
    assert denied.value.status == 403 and "has CAN_QUERY" in denied.value.message
    for header, words in ((None, "missing credentials"), ("Token x", "Bearer"), ("Bearer wrong-token-77", "invalid access token")):
        with pytest.raises(ServingError) as info:
            auth.authenticate(header)
        assert info.value.status == 401 and words in info.value.message and "wrong-token-77" not in info.value.message
    open_auth = TokenAuthenticator(None)
    assert open_auth.authenticate(None).level("x") == "CAN_MANAGE"


def test_token_config_errors_name_the_field(monkeypatch):
    with pytest.raises(ConfigError, match=r"tokens\[0\]\.permissions"):
        TokenAuthenticator([{"user": "u", "token": "t", "permissions": {"*": "CAN_EVERYTHING"}}])
    with pytest.raises(ConfigError, match="already given"):
        TokenAuthenticator([{"user": "u", "token": "t"}, {"user": "v", "token": "t"}])
    monkeypatch.setenv("AIQ_SECRET_SERVING_ALICE", "from-a-secret")
    auth = TokenAuthenticator([{"user": "alice", "token": "{{secrets/serving/alice}}", "permissions": {"*": "CAN_QUERY"}}])
    assert auth.authenticate("Bearer from-a-secret").user == "alice"
    env_auth = TokenAuthenticator.from_sources(env={"AIQ_SERVING_TOKEN": "solo"})
    assert env_auth.authenticate("Bearer solo").level("x") == "CAN_MANAGE"


def test_parse_request_by_task():
    chat = parse_request("llm/v1/chat", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                                         "stream": True, "stream_options": {"include_usage": True}})
    assert chat.values == ([{"role": "user", "content": "hi"}],) and dict(chat.params.values) == {"max_tokens": 5}
    assert chat.stream and chat.include_usage
    assert parse_request("llm/v1/embeddings", {"input": ["a", "b"]}).values == ("a", "b")
    assert parse_request("llm/v1/completions", {"prompt": "p", "response_format": {"type": "text"}}).response_format is None
    for task, body, words in (
        ("llm/v1/chat", {"prompt": "x"}, "'messages' is required"),
        ("llm/v1/chat", {"messages": "hi"}, "non-empty list"),
        ("llm/v1/completions", {"prompt": "x", "n": 2}, "n=1"),
        ("llm/v1/completions", {"prompt": "x", "temperature": 9}, "between"),
        ("llm/v1/completions", {"prompt": "x", "tools": []}, "'tools'"),
        ("llm/v1/chat", {"inputs": ["x"]}, "not MLflow's inputs"),
    ):
        with pytest.raises(ArgumentError, match=words):
            parse_request(task, body)


def test_secrets_are_masked_in_data_and_text():
    data = {"openai_config": {"openai_api_key": "{{secrets/s/k}}", "openai_api_key_plaintext": "sk-123"}, "list": [{"x_plaintext": "p"}]}
    assert masked(data) == {"openai_config": {"openai_api_key": "{{secrets/s/k}}", "openai_api_key_plaintext": "********"},
                            "list": [{"x_plaintext": "********"}]}
    text = 'header Authorization: Bearer abc.def-123 and {"openai_api_key_plaintext": "sk-live-9"} api_key=sk-2 ref "openai_api_key": "{{secrets/a/b}}"'
    out = mask_text(text)
    assert "abc.def-123" not in out and "sk-live-9" not in out and "sk-2" not in out and "{{secrets/a/b}}" in out
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "token %s", ("Bearer hidden-1",), None)
    SecretMaskingFilter().filter(record)
    assert "hidden-1" not in record.getMessage()


def test_importing_the_serving_package_stays_light():
    import subprocess
    import sys

    code = ("import sys, ai_query.serving;"
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'pyspark', 'vllm', 'torch', 'mlflow', 'starlette', 'uvicorn'})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
