"""The backend seam: the registry (built-ins + the ``ai_query.backends`` entry points), what each
kind's backend can do, the error when a kind's backend is not installed, engine options checked
through the registry, and the client asking a backend's capabilities instead of its kind."""

from __future__ import annotations

import asyncio
from importlib.metadata import entry_points
from typing import Any

import pytest

from ai_query import AIQueryClient, ConfigError, EndpointRegistry, GradientConcurrencyLimiter, ModelResponse, Usage
from ai_query import AdaptiveConcurrencyLimiter
from ai_query._files import files_unsupported_reason
from ai_query.backends import (
    ENTRY_POINT_GROUP,
    BackendBase,
    BatchContext,
    Capabilities,
    HTTPRequest,
    backend_class,
    backend_for,
    entity_kind,
    local_model_folder,
    validate_options,
)
from ai_query.backends import _registry
from ai_query.backends._anthropic import AnthropicBackend
from ai_query.backends._mlflow import MLflowPyfuncBackend
from ai_query.backends._openai import OpenAICompatibleBackend
from ai_query.backends._serving_endpoint import ServingEndpointBackend
from ai_query.serving._store import needs_warming, warm
from gpu_workers._backends import LocalModelBackend, OfflineVLLMBackend, VLLMPoolBackend

KEY = {"openai_api_key_plaintext": "sk-test", "openai_api_base": "http://fake.test/v1"}
ENTITIES = {
    "openai": {"name": "e", "external_model": {"name": "m", "provider": "openai", "task": "llm/v1/chat", "openai_config": KEY}},
    "anthropic": {"name": "e", "external_model": {"name": "m", "provider": "anthropic", "task": "llm/v1/chat",
                                                  "anthropic_config": {"anthropic_api_key_plaintext": "k"}}},
    "databricks-model-serving": {"name": "e", "external_model": {
        "name": "m", "provider": "databricks-model-serving", "task": "llm/v1/chat",
        "databricks_model_serving_config": {"databricks_api_token_plaintext": "t", "databricks_workspace_url": "http://ws.test"}}},
    "mlflow": {"name": "e", "model_uri": "/models/m", "task": "llm/v1/completions"},
    "local_model": {"name": "e", "local_model": {"model": "tiny-llama", "task": "llm/v1/chat"}},
    "vllm_pool": {"name": "e", "vllm_pool": {"model": "tiny-llama", "task": "llm/v1/chat"}},
    "vllm_pool offline": {"name": "e", "vllm_pool": {"model": "tiny-llama", "task": "llm/v1/chat", "mode": "offline"}},
}


def entity(kind: str):
    return EndpointRegistry.from_data({"name": "ep", "config": {"served_entities": [ENTITIES[kind]]}}).get("ep").entity


@pytest.fixture
def fresh_registry(monkeypatch):
    """The registry's class cache emptied for one test (kinds load again from built-ins and entry points)."""
    monkeypatch.setattr(_registry, "_classes", {})


@pytest.mark.parametrize(
    ("kind", "cls", "capabilities"),
    [
        ("openai", OpenAICompatibleBackend, Capabilities("aimd", accepts_files=True)),
        ("anthropic", AnthropicBackend, Capabilities("aimd", accepts_files=True)),
        ("databricks-model-serving", ServingEndpointBackend, Capabilities("aimd", accepts_files=True)),
        ("mlflow", MLflowPyfuncBackend, Capabilities("aimd", in_process=True, needs_start=True)),
        # our own engines are filled (AIMD): a CPU engine's latency rises with every sequence, so
        # the gradient would hold it far below its throughput (bench/results/vllm_pool.md)
        ("local_model", LocalModelBackend, Capabilities("aimd", needs_start=True, starts_full=True)),
        ("vllm_pool", VLLMPoolBackend, Capabilities("aimd", accepts_files=True, starts_full=True)),
        ("vllm_pool offline", OfflineVLLMBackend,
         Capabilities("aimd", accepts_files=True, runs_whole_batches=True, in_process=True)),
    ],
)
def test_each_kind_gets_its_backend_and_capabilities(kind, cls, capabilities):
    e = entity(kind)
    assert entity_kind(e) == kind.split()[0]
    backend = backend_for(e)
    assert type(backend) is cls and backend.capabilities == capabilities


