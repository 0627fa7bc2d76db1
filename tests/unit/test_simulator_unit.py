"""The provider simulator's pure parts: latency distributions, the quota windows, answers, knob checks."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from ai_query.testing import Latency, ProviderSimulator, count_tokens
from ai_query.testing._limits import FixedWindowQuota, SlidingWindowQuota
from ai_query.testing._provider_formats import generate


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_fixed_latency_is_constant():
    assert Latency(0.2).sample(random.Random(0)) == 0.2
    assert Latency.parse(0.2) == Latency.parse("0.2") == Latency.parse(("fixed", 0.2)) == Latency(0.2)


def test_uniform_latency_stays_in_its_bounds_with_the_asked_mean():
    latency = Latency.parse("uniform:0.1,0.3")
    rng = random.Random(1)
    samples = [latency.sample(rng) for _ in range(20_000)]
    assert min(samples) >= 0.1 - 1e-9 and max(samples) <= 0.3 + 1e-9
    assert statistics.fmean(samples) == pytest.approx(0.2, abs=0.005)


def test_lognormal_latency_has_the_asked_mean_and_p99():
    latency = Latency(0.2, p99_s=0.8)
    assert latency.kind == "lognormal"
    rng = random.Random(2)
    samples = sorted(latency.sample(rng) for _ in range(50_000))
    assert statistics.fmean(samples) == pytest.approx(0.2, rel=0.05)
    assert samples[int(0.99 * len(samples))] == pytest.approx(0.8, rel=0.08)


def test_latency_draws_repeat_for_the_same_seed():
    latency = Latency.lognormal(0.1, 0.5)
    a, b = random.Random(9), random.Random(9)
    assert [latency.sample(a) for _ in range(10)] == [latency.sample(b) for _ in range(10)]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("lognormal:0.2", "takes (mean_s, p99_s)"),
        ("gamma:1,2", "not one of"),
        ("fast", "not seconds or 'kind:params'"),
        (("lognormal", (0.01, 10.0)), "largest possible ratio"),
        (("uniform", (0.3, 0.1)), "low_s <= high_s"),
    ],
)
def test_bad_latency_specs_name_the_fix(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Latency.parse(spec)


def test_quota_admits_up_to_the_limits_then_names_the_one_that_refused():
    clock = FakeClock()
    quota = FixedWindowQuota(rpm_limit=3, tpm_limit=100, window_s=10.0, clock=clock)
    assert quota.admit(40) == (None, 10.0)
    clock.now += 2.5
    assert quota.admit(40) == (None, 7.5)
    assert quota.admit(40) == ("tokens", 7.5)  # 120 > 100
    assert quota.admit(20) == (None, 7.5)
    assert quota.admit(1) == ("requests", 7.5)
    assert (quota.remaining_requests, quota.remaining_tokens) == (0, 0)
    clock.now += 7.5  # the next window opens exactly when Retry-After said
    assert quota.admit(100) == (None, 10.0) and quota.window == 1


def test_quota_refund_only_reaches_the_current_window():
    clock = FakeClock()
    quota = FixedWindowQuota(None, 100, 1.0, clock=clock)
    quota.admit(80)
    quota.refund(0, 50)
    assert quota.tokens == 30
    clock.now += 1.0
    quota.admit(10)
    quota.refund(0, 10)  # window 0 is gone
    assert quota.tokens == 10


def test_sliding_quota_counts_each_request_for_a_window_after_its_admission():
    clock = FakeClock()
    quota = SlidingWindowQuota(rpm_limit=2, tpm_limit=100, window_s=10.0, clock=clock)
    assert quota.admit(60)[0] is None
    clock.now += 4.0
    assert quota.admit(30)[0] is None
    assert quota.admit(1) == ("requests", 6.0)  # the first admission leaves at t=10
    clock.now += 6.0  # t=10: a fixed window would be empty now; this one still counts the second
    assert quota.admit(60) == (None, 10.0)
    assert quota.admit(1) == ("requests", 4.0)
    ticket = quota.ticket
    assert quota.refund(ticket, 50) == 50 and quota.tokens == 40
    clock.now += 10.0
    assert quota.refund(ticket, 5) == 0  # that admission left the window: nothing to give back


def test_generate_cuts_at_stop_then_at_max_tokens():
    assert count_tokens("echo: a  b\nc") == 4 and count_tokens("") == 0
    answer = generate("echo: a b c d", 3, ())
    assert (answer.text, answer.finish, answer.tokens) == ("echo: a b", "length", 3)
    answer = generate("echo: a b. c d", 10, (".",))
    assert (answer.text, answer.finish, answer.stop_sequence, answer.tokens) == ("echo: a b", "stop_sequence", ".", 3)
    answer = generate("echo: a b c. d", 2, (".",))  # the stop lies beyond max_tokens: length wins
    assert (answer.text, answer.finish) == ("echo: a", "length")
    assert generate("line one\nline two", 3, ()).text == "line one\nline"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"error_rates": {"404": 0.1}}, "unknown kinds"),
        ({"error_rates": {"500": 0.7, "503": 0.5}}, "at most 1"),
        ({"latency_s": 0.1, "latency": Latency(0.2)}, "not both"),
        ({"max_concurrency": 0}, "max_concurrency=0"),
        ({"window_s": 0}, "window_s=0"),
        ({"rpm_limit": 1.5}, "rpm_limit=1.5"),
    ],
)
def test_bad_knobs_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProviderSimulator(**kwargs)


def test_config_shows_the_knobs_but_not_the_key():
    sim = ProviderSimulator(api_key="sk-secret", latency=("uniform", (0.1, 0.3)), error_rates={500: 0.1})
    config = sim.config()
    assert config["auth"] is True and "sk-secret" not in repr(config)
    assert config["latency"]["kind"] == "uniform" and math.isclose(config["latency"]["mean_s"], 0.2)
    assert config["error_rates"] == {"500": 0.1}
