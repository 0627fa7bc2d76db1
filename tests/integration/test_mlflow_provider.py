"""MLflow pyfunc models run in-process: real models saved and registered with mlflow-skinny.

The models are written as code (MLflow's "models from code") into a temporary folder, saved with
``mlflow.pyfunc.save_model`` and, for ``models:/name/version``, registered in a file store
(``MLFLOW_ALLOW_FILE_STORE=true``; the sqlite store needs SQLAlchemy, which mlflow-skinny lacks).
"""

from __future__ import annotations

import asyncio
import pickle
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from ai_query import ConfigError, ModelParameters, PermanentEndpointError, SystemicEndpointError, Usage
from ai_query.backends._mlflow import MLflowModelRef, MLflowPyfuncBackend

pytestmark = pytest.mark.integration

CHAT, COMPLETIONS, EMBEDDINGS = "llm/v1/chat", "llm/v1/completions", "llm/v1/embeddings"

UPPER = """
    import mlflow
    from mlflow.pyfunc import PythonModel

    class Upper(PythonModel):
        def predict(self, context, model_input: list[str], params=None) -> list[str]:
            out = []
            for text in model_input:
                if "boom" in text:
                    raise ValueError(f"cannot shout {text!r}")
                out.append(text.upper())
            return out

    mlflow.models.set_model(Upper())
"""

CHAT_MODEL = """
    import mlflow
    from mlflow.pyfunc import PythonModel

    class Reverse(PythonModel):
        def predict(self, context, model_input, params=None):
            params = params or {}
            out = []
            for messages in model_input["messages"]:
                text = messages[-1]["content"]
                answer = text[::-1][: params.get("max_tokens", 1000)]
                out.append({
                    "id": "rev-1", "model": "reverser",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": len(messages), "completion_tokens": len(answer),
                              "total_tokens": len(messages) + len(answer)},
                })
            return out

    mlflow.models.set_model(Reverse())
"""

LABELS = """
    import mlflow
    from mlflow.pyfunc import PythonModel

    class Label(PythonModel):
        def predict(self, context, model_input: list[str], params=None) -> list[dict]:
            return [{"label": "long" if len(t) > 5 else "short", "length": len(t)} for t in model_input]

    mlflow.models.set_model(Label())
"""

EMBED = """
    import mlflow
    import pandas as pd
    from mlflow.pyfunc import PythonModel

    class Embed(PythonModel):
        def predict(self, context, model_input, params=None):
            texts = model_input["prompt"] if isinstance(model_input, pd.DataFrame) else model_input
            return [[float(len(t)), float(sum(c in "aeiou" for c in t)), 1.0] for t in texts]

    mlflow.models.set_model(Embed())
"""


def save(root: Path, name: str, code: str, signature=None) -> str:
    import mlflow.pyfunc

    source = root / f"{name}.py"
    source.write_text(textwrap.dedent(code))
    path = root / name
    with warnings.catch_warnings():  # mlflow's advice to add an input example
        warnings.simplefilter("ignore", UserWarning)
        mlflow.pyfunc.save_model(path=str(path), python_model=str(source), signature=signature, pip_requirements=[])
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema

    root = tmp_path_factory.mktemp("mlflow-models")
    messages = Array(Object([Property("role", "string"), Property("content", "string")]))
    chat_signature = ModelSignature(
        inputs=Schema([ColSpec(messages, "messages")]),
        params=ParamSchema([ParamSpec("max_tokens", "long", 1000), ParamSpec("temperature", "double", 0.0)]),
    )
    embed_signature = ModelSignature(inputs=Schema([ColSpec("string", "prompt")]))
    return {
        "upper": save(root, "upper", UPPER),
        "chat": save(root, "chat", CHAT_MODEL, chat_signature),
        "labels": save(root, "labels", LABELS),
        "embed": save(root, "embed", EMBED, embed_signature),
    }


def provider(uri: str, task: str = COMPLETIONS, **kwargs) -> MLflowPyfuncBackend:
    return MLflowPyfuncBackend("custom-model", MLflowModelRef(model_uri=uri), task, **kwargs)


async def call(p: MLflowPyfuncBackend, value, params: ModelParameters = ModelParameters(), task: str | None = None):
    prompt_text = value if isinstance(value, str) else "".join(m["content"] for m in value)
    return await p.invoke(task or p.task, value, params, None, prompt_text)


async def call_all(p: MLflowPyfuncBackend, values, params: ModelParameters = ModelParameters()):
    return await asyncio.gather(*(call(p, v, params) for v in values), return_exceptions=True)


