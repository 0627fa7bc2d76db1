"""``max_concurrency`` and quotas hold for the whole job at every instant, on Spark's two Python workers.

The provider (a real HTTP server) counts what it sees: its peak of requests in flight from the
job, and the requests it refuses for its quota. Counts, never times.
"""

from __future__ import annotations

import time

import pandas as pd
import pytest
from pyspark.sql.functions import pandas_udf

import spark_udfs
from ai_query import EndpointRegistry
from ai_query.testing import ProviderSimulator


def _endpoint(name: str, sim: ProviderSimulator, **client):
    return {"name": name, "config": {"served_entities": [{"name": "m", "external_model": {
        "name": "sim-model", "provider": "openai", "task": "llm/v1/chat",
        "openai_config": {"openai_api_key_plaintext": "sk-sim", "openai_api_base": sim.base_url}}}]},
        "client_config": client}


def _late(prompt: pd.Series) -> pd.Series:
    """Holds back the rows of a partition marked ``late``: its worker comes back after the other took the whole endpoint."""
    if prompt.str.startswith("late").any():
        time.sleep(1.0)
    return prompt


def test_two_workers_never_exceed_max_concurrency(spark):
    # No cap on the server: it only counts. 8 is the job's total over both workers.
    with ProviderSimulator(api_key="sk-sim", latency_s=0.02) as sim:
        spark_udfs.register(spark, EndpointRegistry.builtin().with_endpoints(EndpointRegistry.from_data(
            _endpoint("capped", sim, max_concurrency=8, initial_concurrency=8))))
        spark.udf.register("late", pandas_udf(_late, "string"))
        try:
            # Three partitions on two cores: a short one, a long one, and one whose rows come late,
            # after its worker left and the other worker took all 8 slots.
            parts = [[(i, f"early {i}") for i in range(40)], [(i, f"long {i}") for i in range(40, 640)],
                     [(i, f"late {i}") for i in range(640, 700)]]
            df = spark.createDataFrame(spark.sparkContext.parallelize(range(3), 3).flatMap(lambda p: parts[p]),
                                       "id INT, prompt STRING")
            assert df.rdd.getNumPartitions() == 3
            df.createOrReplaceTempView("capped_rows")
            sim.reset()
            rows = spark_udfs.sql(spark, "SELECT id, ai_query('capped', late(prompt)) AS r FROM capped_rows",
                                  audit=True).select("id", "r.aiq_status").collect()
            stats = sim.snapshot()
        finally:
            spark_udfs.register(spark, EndpointRegistry.builtin())
    assert sorted(r.id for r in rows) == list(range(700)) and all(r.aiq_status == "ok" for r in rows)
    assert stats["requests"] == 700
    assert 4 < stats["peak_concurrency"] <= 8  # both workers' requests together, never above the total
