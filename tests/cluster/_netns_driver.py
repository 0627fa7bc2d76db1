"""The driver program of ``test_netns_cluster``: run inside the driver's network namespace.

It builds its session the way a user does (``build_session`` with ``SPARK_LOCAL_IP`` set to the
namespace's address, nothing else), registers one endpoint with a request quota and a
concurrency limit (so that every request goes through the driver's quota broker and leases),
runs an ``ai_query`` SQL query with live progress on the standalone cluster, and writes one
JSON file (``RESULT``) with what the test checks: the rows, the addresses the driver-side
services announced, what the broker and the progress collector saw, the simulator's counters,
and whether the Spark UI answered on the driver's address.

Usage: ``python -m tests.cluster._netns_driver SPARK_MASTER SIMULATOR_URL ROWS RESULT``
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request

ENDPOINT = "netns"


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 (a test-made address)
        return response.read()


def main(master: str, sim_url: str, rows: int) -> dict:
    import spark_udfs
    from ai_query import EndpointRegistry

    spark = spark_udfs.build_session(master, app_name="ai-query-netns")
    try:
        registry = EndpointRegistry.builtin().with_endpoints(EndpointRegistry.from_data({
            "name": ENDPOINT,
            "config": {"served_entities": [{"name": "m", "external_model": {
                "name": "sim-model", "provider": "openai", "task": "llm/v1/chat",
                "openai_config": {"openai_api_key_plaintext": "sk-sim", "openai_api_base": f"{sim_url}/v1"}}}]},
            # a one-hour window: the broker's count is still whole when the query is done
            "client_config": {"queries_per_hour": 100000, "max_concurrency": 8},
        }))
        spark_udfs.register(spark, registry)
        state = spark_udfs._state(spark)  # noqa: SLF001 (the broker and collector of this session)
        broker = state.quota_broker
        answered = spark_udfs.sql(spark, f"""
            SELECT id, ai_query('{ENDPOINT}', CONCAT('tell me about row ', id),
                                modelParameters => named_struct('max_tokens', 8)) AS r
            FROM range(0, {rows}, 1, 2)
        """, audit=True, progress=True).select("id", "r.*").collect()
        # progress travels as datagrams flushed when each task ends: give the last ones a moment
        progress = state.live_progress.collector if state.live_progress is not None else None
        for _ in range(100):
            if progress is None or progress.snapshot().rows >= rows:
                break
            time.sleep(0.1)
        ui = spark.sparkContext.uiWebUrl
        ui_answered = ui is not None and b"Spark" in _get(f"{ui}/jobs/")
        return {
            "rows": [{"id": r["id"], "status": r["aiq_status"], "answer": r["response"], "prompt_tokens": r["aiq_prompt_tokens"],
                      "completion_tokens": r["aiq_completion_tokens"]} for r in answered],
            "driver_host": spark.conf.get("spark.driver.host"),
            "broker_address": list(broker.address) if broker is not None else None,
            "broker_used": broker.states[ENDPOINT].used() if broker is not None else {},
            "progress_address": list(state.progress_address) if state.progress_address is not None else None,
            "progress_rows": progress.snapshot().rows if progress is not None else 0,
            "ui": ui,
            "ui_answered": ui_answered,
            "served": json.loads(_get(f"{sim_url}/_sim/stats")),
        }
    finally:
        spark.stop()


if __name__ == "__main__":
    result = main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    with open(sys.argv[4], "w") as fh:
        json.dump(result, fh)
