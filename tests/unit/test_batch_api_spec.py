"""``[batch_api]`` in a job spec, ``client_config.batch_api`` of an endpoint, and the batch rate of ``Pricing``."""

from __future__ import annotations

import pytest

from ai_query import ConfigError
from ai_query.config import EndpointConfig, Pricing
from batch_runner._spec import batch_api_options, duration_s


def test_batch_api_options_read_durations_and_refuse_unknown_keys():
    assert batch_api_options({"deadline": "6h"}) == {"completion_window": "24h", "deadline_s": 21600.0}
    assert duration_s("90m", "x") == 5400 and duration_s(30, "x") == 30 and duration_s("1d", "x") == 86400
    with pytest.raises(ConfigError, match=r"batch_api\] has unknown key\(s\) deadlin; allowed are"):
        batch_api_options({"deadlin": "6h"})
    with pytest.raises(ConfigError, match=r"batch_api.deadline must be a duration such as \"6h\".*got 'soon'"):
        batch_api_options({"deadline": "soon"})
    with pytest.raises(ConfigError, match="batch_api.max_requests must be a whole number >= 1, got 0"):
        batch_api_options({"max_requests": 0})


def test_batch_rate_defaults_to_half_and_can_be_set():
    """Mutation caught: the batch cost using the online rate."""
    online = Pricing.from_dict({"input_usd_per_million_tokens": 2.0, "output_usd_per_million_tokens": 8.0}, "p")
    assert online.batch_cost(1_000_000, 1_000_000) == pytest.approx(online.cost(1_000_000, 1_000_000) / 2)
    assert "batch_input_usd_per_million_tokens" not in online.to_dict()
    own = Pricing.from_dict({"input_usd_per_million_tokens": 2.0, "output_usd_per_million_tokens": 8.0,
                             "batch_input_usd_per_million_tokens": 1.5, "batch_output_usd_per_million_tokens": 4.0}, "p")
    assert own.batch_cost(1_000_000, 1_000_000) == pytest.approx(5.5)


def test_run_batch_api_and_deadline_flags_set_the_spec_option():
    """Mutation caught: --deadline dropped (the spec's [batch_api] without a deadline)."""
    import argparse

    from batch_runner._spec import JobSpec
    from batch_runner.cli import _with_batch_api

    spec = JobSpec(name="j", query="SELECT 1", sources={"a": "b"}, output_path="o", output_mode="merge", key=("k",))
    assert _with_batch_api(spec, argparse.Namespace(batch_api=True, deadline="90m")).batch_api == \
        {"completion_window": "24h", "deadline_s": 5400.0}
    kept = spec.replace(batch_api=batch_api_options({"deadline": "2h", "max_requests": 10}))
    assert _with_batch_api(kept, argparse.Namespace(batch_api=True, deadline=None)).batch_api["deadline_s"] == 7200.0
    with pytest.raises(ConfigError, match="--batch-api needs an incremental job"):
        _with_batch_api(spec.replace(output_mode="overwrite", key=()), argparse.Namespace(batch_api=True, deadline=None))


def test_batch_api_on_a_provider_without_a_batch_api_is_refused_naming_the_fix():
    """Mutation caught: the provider check removed (the endpoint is accepted)."""
    data = {"name": "gw", "config": {"served_entities": [{"name": "g", "external_model": {
        "name": "m", "provider": "databricks-model-serving", "task": "llm/v1/chat",
        "databricks_model_serving_config": {"databricks_api_token": "{{secrets/sim/key}}", "databricks_workspace_url": "http://127.0.0.1:1"}}}]},
        "client_config": {"batch_api": {"deadline": "6h"}}}
    with pytest.raises(ConfigError) as err:
        EndpointConfig.from_dict(data, "endpoints[0]")
    text = str(err.value)
    assert "client_config.batch_api" in text and "'databricks-model-serving'" in text and "remove client_config.batch_api" in text
    with pytest.raises(ConfigError, match=r"client_config\.batch_api\.deadline must be a duration"):
        EndpointConfig.from_dict({**data, "client_config": {"batch_api": {"deadline": "soon"}}}, "endpoints[0]")


class _SlowBatch:
    """A batch that never ends by itself: 100 lines open until cancelled (the poll loop's view)."""

    def __init__(self) -> None:
        self.cancelled_at: float | None = None
        self.now = 0.0

    def poll(self, batch_id: str):
        from ai_query.backends._batch_api import BatchState

        ended = self.cancelled_at is not None
        return BatchState(id=batch_id, status="cancelled" if ended else "in_progress", ended=ended, total=100, done=0)

    def cancel(self, batch_id: str) -> None:
        self.cancelled_at = self.now


def test_the_deadline_keeps_a_margin_over_the_online_time_of_the_open_lines():
    """100 open lines at 100 rows/s online take 1 s; the loop cancels 1 x 1.25 + 1 = 2.25 s before
    the deadline (10 s), at the first poll at or after 7.75 s. Mutation caught: the reserve without
    its margin (cancel at 9 s: the benchmark's 30-s deadline then ended at 30.9 s)."""
    from ai_query.batch.provider_batches import poll_until_ended

    batch = _SlowBatch()

    def sleep(s: float) -> None:
        batch.now += s

    collected = []
    cancelled = poll_until_ended(batch, ["b1"], lambda bid, seen: collected.append((bid, seen.status)), deadline_at=10.0,
                                 online_rows_per_s=100.0, poll_s=0.5, max_poll_s=0.5, sleep=sleep, clock=lambda: batch.now)
    assert cancelled == 1 and collected == [("b1", "cancelled")]
    assert 7.7 <= batch.cancelled_at <= 7.8, batch.cancelled_at
