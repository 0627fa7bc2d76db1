"""Batch-API mode from an endpoint's ``client_config.batch_api`` in ``spark.sql``: a real Spark
session against the simulator's batch APIs over real HTTP. Counts, never wall-clock times.

Each test names the mutation it catches (checked by applying it once and seeing the test fail).
"""

from __future__ import annotations

import pytest

import spark_udfs
from ai_query import EndpointRegistry
from ai_query.config import EndpointConfig
from ai_query.testing import ProviderSimulator

PRICES = {"input_usd_per_million_tokens": 0.5, "output_usd_per_million_tokens": 1.5}


def _endpoint(sim: ProviderSimulator, provider: str, batch_api: dict) -> dict:
    model: dict = {"name": "sim-model", "provider": provider, "task": "llm/v1/chat"}
    if provider == "openai":
        model["openai_config"] = {"openai_api_key": "{{secrets/sim/key}}", "openai_api_base": sim.base_url}
    else:
        model["anthropic_config"] = {"anthropic_api_key": "{{secrets/sim/key}}", "anthropic_api_base": sim.url}
    return {"name": "sim-batch", "config": {"served_entities": [{"name": "sim", "pricing": PRICES, "external_model": model}]},
            "client_config": {"max_attempts": 3, "batch_api": batch_api}}


def _register(spark, sim, provider: str, batch_api: dict) -> None:
    spark_udfs.register(spark, EndpointRegistry.builtin().with_endpoints(
        [EndpointConfig.from_dict(_endpoint(sim, provider, batch_api), "sim-batch")]))


def _audit_rows(spark, rows: int):
    spark.range(1, rows + 1).selectExpr("id", "concat('Review ', id, ' is fine') AS text").createOrReplaceTempView("reviews")
    df = spark_udfs.sql(spark, "SELECT id, ai_query('sim-batch', text, modelParameters => named_struct('max_tokens', 8)) AS r "
                               "FROM reviews", audit=True)
    return sorted(df.toArrow().to_pylist(), key=lambda r: r["id"])


def _cost(row, factor: float) -> float:
    r = row["r"]
    return (r["aiq_prompt_tokens"] * PRICES["input_usd_per_million_tokens"]
            + r["aiq_completion_tokens"] * PRICES["output_usd_per_million_tokens"]) * factor / 1e6


@pytest.mark.spark
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_sql_rows_go_as_provider_batches_answered_once_at_the_batch_rate(spark, provider):
    """300 rows through ``spark.sql`` in batch mode: every row answered once, from the batches.
    Mutations caught: the ``batch_api`` branch in ``amap`` skipped (online requests == rows);
    ``batch_result`` priced at the online rate (cost == 2x); a batch answer's row placed at its
    position among the sent rows instead of its own (answers do not echo their own review)."""
    rows = 300
    with ProviderSimulator(api_key="sk-sim", batch_api={"delay_s": 0.3}) as sim:
        _register(spark, sim, provider, {"poll_s": 0.05, "max_poll_s": 0.2})
        out = _audit_rows(spark, rows)
        served = sim.snapshot()
        assert [r["id"] for r in out] == list(range(1, rows + 1))
        assert {r["r"]["aiq_status"] for r in out} == {"ok"}
        assert served["requests"] == 0, "rows went online although the batches answered them"
        assert served["batch_lines"] == rows == served["batch_lines_ok"]
        assert served["batches_created"] >= 1
        for r in out:
            assert f"Review {r['id']} is fine"[: len(r["r"]["response"]) - 6] in r["r"]["response"]
            assert r["r"]["aiq_cost_usd"] == pytest.approx(_cost(r, 0.5))
        assert sum(r["r"]["aiq_prompt_tokens"] for r in out) == served["batch_prompt_tokens"]
        # each row names the batch that answered it, as a job's output does
        assert len({r["r"]["aiq_batch_id"] for r in out}) == served["batches_created"] and all(r["r"]["aiq_batch_id"] for r in out)


@pytest.mark.spark
def test_sql_deadline_shorter_than_the_batch_sends_the_rest_online(spark):
    """The batches would take 120 s; the deadline is 4 s (cancelled 1 s before it, the reserve's fixed margin): each partition's batch is cancelled at
    the deadline, the lines it did are kept, the rest go online and the query returns every row
    ok. Mutations caught: no cancel at the deadline (the query waits for the batch:
    batches_cancelled == 0); the cancelled batch's finished lines dropped (online == rows)."""
    rows = 200
    with ProviderSimulator(api_key="sk-sim", batch_api={"delay_s": 120.0}) as sim:
        _register(spark, sim, "openai", {"deadline": "4s", "online_rows_per_s": 100000, "poll_s": 0.05, "max_poll_s": 0.2})
        out = _audit_rows(spark, rows)
        served = sim.snapshot()
        assert [r["id"] for r in out] == list(range(1, rows + 1))
        assert {r["r"]["aiq_status"] for r in out} == {"ok"}
        assert served["batches_cancelled"] == served["batches_created"] >= 1
        assert served["batch_lines"] == rows
        assert 0 < served["batch_lines_ok"] < rows
        assert served["requests"] == rows - served["batch_lines_ok"]  # exactly the rows no batch finished
        at_batch_rate = sum(1 for r in out if r["r"]["aiq_cost_usd"] == pytest.approx(_cost(r, 0.5)))
        assert at_batch_rate == served["batch_lines_ok"]
        assert sum(1 for r in out if r["r"]["aiq_batch_id"]) == served["batch_lines_ok"]  # the online ones: NULL
