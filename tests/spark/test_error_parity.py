"""The same fault reads the same in a Spark row's ``errorMessage`` and in a served response.

Batch tasks send through the aiohttp transport, the serving endpoint through either transport;
the fault servers of ``tests/raw_wire.py`` reset the connection, stay silent past the timeout,
answer bytes that are not HTTP, or answer 200 with a body that is not JSON. Every text must
match word for word (the port included), since both paths build it from the core's transport
errors and the same endpoint client.
"""

from __future__ import annotations

import json

import httpx
import pytest

import spark_udfs
from ai_query import EndpointRegistry
from ai_query.serving import ServingServer
from ai_query.transport import TRANSPORT_KINDS
from tests.raw_wire import ThreadedRawServer, fault_by_path

FAULTS = {
    "reset": "connection lost calling 'fault-reset': the connection to {origin} closed before the answer was complete",
    "silent": "timed out after 0.3 s waiting for 'fault-silent'",
    "garbage": "connection lost calling 'fault-garbage': the answer from {origin} is not valid HTTP/1.1",
    "malformed": "HTTP 200 from served entity 'm' with a body that is not a valid llm/v1/chat response",
}


def endpoints(port: int) -> list[dict]:
    return [{
        "name": f"fault-{behaviour}",
        "config": {"served_entities": [{"name": "m", "external_model": {
            "name": "m", "provider": "openai", "task": "llm/v1/chat",
            "openai_config": {"openai_api_key": "{{secrets/sim/key}}", "openai_api_base": f"http://127.0.0.1:{port}/{behaviour}/v1"}}}]},
        "client_config": {"max_attempts": 1, "request_timeout_s": 0.3},
    } for behaviour in FAULTS]


@pytest.fixture(scope="module")
def faults():
    with ThreadedRawServer(fault_by_path) as server:
        yield server


@pytest.fixture(scope="module")
def row_errors(spark, faults):
    """Each fault endpoint's errorMessage in a Spark row (batch tasks: the aiohttp transport)."""
    spark_udfs.register(spark, EndpointRegistry.from_data(endpoints(faults.port)))
    try:
        selects = ", ".join(f"ai_query('fault-{b}', 'hi', failOnError => false).errorMessage AS `{b}`" for b in FAULTS)
        row = spark.sql(f"SELECT {selects}").collect()[0].asDict()
    finally:
        spark_udfs.register(spark, EndpointRegistry.builtin())
    return row


@pytest.mark.parametrize("serving_transport", TRANSPORT_KINDS)
@pytest.mark.parametrize("behaviour", list(FAULTS))
def test_a_fault_reads_the_same_in_a_spark_row_and_a_served_response(row_errors, faults, tmp_path, behaviour, serving_transport):
    (tmp_path / "endpoints.json").write_text(json.dumps(endpoints(faults.port)))
    with ServingServer(endpoints=tmp_path / "endpoints.json", state_dir=tmp_path / "state", include_registry=False,
                       http_client=serving_transport) as server:
        served = httpx.post(f"{server.url}/serving-endpoints/fault-{behaviour}/invocations",
                            json={"messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    expected = FAULTS[behaviour].format(origin=f"http://127.0.0.1:{faults.port}")
    row_error = row_errors[behaviour]
    assert expected in row_error
    assert served.status_code == 502
    assert served.json()["message"] == f"serving endpoint 'fault-{behaviour}': {row_error}"
