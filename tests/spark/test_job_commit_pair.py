"""A chunk's usage rows and output rows land together or not at all, and each paid request is in
the usage table exactly once, whichever of the two commits fails.

The failures are real Delta refusals: a table already at the usage (or output) path with a
schema the commit cannot write. Preflight passes (the paths are writable directories), so the
chunk is sent and answered, then a commit fails. Tables are read back with delta-rs.
"""

from __future__ import annotations

import json
import shutil
import textwrap

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from ai_query import AIQueryError
from ai_query.testing import ProviderSimulator
from batch_runner import JobSpec, run_incremental

pytestmark = pytest.mark.spark

ROWS, CHUNK = 6, 3


@pytest.fixture(scope="module")
def sim():
    with ProviderSimulator(api_key="sk-sim") as s:
        yield s


@pytest.fixture
def workdir(tmp_path, sim):
    (tmp_path / "endpoints.json").write_text(json.dumps({"name": "sim-chat", "config": {"served_entities": [{
        "name": "sim", "external_model": {"name": "sim-model", "provider": "openai", "task": "llm/v1/chat",
                                          "openai_config": {"openai_api_key": "{{secrets/sim/key}}", "openai_api_base": sim.base_url}}}]}}))
    write_deltalake(str(tmp_path / "reviews"), pa.table({"id": list(range(1, ROWS + 1)), "text": [f"review {i}" for i in range(ROWS)]}))
    (tmp_path / "job.toml").write_text(textwrap.dedent(f'''\
        name = "pair"
        endpoints = "endpoints.json"
        key = ["id"]
        query = "SELECT id, ai_query('sim-chat', text) AS answer FROM reviews"
        [sources]
        reviews = "reviews"
        [output]
        path = "out"
        mode = "merge"
        usage_path = "usage"
        [options]
        chunk_rows = {CHUNK}
    '''))
    sim.reset()
    return tmp_path


def _blocker(path) -> None:
    """An empty Delta table that reads as a job's table (``id``, ``aiq_status``) but refuses our rows:
    its ``must`` column is NOT NULL and no row of ours has it, so a merge or an append fails."""
    schema = pa.schema([pa.field("id", pa.int64()), pa.field("aiq_status", pa.string()), pa.field("must", pa.int64(), nullable=False)])
    write_deltalake(str(path), pa.Table.from_pylist([], schema=schema))


def _rows(path) -> list[dict]:
    return DeltaTable(str(path)).to_pyarrow_table().to_pylist() if DeltaTable.is_deltatable(str(path)) else []


def test_a_failed_usage_commit_leaves_the_output_untouched_and_the_rerun_pays_nothing_again(spark, workdir, sim):
    _blocker(workdir / "usage")
    with pytest.raises(AIQueryError):
        run_incremental(JobSpec.load(workdir / "job.toml"), spark, progress=False)
    sent = sim.stats.requests
    assert sent == CHUNK  # the first chunk was answered, then its usage commit failed
    assert not DeltaTable.is_deltatable(str(workdir / "out")), "the output was committed without its usage rows"

    shutil.rmtree(workdir / "usage")  # the fix
    report = run_incremental(JobSpec.load(workdir / "job.toml"), spark, progress=False)
    out, usage = _rows(workdir / "out"), _rows(workdir / "usage")
    assert report.rows == ROWS and sorted(r["id"] for r in out) == list(range(1, ROWS + 1))
    assert sim.stats.requests == ROWS, "answers of the failed chunk were paid for twice"
    assert len(usage) == sim.stats.requests, "each paid request needs exactly one usage row"
    assert len({u["databricks_request_id"] for u in usage}) == len(usage)


def test_a_failed_output_commit_after_its_usage_commit_is_billed_once_even_when_the_journal_is_lost(spark, workdir, sim):
    _blocker(workdir / "out")
    with pytest.raises(AIQueryError):
        run_incremental(JobSpec.load(workdir / "job.toml"), spark, progress=False)
    assert sim.stats.requests == CHUNK and len(_rows(workdir / "usage")) == CHUNK  # usage v1 landed, output v1 did not

    shutil.rmtree(workdir / "out")
    shutil.rmtree(workdir / "out.aiq" / "journal")  # the answers are gone: the rerun must ask (and pay) again
    report = run_incremental(JobSpec.load(workdir / "job.toml"), spark, progress=False)
    usage = _rows(workdir / "usage")
    assert report.rows == ROWS and sorted(r["id"] for r in _rows(workdir / "out")) == list(range(1, ROWS + 1))
    assert sim.stats.requests == CHUNK + ROWS
    # every payment has its row: the rerun's chunks took versions after the orphan usage version 1,
    # so none of them was skipped as "already committed"
    assert len(usage) == sim.stats.requests
    assert DeltaTable(str(workdir / "usage")).transaction_version("ai-query:pair") == DeltaTable(
        str(workdir / "out")).transaction_version("ai-query:pair")
