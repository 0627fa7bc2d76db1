"""``--mlflow-run`` without Spark: the command line and ``[mlflow]`` checked before anything runs, the
metrics made of the run log's counters, and a tracking server that does not answer (a real closed
port on 127.0.0.1) costing one warning and nothing else."""

from __future__ import annotations

import logging
import socket
import textwrap
from pathlib import Path

import pytest

from ai_query import ConfigError
from ai_query._commands import main
from batch_runner import JobRunReport, JobSpec
from batch_runner._mlflow import MlflowPush, MlflowTarget, job_metrics

KEY = "sk-proj-ABCDEFGHIJKLMNOPQRSTUVWX"


def spec(tmp_path: Path, extra: str = "") -> Path:
    job = tmp_path / "job.toml"
    job.write_text(textwrap.dedent("""\
        name = "m"
        key = ["id"]
        query = "SELECT id, ai_query('local-chat', t) AS a FROM src"
        [sources]
        src = "src"
        [output]
        path = "out"
        mode = "merge"
    """) + extra)
    return job


def report() -> JobRunReport:
    r = JobRunReport("m", "/out", "/usage", "r1", rows=5, rows_ok=4, rows_failed=1, prompt_tokens=50, completion_tokens=20,
                     cost_usd=0.01, seconds=2.0, pending_before=5)
    r.per_endpoint = {"ep/a": {"rows": 4, "attempts": 7, "tokens": 60, "cost": 0.01, "by_status": {"200": 3, "none": 1}},
                      "b": {"rows": 1, "attempts": 1, "tokens": 10, "cost": None, "by_status": {"200": 1}}}
    return r


def test_metrics_are_the_run_logs_counters():
    m = job_metrics(report())
    assert (m["requests"], m["attempts"], m["retries"], m["rows_ok"], m["rows_failed"]) == (5, 8, 3, 4, 1)
    assert (m["prompt_tokens"], m["completion_tokens"], m["total_tokens"], m["cost_usd"], m["rows_per_s"]) == (50, 20, 70, 0.01, 2.5)
    assert (m["endpoint.ep/a.retries"], m["endpoint.b.requests"], "endpoint.b.cost_usd" in m) == (3, 1, False)
    # requests by their last HTTP status ("none": no HTTP answer), as the serving endpoint's /metrics counts them
    assert (m["endpoint.ep/a.status_200"], m["endpoint.ep/a.status_none"], m["endpoint.b.status_200"]) == (3, 1, 1)
    idle = job_metrics(JobRunReport("m", "/out", "/usage", "r2"))  # a run with nothing pending sent nothing
    assert (idle["requests"], idle["retries"], idle["rows"]) == (0, 0, 0)


@pytest.mark.parametrize("argv, message", [
    (["--mlflow-experiment", "x"], "needs --mlflow-run"),
    (["--mlflow-run=abc123", "--mlflow-experiment", "x"], "drop one of them"),
])
def test_mlflow_options_that_contradict_fail_before_anything_runs(tmp_path, capsys, argv, message):
    assert main(["run", str(spec(tmp_path)), *argv]) == 2
    assert message in capsys.readouterr().err


def test_mlflow_table_in_the_spec_is_checked():
    with pytest.raises(ConfigError, match=r"\[mlflow\] has unknown key\(s\) run; allowed are experiment, run_id, tracking_uri"):
        JobSpec.from_dict({"name": "m", "query": "SELECT 1", "sources": {"s": "s"}, "output": {"path": "o"},
                           "mlflow": {"run": True}}, Path("."))
    loaded = JobSpec.from_dict({"name": "m", "query": "SELECT 1", "sources": {"s": "s"}, "output": {"path": "o"},
                                "mlflow": {"experiment": "nightly"}}, Path("."))
    assert MlflowTarget.from_spec(loaded.mlflow) == MlflowTarget(experiment="nightly")


def test_an_unreachable_tracking_server_warns_once_and_fails_nothing(tmp_path, caplog):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    job = JobSpec.load(spec(tmp_path))
    push = MlflowPush(MlflowTarget(tracking_uri=f"http://user:{KEY}@127.0.0.1:{port}"))
    with caplog.at_level(logging.WARNING, logger="batch_runner"):
        assert push.push(job, report(), {"job": "m"}) is None
        assert push.push(job, report(), {"job": "m"}) is None  # later jobs: not tried again, not warned again
    (record,) = [r for r in caplog.records if "not pushed to MLflow" in r.getMessage()]
    text = record.getMessage()
    assert f"http://127.0.0.1:{port}" in text and "no answer within 5 s" in text and KEY not in text and "user" not in text


def test_a_one_shot_runs_metrics_come_from_its_audit_counts():
    from batch_runner import RunSummary

    summary = RunSummary("m", "/out", rows=6, rows_ok=5, rows_failed=1, prompt_tokens=30, completion_tokens=12, seconds=3.0,
                         response_column="a", cost_usd=None, rows_deduplicated=2, requests=4, attempts=6)
    m = job_metrics(summary)
    assert (m["requests"], m["attempts"], m["retries"], m["rows_deduplicated"], m["rows_per_s"]) == (4, 6, 2, 2, 2.0)
    assert "cost_usd" not in m and "rows_pending_after" not in m  # no pricing: no cost metric, rather than a 0
