"""`ai-query run --mlflow-run`: a real job against the simulator, its counters pushed to a real local
MLflow tracking store (a file store under tmp_path; mlflow-skinny has no SQL store) and read back
with ``MlflowClient``: the metrics are the usage table's sums for the run."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import textwrap

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from ai_query.testing import ProviderSimulator
from batch_runner import JobSpec, run_incremental, sample_reviews
from batch_runner._mlflow import SUMMARY_ARTIFACT, MlflowPush, MlflowTarget

pytestmark = pytest.mark.spark
mlflow = pytest.importorskip("mlflow")
SECRET = "sk-sim"  # tests/conftest.py sets AIQ_SECRET_SIM_KEY for the shared session's executors


@pytest.fixture(scope="module")
def sim():
    with ProviderSimulator(api_key=SECRET, latency_s=0.005) as simulator:
        yield simulator


@pytest.fixture
def workdir(tmp_path, sim, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 keeps the file store behind this switch
    (tmp_path / "endpoints.json").write_text(json.dumps({"name": "sim-chat", "config": {"served_entities": [{
        "name": "sim", "pricing": {"input_usd_per_million_tokens": 100.0, "output_usd_per_million_tokens": 200.0},
        "external_model": {"name": "sim-model", "provider": "openai", "task": "llm/v1/chat",
                           "openai_config": {"openai_api_key": "{{secrets/sim/key}}", "openai_api_base": sim.base_url}}}]},
        "client_config": {"max_attempts": 2}}))
    table = sample_reviews(30)
    hints = ["[[ratelimit:1]] " if i % 7 == 0 else "[[status:400]] " if i % 10 == 3 else "" for i in range(30)]
    write_deltalake(str(tmp_path / "reviews"), table.append_column("hint", pa.array(hints)))
    sim.reset()
    return tmp_path


def write_job(workdir, extra: str = "") -> JobSpec:
    (workdir / "job.toml").write_text(textwrap.dedent(f'''
        name = "mlflow-job"
        endpoints = "endpoints.json"
        key = ["review_id"]
        [prompt]
        endpoint = "sim-chat"
        template = "{{hint}}#{{review_id}} {{review}}"
        column = "answer"
        max_tokens = 6
        [sources]
        reviews = "reviews"
        [output]
        path = "out"
        mode = "merge"
        [options]
        chunk_rows = 12
        allowed_failure_rate = 1.0
        {extra}
    '''))
    return JobSpec.load(workdir / "job.toml")


def usage_sums(spec: JobSpec, run_id: str) -> dict[str, float]:
    rows = [r for r in DeltaTable(spec.usage_table).to_pyarrow_table().to_pylist() if dict(r["usage_context"])["run"] == run_id]
    return {
        "requests": len(rows),
        "attempts": sum(r["attempts"] for r in rows),
        "retries": sum(r["attempts"] - 1 for r in rows),
        "prompt_tokens": sum(r["input_token_count"] for r in rows),
        "completion_tokens": sum(r["output_token_count"] for r in rows),
        "cost_usd": sum(r["cost_usd"] or 0.0 for r in rows),
        "rows_failed": sum(r["status_code"] != 200 for r in rows),
    }


def test_job_counters_land_in_an_mlflow_run_equal_to_the_usage_table(spark, workdir, sim):
    spec = write_job(workdir)
    report = run_incremental(spec, spark, progress=False)
    uri = (workdir / "mlruns").as_uri()
    summary = {"job": report.job, "rows": report.rows}
    run_id = MlflowPush(MlflowTarget(experiment="nightly", tracking_uri=uri)).push(spec, report, summary)
    assert run_id is not None

    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == "nightly" and run.info.status == "FINISHED"
    metrics, sums = run.data.metrics, usage_sums(spec, report.run_id)
    assert sums["retries"] == 5 and sums["rows_failed"] == 3  # the run had retries (429s) and failed rows to count
    assert {k: metrics[k] for k in sums} == pytest.approx({k: float(v) for k, v in sums.items()})
    assert (metrics["rows"], metrics["rows_ok"]) == (30.0, 27.0)
    assert metrics["endpoint.sim-chat.requests"] == sums["requests"] == sim.stats.requests - sums["retries"]
    usage = [r for r in DeltaTable(spec.usage_table).to_pyarrow_table().to_pylist() if dict(r["usage_context"])["run"] == report.run_id]
    by_status = collections.Counter(str(r["status_code"] or "none") for r in usage)  # the failed rows' own statuses too
    assert len(by_status) >= 2 and {f"endpoint.sim-chat.status_{k}": float(n) for k, n in by_status.items()} == {
        k: v for k, v in metrics.items() if k.startswith("endpoint.sim-chat.status_")}
    assert metrics["seconds"] > 0 and metrics["rows_per_s"] == pytest.approx(30 / metrics["seconds"], rel=1e-3)
    params = run.data.params
    assert (params["job"], params["endpoints"], params["models"], params["rows_pending"], params["aiq_run_id"]) == (
        "mlflow-job", "sim-chat", "sim-model", "30", report.run_id)
    artifact = client.download_artifacts(run_id, SUMMARY_ARTIFACT, str(workdir))
    assert json.loads(open(artifact).read()) == summary
    everything = json.dumps([params, run.data.tags, open(artifact).read()])
    assert SECRET not in everything


def test_cli_pushes_each_job_from_the_spec_and_an_unreachable_server_fails_nothing(workdir, tmp_path, sim):
    uri = (tmp_path / "mlruns").as_uri()
    write_job(workdir, extra=f'\n[mlflow]\nexperiment = "from-spec"\ntracking_uri = "{uri}"\n'.replace("\n", "\n        "))
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1"}
    out = subprocess.run([sys.executable, "-m", "batch_runner.cli", "run", "--no-progress", "--no-probe", "--json",
                          str(workdir / "job.toml")], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    (job,) = json.loads(out.stdout)["jobs"]
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("from-spec").experiment_id])
    assert run.data.metrics["rows"] == job["rows"] == 30 and run.data.params["aiq_run_id"] == job["run_id"]
    assert run.data.metrics["prompt_tokens"] == job["prompt_tokens"]

    # the command line wins over the spec; a tracking server that does not answer: one warning, exit 0
    with socket_closed() as port:
        env["MLFLOW_TRACKING_URI"] = f"http://user:{SECRET}@127.0.0.1:{port}"
        out = subprocess.run([sys.executable, "-m", "batch_runner.cli", "run", "--no-progress", "--no-probe",
                              "--retry-failed", str(workdir / "job.toml"), "--mlflow-run"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("not pushed to MLflow") == 1 and "http://127.0.0.1" in out.stderr and SECRET not in out.stderr
    assert len(client.search_runs([client.get_experiment_by_name("from-spec").experiment_id])) == 1


class socket_closed:
    """A local port nothing listens on."""

    def __enter__(self) -> int:
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        return self.port

    def __exit__(self, *exc: object) -> None:
        pass