def test_gpu_workers_registers_its_kinds_through_the_entry_point_group(fresh_registry):
    points = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert points == {"local_model": "gpu_workers._backends:LocalModelBackend",
                      "vllm_pool": "gpu_workers._backends:VLLMPoolBackend"}
    assert backend_class("local_model") is LocalModelBackend and backend_class("vllm_pool") is VLLMPoolBackend


def test_a_kind_whose_backend_is_not_installed_names_the_package_and_the_extra(fresh_registry, monkeypatch):
    monkeypatch.setattr(_registry, "entry_points", lambda group: [])  # as without gpu_workers
    with pytest.raises(ConfigError) as excinfo:
        backend_for(entity("vllm_pool"))
    message = str(excinfo.value)
    assert "'vllm_pool'" in message and "gpu_workers" in message and "pip install 'ai-query[local]'" in message
    with pytest.raises(ConfigError, match="kind 'quantum'.*installed: anthropic, databricks-model-serving, mlflow, openai"):
        backend_class("quantum")
    assert backend_class("openai") is OpenAICompatibleBackend  # the core's own kinds need no entry point


def test_engine_options_are_always_checked_through_the_registry(fresh_registry, monkeypatch):
    seen: list[tuple[dict, str]] = []

    class Recording(VLLMPoolBackend):
        @classmethod
        def validate_options(cls, options, path):
            seen.append((dict(options), path))
            super().validate_options(options, path)

    _registry.register("vllm_pool", Recording)
    pool = {"model": "tiny-llama", "task": "llm/v1/chat", "options": {"dtype": "float32"}}
    EndpointRegistry.from_data({"name": "p", "config": {"served_entities": [{"vllm_pool": pool}]}})
    [(options, path)] = seen
    assert options == {"dtype": "float32"} and path.endswith("config.served_entities[0].vllm_pool.options")
    with pytest.raises(ConfigError, match=r"vllm_pool.options: options.dtype='fp8' is not one of"):
        EndpointRegistry.from_data({"name": "p", "config": {"served_entities": [{"vllm_pool": {**pool, "options": {"dtype": "fp8"}}}]}})


def test_options_that_no_installed_backend_can_check_are_refused_not_skipped(fresh_registry, monkeypatch):
    monkeypatch.setattr(_registry, "entry_points", lambda group: [])
    with pytest.raises(ConfigError, match=r"^x.options: cannot check the engine options \['dtype'\]: .*pip install 'ai-query\[local\]'"):
        validate_options("vllm_pool", {"dtype": "float32"}, "x.options")
    validate_options("vllm_pool", {}, "x.options")  # nothing to check: the config reads without the backend
    assert local_model_folder("tiny-llama") is None


def test_local_model_folders_come_from_the_local_model_backend():
    assert local_model_folder("tiny-llama") is not None and local_model_folder("tiny-llama").name == "tiny-llama"
    assert local_model_folder("no-such-alias") is None


def test_the_base_refuses_what_its_capabilities_do_not_promise():
    with pytest.raises(ConfigError, match="takes no engine options, got \\['dtype'\\]; remove them"):
        BackendBase.validate_options({"dtype": "x"}, "p.options")
    with pytest.raises(NotImplementedError):
        asyncio.run(BackendBase().build("llm/v1/chat", "x", None, None))  # type: ignore[arg-type]


class InProcessEcho(BackendBase):
    """Answers in this process, row by row or a whole batch at once (records the batch context)."""

    capabilities = Capabilities("gradient", runs_whole_batches=True, in_process=True, needs_start=True)
    contexts: list[BatchContext | None] = []
    started = 0

    def __init__(self, entity) -> None:
        self.entity = entity

    async def start(self) -> None:
        type(self).started += 1

    async def invoke(self, task, value, params, response_format, prompt_text):
        return ModelResponse(f"echo {value}", Usage(1, 1, 2), "echo")

    async def invoke_batch(self, task, values, params, response_format, context=None):
        type(self).contexts.append(context)
        return [ModelResponse(f"batch {v}", Usage(1, 1, 2), "echo") if v != "bad" else ValueError("bad row") for v in values]


