"""``ai-query serve`` speaks MLflow's scoring protocol for custom models, answering as MLflow's own
scoring server does (compared, for the same body, with ``mlflow.pyfunc.scoring_server.invocations``
run in this process on the same saved model), and takes Databricks' ``extra_params`` and
``usage_context`` on the ``llm/v1`` schemas (the latter lands in the usage table)."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from ai_query.serving import ServingServer
from ai_query.testing import ProviderSimulator
from tests.custom_models import custom_endpoints, save_custom_models

pytestmark = pytest.mark.integration

TOKEN = "tok-custom-admin-0001"
STAMPS = ["2026-03-01T09:30:00", "2026-03-01T17:05:00"]
SENDERS = ["ann", "bob"]
TEXTS = ["hi", "a message of well over twenty characters"]
RECORDS = [{"timestamp": s, "sender": f, "text": t} for s, f, t in zip(STAMPS, SENDERS, TEXTS)]
BODIES = {
    "dataframe_records": {"dataframe_records": RECORDS},
    "dataframe_split": {"dataframe_split": {"columns": ["timestamp", "sender", "text"],
                                            "data": [list(r.values()) for r in RECORDS]}},
    "inputs": {"inputs": {"timestamp": STAMPS, "sender": SENDERS, "text": TEXTS}},
    "instances": {"instances": RECORDS},
    "records with params": {"dataframe_records": RECORDS, "params": {"threshold": 0.01}},
    "split with params": {"dataframe_split": {"columns": ["timestamp", "sender", "text"],
                                              "data": [list(r.values()) for r in RECORDS]}, "params": {"threshold": 0.9}},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_custom_models(tmp_path_factory.mktemp("custom-models"))


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("custom-serving")
    mp = pytest.MonkeyPatch()
    mp.setenv("AIQ_SERVING_TOKEN", TOKEN)
    with ProviderSimulator(api_key="sk-sim") as sim:
        chat = {"name": "sim-chat", "config": {"served_entities": [{"name": "sim", "external_model": {
            "name": "sim-model", "provider": "openai", "task": "llm/v1/chat",
            "openai_config": {"openai_api_key": "{{secrets/sim/key}}", "openai_api_base": sim.base_url}}}]}}
        (root / "endpoints.json").write_text(json.dumps([*custom_endpoints(models), chat]))
        with ServingServer(endpoints=root / "endpoints.json", state_dir=root / "state", usage_table=str(root / "usage"),
                           include_registry=False) as s:
            s.usage_path = str(root / "usage")
            yield s
    mp.undo()


def post(server, endpoint: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/serving-endpoints/{endpoint}/invocations", json=body,
                      headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)


def mlflow_scoring(path: str, body: dict) -> tuple[int, object]:
    """What MLflow's own scoring server answers for ``body`` (its request handler, in this process)."""
    import mlflow.pyfunc
    from mlflow.pyfunc import scoring_server

    model = mlflow.pyfunc.load_model(path)
    response = scoring_server.invocations(json.dumps(body), "application/json", model, model.metadata.get_input_schema())
    return response.status, json.loads(response.response)


@pytest.mark.parametrize("case", list(BODIES))
def test_each_scoring_format_answers_what_mlflows_scoring_server_answers(server, models, case):
    status, expected = mlflow_scoring(models["triage"], BODIES[case])
    assert status == 200, expected
    got = post(server, "triage", BODIES[case])
    assert got.status_code == 200, got.text
    assert got.json() == expected
    assert len(expected["predictions"]) == 2  # one output per record, as the model computed them


@pytest.mark.parametrize("model, predictions", [
    ("plain", [5.0, 43.0]),  # a list: its values
    # mutation: ``_per_row`` ignoring ``records`` (the column's values) -> [5.0, 43.0], not MLflow's records
    ("column", [{"length": 5.0}, {"length": 43.0}]),  # a one-column DataFrame: records
])
def test_a_one_output_model_answers_like_mlflow(server, models, model, predictions):
    status, expected = mlflow_scoring(models[model], BODIES["inputs"])
    got = post(server, model, BODIES["inputs"])
    assert (got.status_code, got.json()) == (status, expected) == (200, {"predictions": predictions})


@pytest.mark.parametrize("endpoint, params, message", [
    ("plain", {"temperature": 0.5}, "its signature declares no params"),
    ("triage", {"treshold": 0.5}, "it declares threshold"),
])
def test_params_the_signature_does_not_declare_are_refused(server, endpoint, params, message):
    got = post(server, endpoint, {"dataframe_records": RECORDS, "params": params})
    assert got.status_code == 400 and message in got.json()["message"], got.text


def test_malformed_scoring_bodies_are_400_naming_the_shape(server):
    split = post(server, "triage", {"dataframe_split": {"columns": ["text"], "data": [["a", "b"]]}})
    both = post(server, "triage", {"dataframe_records": RECORDS, "instances": RECORDS})
    assert split.status_code == 400 and "each row of 'data'" in split.json()["message"]
    assert both.status_code == 400 and "exactly one of" in both.json()["message"]


def test_extra_params_and_usage_context_on_llm_v1_chat_reach_the_model_and_the_usage_table(server):
    from deltalake import DeltaTable

    context = {"project": "triage", "end_user": "ann"}
    ok = post(server, "sim-chat", {"messages": [{"role": "user", "content": "usage context marker"}],
                                   "extra_params": {"max_tokens": 2}, "usage_context": context})
    unknown = post(server, "sim-chat", {"messages": [{"role": "user", "content": "x"}], "extra_params": {"threshold": 1}})
    bad_context = post(server, "sim-chat", {"messages": [{"role": "user", "content": "x"}], "usage_context": {"n": 1}})
    assert ok.status_code == 200, ok.text
    assert ok.json()["choices"][0]["finish_reason"] == "length"  # the simulator cut the answer at max_tokens=2
    assert unknown.status_code == 400 and "extra_params: unknown parameter(s) 'threshold'" in unknown.json()["message"]
    assert bad_context.status_code == 400 and "usage_context" in bad_context.json()["message"]
    rows: list = []
    for _ in range(100):  # appended in the background, about once a second
        if DeltaTable.is_deltatable(server.usage_path):
            rows = [r for r in DeltaTable(server.usage_path).to_pyarrow_table().to_pylist() if r["usage_context"]]
            if rows:
                break
        time.sleep(0.1)
    [row] = rows
    assert dict(row["usage_context"]) == context and row["endpoint_name"] == "sim-chat"