def test_many_concurrent_rows_come_back_in_order_micro_batched_with_estimated_usage(models):
    p = provider(models["upper"], max_batch_size=32)
    prompts = [f"row {i}: hello" for i in range(300)]
    results = asyncio.run(call_all(p, prompts))
    assert [r.value for r in results] == [t.upper() for t in prompts]
    for prompt, r in zip(prompts, results):
        assert r.usage == Usage.estimate(prompt, prompt.upper()) and r.usage.estimated
    assert p.rows_predicted == 300
    assert 300 / 32 <= p.predict_calls <= 30, p.predict_calls  # batches of up to 32, not 300 calls


def test_without_micro_batching_every_row_is_its_own_predict(models):
    p = provider(models["upper"], max_batch_size=1)
    prompts = [f"r{i}" for i in range(40)]
    results = asyncio.run(call_all(p, prompts))
    assert [r.value for r in results] == [t.upper() for t in prompts]
    assert p.predict_calls == 40


def test_a_row_that_makes_predict_raise_fails_alone_without_retry(models):
    p = provider(models["upper"], max_batch_size=16)
    prompts = [f"ok {i}" if i % 10 != 3 else f"boom {i}" for i in range(50)]
    results = asyncio.run(call_all(p, prompts))
    for prompt, r in zip(prompts, results):
        if prompt.startswith("boom"):
            assert isinstance(r, PermanentEndpointError) and not isinstance(r, SystemicEndpointError)
            assert "ValueError" in str(r) and f"cannot shout {prompt!r}" in str(r) and models["upper"] in str(r)
            assert "Traceback" not in str(r)
        else:
            assert r.value == prompt.upper()
    assert p.isolations > 0 and p.predict_calls < len(prompts)  # bisected, not retried row by row


def test_a_chat_schema_model_gets_messages_and_its_declared_params_and_reports_its_usage(models):
    p = provider(models["chat"], CHAT)
    params = ModelParameters.from_mapping({"max_tokens": 4, "temperature": 0.0, "top_p": 0.5})  # top_p: not declared
    values = ["abcdef", [{"role": "system", "content": "be brief"}, {"role": "user", "content": "xyz"}]]
    plain, messages = asyncio.run(call_all(p, values, params))
    assert plain.value == "fedc" and messages.value == "zyx"  # max_tokens reached the model
    assert plain.usage == Usage(1, 4, 5, False) and messages.usage == Usage(2, 3, 5, False)
    assert plain.model == "reverser" and plain.finish_reason == "stop" and plain.request_id == "rev-1"


def test_rows_with_different_params_are_not_mixed_in_one_predict(models):
    p = provider(models["chat"], CHAT, max_batch_size=64)

    async def both():
        short = ModelParameters.from_mapping({"max_tokens": 2})
        long = ModelParameters.from_mapping({"max_tokens": 5})
        return await asyncio.gather(*(call(p, "abcdefgh", short if i % 2 else long) for i in range(20)))

    results = asyncio.run(both())
    assert [r.value for r in results] == ["hgfed" if i % 2 == 0 else "hg" for i in range(20)]
    assert p.predict_calls == 2


def test_json_outputs_become_json_text(models):
    p = provider(models["labels"], CHAT)
    results = asyncio.run(call_all(p, ["hi", "a longer one"]))
    assert [r.value for r in results] == ['{"label": "short", "length": 2}', '{"label": "long", "length": 12}']
    assert all(r.usage.estimated for r in results)


def test_embeddings_from_a_model_with_a_named_column(models):
    p = provider(models["embed"], EMBEDDINGS)
    results = asyncio.run(call_all(p, ["banana", "sky"]))
    assert [r.value for r in results] == [[6.0, 3.0, 1.0], [3.0, 0.0, 1.0]]
    assert results[0].usage == Usage.estimate("banana", "")


def test_the_model_is_loaded_once_per_process(models):
    first = provider(models["labels"], CHAT)
    second = provider(models["labels"], CHAT)
    asyncio.run(call_all(first, ["warm"]))
    asyncio.run(call_all(second, ["x"] * 10))
    assert second._model is first._model
    assert second.load_seconds < 0.05


def test_the_provider_pickles_without_its_model(models):
    p = provider(models["upper"], max_batch_size=8)
    asyncio.run(call_all(p, ["x"]))
    copy = pickle.loads(pickle.dumps(p))
    assert copy._model is None and copy.max_batch_size == 8 and copy.ref == p.ref
    assert asyncio.run(call(copy, "again")).value == "AGAIN"