def test_the_client_follows_the_backends_capabilities_not_its_kind(fresh_registry):
    _registry.register("openai", InProcessEcho)
    InProcessEcho.contexts = []
    registry = EndpointRegistry.from_data({"name": "ep", "config": {"served_entities": [ENTITIES["openai"]]}})
    client = AIQueryClient(registry)
    try:
        endpoint = client.endpoint("ep")
        assert isinstance(endpoint.limiter, GradientConcurrencyLimiter)  # concurrency: auto follows capabilities.limiter
        context = BatchContext(gpu_ids=("0", "1"))
        [[a, b, c]] = client.map_many([("ep", ["x", "bad", None], None, None)], context=context)
        assert (a.value, b.error, c.error) == ("batch x", "bad row", "the request is NULL: nothing to send")
        assert InProcessEcho.contexts == [context]  # the task's context reached the backend
        assert client.call("ep", "y").value == "echo y"  # one row: invoke, no HTTP
        assert needs_warming(endpoint)
        asyncio.run(warm(endpoint))
        assert InProcessEcho.started == 1
    finally:
        client.close()


def test_http_backends_keep_the_aimd_limiter_and_build_requests(fresh_registry):
    client = AIQueryClient(EndpointRegistry.from_data({"name": "ep", "config": {"served_entities": [ENTITIES["openai"]]}}))
    try:
        endpoint = client.endpoint("ep")
        assert isinstance(endpoint.limiter, AdaptiveConcurrencyLimiter) and not needs_warming(endpoint)
        from ai_query import ModelParameters

        request = asyncio.run(endpoint.backend.build("llm/v1/chat", "hi", ModelParameters(), None))
        assert isinstance(request, HTTPRequest) and request.url == "http://fake.test/v1/chat/completions"
        assert request.json == {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    finally:
        client.close()


def test_files_are_refused_where_the_backend_does_not_accept_them():
    def config(kind: str):
        return EndpointRegistry.from_data({"name": "ep", "config": {"served_entities": [ENTITIES[kind]]}}).get("ep")

    assert files_unsupported_reason(config("openai")) is None
    assert files_unsupported_reason(config("vllm_pool")) is None
    assert "serves the local model 'tiny-llama', which reads text only" in files_unsupported_reason(config("local_model"))
    mlflow = {**ENTITIES["mlflow"], "task": "llm/v1/chat"}
    reason = files_unsupported_reason(EndpointRegistry.from_data({"name": "ep", "config": {"served_entities": [mlflow]}}).get("ep"))
    assert "takes text rows; files => needs a chat endpoint behind an external_model" in reason


def test_pool_backend_reports_a_down_replica_through_request_done():
    backend: Any = backend_for(entity("vllm_pool"))
    backend._statuses = {"http://127.0.0.1:1": "ready", "http://127.0.0.1:2": "ready"}
    backend.router.set_ready(list(backend._statuses))
    from ai_query import RetryableEndpointError

    url = backend.router.pick("a prompt")
    request = HTTPRequest("POST", url + "/chat/completions", {}, {})
    assert backend.request_done(request, RetryableEndpointError("connection lost")) is True  # another replica takes it
    assert backend.router.available() == [u for u in backend._statuses if u != url]


@pytest.mark.parametrize("kind, concurrency, expected", [
    ("vllm_pool", "auto", 64),      # our own engine: full from the start
    ("local_model", "auto", 64),
    ("vllm_pool", "gradient", 8),   # the gradient asked for: it probes from initial_concurrency
    ("openai", "auto", 8),          # a remote endpoint: AIMD's slow start from initial_concurrency
])
def test_our_own_engines_start_at_max_concurrency_and_remote_ones_probe(fresh_registry, kind, concurrency, expected):
    registry = EndpointRegistry.from_data({"name": "ep", "config": {"served_entities": [ENTITIES[kind]]},
                                           "client_config": {"max_concurrency": 64, "initial_concurrency": 8,
                                                             "concurrency": concurrency}})
    client = AIQueryClient(registry)
    try:
        assert client.endpoint("ep").limiter.limit == expected
    finally:
        client.close()
