"""``ai-query serve`` with its usage and payload tables on ``s3://``: a real server (two worker
processes) appends to Delta tables in a bucket of the S3 server (moto, ``tests/s3_server.py``),
read back with delta-rs. The two workers commit to the same tables: delta-rs's conditional put
keeps both workers' commits (none lost to the other's).
"""

from __future__ import annotations

import httpx
import pytest
from deltalake import DeltaTable

from tests.integration.test_serving_workers import ASK, AUTH, chat_endpoint, serve, sim  # noqa: F401 - sim is a fixture

pytestmark = pytest.mark.integration


def test_serving_usage_and_payload_tables_on_s3(sim, tmp_path, s3_server):  # noqa: F811 - the sim fixture
    bucket = s3_server.bucket()
    usage, payloads = f"s3://{bucket}/serving/usage", f"s3://{bucket}/serving/payloads"
    with serve(tmp_path, "--usage-table", usage, "--inference-table", payloads) as served:
        with httpx.Client(base_url=served.url, headers=AUTH) as admin:
            assert admin.post("/api/2.0/serving-endpoints", json=chat_endpoint(sim, "on-s3")).status_code == 200
        answers = served.spread(24, lambda c: c.post("/serving-endpoints/on-s3/invocations", json=ASK,
                                                     headers={"X-Client-Request-Id": "s3-usage"}))
        assert len({pid for pid, _ in answers}) == 2 and all(r.status_code == 200 for _, r in answers)
    # stopped: each worker flushed its rows into the bucket on the way out
    rows = [r for r in DeltaTable(usage).to_pyarrow_table().to_pylist() if r["client_request_id"] == "s3-usage"]
    assert len(rows) == 24 and {r["endpoint_name"] for r in rows} == {"on-s3"}
    assert len({r["databricks_request_id"] for r in rows}) == 24
    assert sum(r["input_token_count"] + r["output_token_count"] for r in rows) > 0
    logged = DeltaTable(payloads).to_pyarrow_table()
    assert set(logged.column("databricks_request_id").to_pylist()) >= {r["databricks_request_id"] for r in rows}
    keys = s3_server.keys(bucket, "serving/")
    assert any(k.startswith("serving/usage/_delta_log/") for k in keys) and any(k.startswith("serving/payloads/_delta_log/") for k in keys)
    assert not any("s3:/" in k for k in keys)
