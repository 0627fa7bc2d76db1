"""The latency-gradient limiter against a simulated self-hosted server that queues instead of 429.

The server takes ``capacity`` requests at a time at ``BASE`` seconds each; beyond that, requests
queue and latency grows linearly with the queue (``BASE * in_flight / capacity``). Time is
simulated on a fake clock, in two ways:

- ``simulate``: in rounds, like ``test_concurrency.py``: each round fills the limiter's window
  and releases the requests at their completion times;
- ``flow``: event by event, a FIFO server with ``capacity`` slots and a client that refills the
  window as each request completes, so requests of different windows overlap as they do for
  real; service times may vary (uniform jitter, or exponential like LLM output lengths).
"""

from __future__ import annotations

import asyncio
import heapq
import random
from typing import Callable

import pytest

from ai_query.limits.gradient import GradientConcurrencyLimiter, default_queue_size

from .fakes import FakeClock

BASE = 0.2


def server_latency(in_flight: int, capacity: int, base: float = BASE) -> float:
    return base if in_flight <= capacity else base * in_flight / capacity


def simulate(
    limiter: GradientConcurrencyLimiter,
    clock: FakeClock,
    capacity: int | None,
    rounds: int,
    *,
    base: float = BASE,
    jitter: float = 0.0,
    rng: random.Random | None = None,
) -> list[int]:
    """Limits after each round; ``capacity=None`` is a server whose latency does not depend on load."""

    async def run() -> list[int]:
        limits = []
        for _ in range(rounds):
            window = limiter.limit
            starts = [limiter.try_acquire() for _ in range(window)]
            assert limiter.try_acquire() is None  # the window is exactly the limit
            latency = base if capacity is None else server_latency(window, capacity, base)
            latencies = sorted(latency * (1 + jitter * (2 * rng.random() - 1)) if rng else latency for _ in starts)
            t0 = clock.now
            for started, took in zip(starts, latencies):
                assert started is not None
                clock.now = t0 + took
                await limiter.release("ok", started)
            limits.append(limiter.limit)
        return limits

    return asyncio.run(run())


def uniform(jitter: float, rng: random.Random) -> Callable[[], float]:
    return lambda: BASE * (1 + jitter * (2 * rng.random() - 1))


def flow(
    limiter: GradientConcurrencyLimiter,
    clock: FakeClock,
    capacity: int,
    requests: int,
    service: Callable[[], float] = lambda: BASE,
) -> tuple[list[int], float]:
    """Limits after each completion, and how busy the server was over the last third (1.0: always)."""

    async def run() -> tuple[list[int], float]:
        slots = [clock.now] * capacity  # when each server slot is next free
        pending: list[tuple[float, int, float]] = []  # (finish, seq, started)
        sent = 0
        limits: list[int] = []
        finished: list[float] = []

        def refill() -> None:
            nonlocal sent
            while sent < requests and (started := limiter.try_acquire()) is not None:
                finish = max(clock.now, heapq.heappop(slots)) + service()
                heapq.heappush(slots, finish)
                heapq.heappush(pending, (finish, sent, started))
                sent += 1

        refill()
        while pending:
            finish, _, started = heapq.heappop(pending)
            clock.now = finish
            await limiter.release("ok", started)
            limits.append(limiter.limit)
            finished.append(finish)
            refill()
        k = len(finished) * 2 // 3
        return limits, (len(finished) - k) / (finished[-1] - finished[k]) / (capacity / BASE)

    return asyncio.run(run())


def tail(limits: list[int], n: int) -> list[int]:
    return limits[-n:]


def mean(values: list[int]) -> float:
    return sum(values) / len(values)


