"""Azure Blob Storage: the storage seam, Delta commits and a whole job on ``az://`` / ``abfss://``,
against Azurite (Microsoft's emulator, ``tests/azurite_server.py``) on 127.0.0.1.

Nothing is mocked: delta-rs and pyarrow's AzureFileSystem sign and send Blob REST requests to the
emulator with the credentials of the environment (``AZURE_*``) or of the job spec, as to Azure.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from ai_query import storage
from ai_query._storage_options import AZURITE_KEY
from ai_query.sinks import AppTransaction, DeltaCommitter
from ai_query.testing import ProviderSimulator
from tests.spark.test_job_resume import write_job

pytestmark = pytest.mark.spark


@pytest.fixture
def azure_env(azurite, monkeypatch):
    """The environment's credentials (``AZURE_*``) pointing at the emulator, as on a machine set up for Azure."""
    for name, value in azurite.options().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AZURITE_BLOB_STORAGE_URL", azurite.url)
    return azurite


def test_storage_seam_on_azure_with_the_environments_credentials(azure_env):
    container = azure_env.container()
    root = f"az://{container}/job.aiq"
    storage.append_text(storage.join(root, "runs.jsonl"), "a\n")
    storage.append_text(storage.join(root, "runs.jsonl"), "b\n")
    assert storage.read_appended(storage.join(root, "runs.jsonl")) == "a\nb\n"
    assert storage.create_exclusive(storage.join(root, "journal", "run-1", "tasks", "0.1"))
    assert not storage.create_exclusive(storage.join(root, "journal", "run-1", "tasks", "0.1"))
    storage.write_bytes(storage.join(root, "journal", "run-1", "part-1.jsonl"), b'{"k": 1}\n')
    assert storage.list_dir(storage.join(root, "journal"), dirs=True) == [f"{root}/journal/run-1"]
    # the account-qualified form names the same blobs
    abfss = f"abfss://{container}@devstoreaccount1.dfs.core.windows.net/job.aiq"
    assert storage.read_bytes(f"{abfss}/journal/run-1/part-1.jsonl") == b'{"k": 1}\n'
    assert storage.exists(f"{abfss}/journal/run-1/part-1.jsonl")
    storage.remove_tree(storage.join(root, "journal"))
    assert [b for b in azure_env.blobs(container) if b.startswith("job.aiq/")] == sorted(
        b for b in azure_env.blobs(container, "job.aiq/runs.jsonl.d"))
    assert len(azure_env.blobs(container, "job.aiq/runs.jsonl.d")) == 2


def test_a_jobs_commits_on_azure_through_kept_handles(azure_env):
    """What a job run does to its tables (``reuse_delta_tables``, fresh versions without the
    check, a merge bounded by its key range), on Azure: each commit lands once, in order."""
    path = f"az://{azure_env.container()}/out"
    DeltaCommitter(path).merge(pa.table({"k": [1, 2], "v": ["a", "b"]}), ["k"], AppTransaction("job", 1))
    with storage.reuse_delta_tables():
        committer = DeltaCommitter(path)
        assert committer.committed_version("job") == 1
        for v in range(2, 6):
            committer.merge(pa.table({"k": [v * 10, 2], "v": [f"x{v}", f"b{v}"]}), ["k"], AppTransaction("job", v),
                            check_committed=False)
        assert committer.committed_version("job") == 5
    table = DeltaTable(path).to_pyarrow_table().sort_by("k")
    assert table.column("k").to_pylist() == [1, 2, 20, 30, 40, 50]
    assert table.column("v").to_pylist() == ["a", "b5", "x2", "x3", "x4", "x5"]
    assert DeltaTable(path).version() == 4 and DeltaTable(path).transaction_version("job") == 5


def test_job_on_azure_with_credentials_only_in_the_spec(tmp_path, azurite):
    """``ai-query run`` with the output, usage and payload tables and the state on ``az://``, the
    account key only in the spec (a secret reference), no ``AZURE_*`` in its environment."""
    container = azurite.container()
    key_var = "AIQ_SECRET_AZ_KEY"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "AIQ_STORAGE_OPTIONS"))}
    env.update({key_var: AZURITE_KEY, "AZURITE_BLOB_STORAGE_URL": azurite.url, "PYTHONUNBUFFERED": "1"})
    with ProviderSimulator(api_key="sk-sim", seed=9) as sim:
        job = write_job(tmp_path, sim, rows=90, chunk=40)
        text = open(job).read()
        for local, remote in (('path = "out"', f'path = "az://{container}/out"'),
                              ('inference_path = "payloads"', f'inference_path = "az://{container}/payloads"')):
            assert local in text
            text = text.replace(local, remote)
        text += ('\n[storage_options]\nAZURE_STORAGE_ACCOUNT_NAME = "devstoreaccount1"\n'
                 'AZURE_STORAGE_ACCOUNT_KEY = "{{secrets/az/key}}"\nAZURE_STORAGE_USE_EMULATOR = "true"\n')
        open(job, "w").write(text)
        run = subprocess.run([sys.executable, "-m", "batch_runner.cli", "run", "--no-progress", job],
                             capture_output=True, text=True, timeout=600, env=env)
        assert run.returncode == 0, run.stderr[-3000:]
        assert sim.snapshot()["ok"] == 90
        status = subprocess.run([sys.executable, "-m", "batch_runner.cli", "status", job], capture_output=True, text=True,
                                timeout=600, env=env)
        assert status.returncode == 0, status.stderr[-3000:]
    assert AZURITE_KEY not in run.stdout + run.stderr + status.stdout + status.stderr
    options = dict(azurite.options())
    os.environ["AZURITE_BLOB_STORAGE_URL"] = azurite.url
    try:
        out = DeltaTable(f"az://{container}/out", storage_options=options).to_pyarrow_table()
        usage = DeltaTable(f"az://{container}/out.aiq/endpoint_usage", storage_options=options).to_pyarrow_table()
        payloads = DeltaTable(f"az://{container}/payloads", storage_options=options).to_pyarrow_table()
    finally:
        os.environ.pop("AZURITE_BLOB_STORAGE_URL")
    assert sorted(out.column("review_id").to_pylist()) == list(range(1, 91))
    assert usage.num_rows == 90 and payloads.num_rows == 90
    blobs = azurite.blobs(container)
    assert any(b.startswith("out.aiq/runs.jsonl.d/") for b in blobs)  # the run log, through pyarrow's AzureFileSystem
    assert not any(b.startswith("out.aiq/journal/") for b in blobs)  # committed and cleaned up
