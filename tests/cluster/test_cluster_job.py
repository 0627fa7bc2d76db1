"""The same incremental job on a standalone cluster (two workers) and in local mode: same output."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from deltalake import DeltaTable

from ai_query.testing import ProviderSimulator
from batch_runner import JobSpec
from batch_runner._jobs import run_incremental
from tests.spark.test_job_resume import write_job

COMPARED = ["review_id", "answer", "aiq_status", "aiq_prompt_tokens", "aiq_completion_tokens", "aiq_cost_usd", "aiq_model"]


@pytest.mark.spark
def test_cluster_and_local_mode_give_the_same_output(standalone_cluster, spark, tmp_path):
    url, root = standalone_cluster
    with ProviderSimulator(api_key="sk-sim", latency_s=0.01) as sim:
        cluster_dir, local_dir = tmp_path / "cluster", tmp_path / "local"
        cluster_dir.mkdir()
        local_dir.mkdir()
        cluster_job = write_job(cluster_dir, sim, rows=120, chunk=60)
        env = dict(os.environ, AIQ_SECRET_SIM_KEY="sk-sim")
        out = subprocess.run([sys.executable, "-m", "batch_runner.cli", "run", "--no-progress", cluster_job, "--master", url],
                             capture_output=True, text=True, timeout=900, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        served_by_cluster = sim.snapshot()
        run_incremental(JobSpec.load(write_job(local_dir, sim, rows=120, chunk=60)), spark, progress=False)

    cluster = DeltaTable(str(cluster_dir / "out")).to_pyarrow_table().select(COMPARED).sort_by("review_id")
    local = DeltaTable(str(local_dir / "out")).to_pyarrow_table().select(COMPARED).sort_by("review_id")
    assert cluster.num_rows == 120 and cluster.to_pylist() == local.to_pylist()
    assert served_by_cluster["requests"] == 120
    # the executors really ran on the workers: each worker has an app directory with executor logs
    executor_logs = [p for i in range(2) for p in (root / f"worker{i}").glob("app-*/*/stderr")]
    assert len(executor_logs) >= 2, list(root.rglob("*"))
