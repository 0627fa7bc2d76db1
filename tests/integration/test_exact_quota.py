"""A job told the provider's exact RPM draws no quota 429 from a server that counts over a sliding window.

Two clients share the driver's broker, as two Spark workers do, against a real simulator whose
quota counts each request for 60 s after it arrives. The first rows are slow (1 s each, two in
flight), so the first minute's requests reach the server over ~10 s; the rows after them are
fast. A client that charged a request to the window in which it was admitted (before waiting
for its concurrency slot) would see the whole first minute leave its window at t=60 at once and
send the fast rows into a server window still full of the slow ones. Counts, never times.
"""

from __future__ import annotations

import threading

from ai_query import AIQueryClient, EndpointRegistry
from ai_query.limits.quota import QuotaBroker
from ai_query.testing import ProviderSimulator


def test_sliding_window_rpm_draws_no_quota_429():
    with ProviderSimulator(api_key="sk-sim", rpm_limit=20, window_s=60.0, quota_window="sliding") as sim:
        registry = EndpointRegistry.from_data({
            "name": "rpm", "config": {"served_entities": [{"name": "m", "external_model": {
                "name": "sim-model", "provider": "openai", "task": "llm/v1/chat",
                "openai_config": {"openai_api_key_plaintext": "sk-sim", "openai_api_base": sim.base_url}}}]},
            "client_config": {"requests_per_minute": 20, "max_concurrency": 2, "initial_concurrency": 2,
                              "prefix_ordering": "off"}})
        broker = QuotaBroker(list(registry))
        results: dict[str, list] = {}

        def worker(name: str) -> None:
            client = AIQueryClient(registry, quota_broker=broker.address, quota_share=0.5)
            try:
                rows = [f"[[delay:1]] slow {name} {i}" for i in range(10)] + [f"fast {name} {i}" for i in range(10)]
                results[name] = client.map("rpm", rows)
            finally:
                client.close()

        try:
            threads = [threading.Thread(target=worker, args=(n,)) for n in ("a", "b")]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
            stats = sim.snapshot()
        finally:
            broker.close()
    assert all(r.ok for rows in results.values() for r in rows) and sum(map(len, results.values())) == 40
    assert stats["admitted"] == 40
    assert stats["rpm_rejections"] == 0  # the client's window never let a request into a full server window
    assert stats["peak_concurrency"] <= 2