@pytest.mark.parametrize("capacity, rounds", [(8, 3000), (48, 3000), (200, 1500)])
def test_converges_near_the_capacity_instead_of_growing_to_the_maximum(capacity, rounds):
    clock = FakeClock()
    limiter = GradientConcurrencyLimiter(8, maximum=256, clock=clock)
    limits = simulate(limiter, clock, capacity, rounds=rounds)
    last = tail(limits, rounds // 3)
    assert 0.6 * capacity <= mean(last) <= 1.6 * capacity, (capacity, mean(last))
    assert max(last) <= 1.6 * capacity, max(last)
    # probes halve the limit for a round every 100; apart from them it stays at or above the knee
    assert sorted(last)[len(last) // 20] >= capacity, sorted(last)[:60]
    assert limiter.probes >= 10


@pytest.mark.parametrize("capacity", [1, 2])
def test_a_server_that_takes_one_or_two_requests_at_a_time_is_not_flooded(capacity):
    """Started at 8, above the capacity: the first probe finds the latency without the queue."""
    clock = FakeClock()
    limiter = GradientConcurrencyLimiter(8, maximum=256, clock=clock)
    limits, busy = flow(limiter, clock, capacity, capacity * 2000)
    last = tail(limits, len(limits) // 2)
    assert mean(last) <= 1.6 * capacity and max(last) <= 2 * capacity, sorted(set(last))
    assert busy >= 0.95
    assert limiter.long_latency == pytest.approx(BASE, rel=0.1)


@pytest.mark.parametrize("jitter", [0.0, 0.3, 0.8])
def test_converges_when_requests_of_different_windows_overlap(jitter):
    clock = FakeClock()
    limiter = GradientConcurrencyLimiter(8, maximum=256, clock=clock)
    limits, busy = flow(limiter, clock, 48, 48 * 1000, uniform(jitter, random.Random(3)))
    last = tail(limits, len(limits) // 3)
    assert 0.6 * 48 <= mean(last) <= 1.6 * 48
    assert max(last) <= 1.6 * 48
    assert busy >= 0.95  # the limit does not sit below the knee
    assert limiter.probes >= 5
    assert limiter.long_latency == pytest.approx(BASE, rel=0.2)


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_converges_with_heavy_tailed_latencies(seed):
    """Exponential service times, like LLM answers of very different lengths: noisier, still near the knee."""
    rng = random.Random(seed)
    clock = FakeClock()
    limiter = GradientConcurrencyLimiter(8, maximum=256, clock=clock)
    limits, busy = flow(limiter, clock, 48, 48 * 1000, lambda: rng.expovariate(1 / BASE))
    last = tail(limits, len(limits) // 3)
    assert 0.6 * 48 <= mean(last) <= 1.6 * 48
    assert max(last) <= 2 * 48
    assert busy >= 0.75


def test_converges_with_noisy_latencies_in_rounds():
    clock = FakeClock()
    limiter = GradientConcurrencyLimiter(8, maximum=256, clock=clock)
    limits = simulate(limiter, clock, 48, rounds=3000, jitter=0.3, rng=random.Random(7))
    last = tail(limits, 1000)
    assert 0.6 * 48 <= mean(last) <= 1.6 * 48
    assert max(last) <= 1.6 * 48


def test_without_probes_the_long_term_latency_absorbs_the_queue_and_the_limit_creeps_up():
    """Plain Gradient2 drifts under a standing queue: the reason the limiter probes."""
    clock = FakeClock()
    limiter = GradientConcurrencyLimiter(8, maximum=256, long_window=100, probe_interval=None, clock=clock)
    limits = simulate(limiter, clock, 48, rounds=1200)
    assert limiter.probes == 0
    assert limits[-1] > 1.6 * 48


def test_recovers_upward_when_the_capacity_rises():
    clock = FakeClock()
    limiter = GradientConcurrencyLimiter(8, maximum=256, clock=clock)
    before = simulate(limiter, clock, 16, rounds=500)
    assert max(tail(before, 200)) <= 1.6 * 16
    after = simulate(limiter, clock, 96, rounds=600)
    reached = next(i for i, limit in enumerate(after) if limit >= 96)
    assert reached <= 100, reached
    last = tail(after, 300)
    assert 0.9 * 96 <= mean(last) <= 1.6 * 96


def test_follows_the_capacity_down():
    clock = FakeClock()
    limiter = GradientConcurrencyLimiter(8, maximum=256, clock=clock)
    simulate(limiter, clock, 96, rounds=500)
    after = simulate(limiter, clock, 24, rounds=600)
    below = next(i for i, limit in enumerate(after) if limit <= 1.6 * 24)
    assert below <= 20, below
    last = tail(after, 300)
    assert 0.6 * 24 <= mean(last) <= 1.6 * 24


def test_a_slower_model_is_learnt_again_by_probing():
    """The no-load latency doubles (a slower model): halving the load does not help, so it is not a queue."""
    clock = FakeClock()
    limiter = GradientConcurrencyLimiter(8, maximum=256, clock=clock)
    simulate(limiter, clock, 48, rounds=500)
    after = simulate(limiter, clock, 48, rounds=300, base=2 * BASE)
    assert min(after) >= 12, min(after)  # the limit does not collapse towards 1 while it learns
    last = tail(after, 200)
    assert 0.9 * 48 <= mean(last) <= 1.6 * 48
    assert limiter.long_latency == pytest.approx(2 * BASE, rel=0.1)


def test_grows_to_the_maximum_when_latency_does_not_depend_on_load():
    clock = FakeClock()
    limiter = GradientConcurrencyLimiter(8, maximum=256, clock=clock)
    limits = simulate(limiter, clock, None, rounds=400)
    reached = limits.index(256)
    assert reached <= 200, reached
    # the periodic probe halves it for a round now and then; otherwise it stays at the maximum
    assert limits[reached:].count(256) >= 0.95 * (400 - reached)
    assert limits[-1] == 256


def test_does_not_grow_while_the_caller_sends_too_few_requests():
    clock = FakeClock()
    limiter = GradientConcurrencyLimiter(40, maximum=256, clock=clock)

    async def trickle() -> None:
        for _ in range(200):
            started = await limiter.acquire()  # one request at a time: far below half the limit
            clock.now += BASE
            await limiter.release("ok", started)

    asyncio.run(trickle())
    assert limiter.updates >= 8
    assert limiter.limit == 40 and limiter.probes == 0


def test_a_burst_of_overloads_in_one_round_trip_is_one_decrease():
    clock = FakeClock()
    limiter = GradientConcurrencyLimiter(40, maximum=64, clock=clock)
    starts = [limiter.try_acquire() for _ in range(40)]
    clock.now += 0.5
    asyncio.run(limiter.release("ok", starts[0]))
    for s in starts[1:]:
        asyncio.run(limiter.release("overload", s))
    assert limiter.decreases == 1 and limiter.overload_signals == 39
    assert limiter.limit == 28
    clock.now += 1.0  # a round trip later, another overload decreases again
    asyncio.run(limiter.release("overload", limiter.try_acquire()))
    assert limiter.decreases == 2 and limiter.limit == 19


def test_errors_neither_grow_nor_shrink_the_limit_nor_feed_latency():
    clock = FakeClock()
    limiter = GradientConcurrencyLimiter(16, maximum=64, clock=clock)
    for _ in range(200):
        started = limiter.try_acquire()
        clock.now += 30.0  # a failure that took long says nothing about queueing
        asyncio.run(limiter.release("error", started))
    assert limiter.limit == 16 and limiter.updates == 0 and limiter.short_latency == 0.0


def test_a_probe_does_not_wait_for_members_of_its_cohort_that_failed():
    clock = FakeClock()
    limiter = GradientConcurrencyLimiter(8, maximum=256, clock=clock)
    simulate(limiter, clock, 48, rounds=60)  # past the first probe, at the knee

    async def until_a_probe_starts() -> None:
        while not limiter.probing:
            window = limiter.limit
            starts = [limiter.try_acquire() for _ in range(window)]
            clock.now += server_latency(window, 48)
            for started in starts:
                await limiter.release("ok", started)

    async def probe_with_failures() -> None:
        cohort = [limiter.try_acquire() for _ in range(limiter.limit)]
        clock.now += BASE
        for i, started in enumerate(cohort):
            await limiter.release("error" if i % 4 == 0 else "ok", started)

    asyncio.run(until_a_probe_starts())
    probes = limiter.probes
    asyncio.run(probe_with_failures())
    assert not limiter.probing and limiter.probes == probes
    assert limiter.limit >= 48  # the limit from before the probe is back


def test_acquire_waits_at_the_limit_and_never_exceeds_it():
    clock = FakeClock()
    limiter = GradientConcurrencyLimiter(4, maximum=4, clock=clock)
    peak = 0

    async def one() -> None:
        nonlocal peak
        started = await limiter.acquire()
        peak = max(peak, limiter.in_flight)
        await asyncio.sleep(0)
        clock.now += 0.01
        await limiter.release("ok", started)

    async def main() -> None:
        await asyncio.gather(*(one() for _ in range(50)))

    asyncio.run(main())
    assert peak == 4 and limiter.in_flight == 0


def test_waiters_are_served_in_order_and_a_cancelled_waiter_leaks_no_slot():
    clock = FakeClock()
    limiter = GradientConcurrencyLimiter(2, maximum=2, clock=clock)
    admitted: list[int] = []

    async def one(i: int) -> None:
        started = await limiter.acquire()
        admitted.append(i)
        await asyncio.sleep(0)
        await limiter.release("ok", started)

    async def main() -> None:
        held = [limiter.try_acquire(), limiter.try_acquire()]
        tasks = [asyncio.ensure_future(one(i)) for i in range(2000)]
        await asyncio.sleep(0)
        assert limiter.try_acquire() is None  # full, and others wait first
        tasks[0].cancel()
        await asyncio.sleep(0)
        for started in held:
            await limiter.release("ok", started)
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    assert admitted == list(range(1, 2000))
    assert limiter.in_flight == 0 and limiter.try_acquire() is not None


def test_a_waiter_cancelled_just_after_its_slot_was_handed_over_gives_the_slot_back():
    limiter = GradientConcurrencyLimiter(1, maximum=1, clock=FakeClock())

    async def main() -> None:
        held = limiter.try_acquire()
        first = asyncio.ensure_future(limiter.acquire())
        second = asyncio.ensure_future(limiter.acquire())
        await asyncio.sleep(0)
        await limiter.release("ok", held)  # the slot goes to `first`...
        first.cancel()  # ...which is cancelled before it runs
        started = await asyncio.wait_for(second, 1.0)
        assert first.cancelled() and limiter.in_flight == 1
        await limiter.release("ok", started)

    asyncio.run(main())
    assert limiter.in_flight == 0


def test_default_queue_size_is_sqrt_but_small_for_small_limits():
    assert default_queue_size(100) == 10
    assert default_queue_size(4) == 1
    assert default_queue_size(1) == 0.25


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"initial": 10, "maximum": 5}, "initial"),
        ({"smoothing": 0.0}, "smoothing"),
        ({"long_window": 1}, "long_window"),
        ({"backoff": 1.0}, "backoff"),
        ({"probe_interval": 0}, "probe_interval"),
        ({"probe_factor": 1.0}, "probe_factor"),
        ({"min_samples": 0}, "min_samples"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientConcurrencyLimiter(**kwargs)