def test_a_bad_path_is_systemic_and_names_the_uri_and_the_fix(tmp_path):
    missing = str(tmp_path / "no-such-model")
    p = provider(missing)
    with pytest.raises(SystemicEndpointError) as info:
        asyncio.run(call(p, "x"))
    assert missing in str(info.value) and "Check the path" in str(info.value)
    # the failure is remembered: later rows fail at once with the same error
    with pytest.raises(SystemicEndpointError):
        asyncio.run(call(p, "y"))


@pytest.fixture
def file_registry(tmp_path, monkeypatch):
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return store


def test_a_registered_model_by_name_and_version(file_registry, tmp_path):
    import mlflow
    import mlflow.pyfunc

    source = tmp_path / "upper.py"
    source.write_text(textwrap.dedent(UPPER))
    with mlflow.start_run():
        mlflow.pyfunc.log_model(name="model", python_model=str(source), registered_model_name="shouter", pip_requirements=[])
    p = MLflowPyfuncBackend("shouter-v1", MLflowModelRef(entity_name="shouter", entity_version="1"), COMPLETIONS)
    assert p.ref.uri == "models:/shouter/1"
    assert [r.value for r in asyncio.run(call_all(p, ["a", "b"]))] == ["A", "B"]

    wrong = MLflowPyfuncBackend("shouter-v7", MLflowModelRef(entity_name="shouter", entity_version=7), COMPLETIONS)
    with pytest.raises(SystemicEndpointError) as info:
        asyncio.run(call(wrong, "x"))
    assert "models:/shouter/7" in str(info.value) and "MLFLOW_TRACKING_URI" in str(info.value)


def test_a_file_store_without_the_flag_says_how_to_allow_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    p = MLflowPyfuncBackend("m", MLflowModelRef(entity_name="anything", entity_version="1"), COMPLETIONS)
    with pytest.raises(SystemicEndpointError) as info:
        asyncio.run(call(p, "x"))
    assert "models:/anything/1" in str(info.value) and "MLFLOW_ALLOW_FILE_STORE=true" in str(info.value)


def test_no_registry_configured_says_to_set_the_tracking_uri(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # mlflow's default store lives in the working directory
    p = MLflowPyfuncBackend("m", MLflowModelRef(entity_name="nowhere", entity_version="2"), COMPLETIONS)
    with pytest.raises(SystemicEndpointError) as info:
        asyncio.run(call(p, "x"))
    assert "models:/nowhere/2" in str(info.value) and "Set MLFLOW_TRACKING_URI" in str(info.value)


def test_importing_ai_query_imports_no_mlflow():
    code = (
        "import sys, ai_query, ai_query.backends._mlflow, ai_query.limits.gradient;"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_without_mlflow_installed_the_error_names_the_package():
    code = textwrap.dedent("""
        import asyncio, sys
        sys.modules["mlflow"] = None  # what an environment without mlflow looks like to an import
        from ai_query import ModelParameters, SystemicEndpointError
        from ai_query.backends._mlflow import MLflowModelRef, MLflowPyfuncBackend
        p = MLflowPyfuncBackend("m", MLflowModelRef(model_uri="/models/m"), "llm/v1/chat")
        try:
            asyncio.run(p.invoke("llm/v1/chat", "x", ModelParameters(), None, "x"))
        except SystemicEndpointError as exc:
            print(exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install mlflow-skinny" in out.stdout and "/models/m" in out.stdout


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "entity_name is missing"),
        ({"entity_name": "m"}, "entity_version is missing"),
        ({"model_uri": "/m", "entity_name": "m", "entity_version": "1"}, "not both"),
        ({"model_uri": " "}, "model_uri must be a non-empty string"),
    ],
)
def test_model_refs_are_validated_at_construction(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MLflowModelRef(**kwargs)


def test_provider_settings_are_validated():
    with pytest.raises(ConfigError, match="max_batch_size"):
        provider("/m", max_batch_size=0)
    with pytest.raises(ConfigError, match="batch_wait_s"):
        provider("/m", batch_wait_s=5.0)
    with pytest.raises(ConfigError, match="llm/v1/chat"):
        provider("/m", "chat")


def test_an_mlflow_entity_in_the_registry_runs_through_the_client(models):
    """Config -> backend_for -> EndpointClient: the same path Spark tasks and the server use."""
    from ai_query import AIQueryClient, EndpointRegistry

    registry = EndpointRegistry.from_data({"name": "custom", "config": {"served_entities": [
        {"name": "upper", "model_uri": models["upper"], "task": "llm/v1/completions"}]}})
    assert registry.get("custom").entity.model_name == models["upper"]
    client = AIQueryClient(registry)
    try:
        results = client.map("custom", [f"row {i}" for i in range(50)])
    finally:
        client.close()
    assert [r.status for r in results] == ["ok"] * 50
    assert results[7].value == "ROW 7" and results[7].usage_estimated
