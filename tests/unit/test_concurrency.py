import asyncio

import pytest

from ai_query import AdaptiveConcurrencyLimiter

from .fakes import FakeClock


def simulate(limiter: AdaptiveConcurrencyLimiter, clock: FakeClock, capacity: int, rounds: int) -> list[int]:
    """Each round: fill the window; requests beyond the server's capacity get 429."""
    limits = []
    for _ in range(rounds):
        window = limiter.limit
        starts = [limiter.try_acquire() for _ in range(window)]
        clock.now += 0.2
        for i, started in enumerate(starts):
            assert started is not None
            outcome = "ok" if i < capacity else "overload"
            asyncio.run(limiter.release(outcome, started))
        limits.append(limiter.limit)
    return limits


def test_aimd_converges_below_an_unknown_capacity_and_oscillates_near_it():
    clock = FakeClock()
    limiter = AdaptiveConcurrencyLimiter(4, maximum=256, clock=clock)
    limits = simulate(limiter, clock, capacity=48, rounds=300)
    tail = limits[-100:]
    assert max(tail) <= 60, tail
    assert min(tail) >= 48 * 0.7 * 0.7, tail
    assert sum(tail) / len(tail) >= 48 * 0.75


def test_recovers_after_capacity_returns():
    clock = FakeClock()
    limiter = AdaptiveConcurrencyLimiter(32, maximum=64, clock=clock)
    simulate(limiter, clock, capacity=4, rounds=40)
    assert limiter.limit <= 6
    limits = simulate(limiter, clock, capacity=1000, rounds=200)
    assert limits[-1] == 64


def test_a_burst_of_429s_in_one_round_trip_is_one_decrease():
    clock = FakeClock()
    limiter = AdaptiveConcurrencyLimiter(40, maximum=64, backoff=0.5, clock=clock)
    starts = [limiter.try_acquire() for _ in range(40)]
    clock.now += 0.5
    asyncio.run(limiter.release("ok", starts[0]))
    for s in starts[1:]:
        asyncio.run(limiter.release("overload", s))
    assert limiter.decreases == 1 and limiter.limit == 20  # int(40.025 * 0.5)


def test_bounds_are_validated():
    with pytest.raises(ValueError, match="initial"):
        AdaptiveConcurrencyLimiter(10, maximum=5)


def test_a_raised_ceiling_slow_starts_to_the_scaled_limit_then_probes_additively():
    clock = FakeClock()
    limiter = AdaptiveConcurrencyLimiter(10, maximum=20, clock=clock)
    asyncio.run(limiter.release("overload", limiter.try_acquire()))  # leave slow start: limit 9
    assert limiter.limit == 9
    limiter.set_maximum(40)  # the other worker left: room for about twice as much
    for _ in range(9):
        asyncio.run(limiter.release("ok", limiter.try_acquire()))
    assert limiter.limit == 18  # slow start (one per success) up to 9 * 40 / 20
    for _ in range(40):
        asyncio.run(limiter.release("ok", limiter.try_acquire()))
    # then additively, and slower near the scaled overload point (10 * 40 / 20): ~1.3 in two round trips
    assert limiter.limit == 19


def _round_trips_until(limiter: AdaptiveConcurrencyLimiter, clock: FakeClock, capacity: int, target: int) -> int:
    for n in range(1, 500):
        simulate(limiter, clock, capacity, 1)
        if limiter.limit >= target:
            return n
    raise AssertionError(f"never reached {target}: {limiter.limit}")


def test_growth_slows_at_the_last_overload_point_and_speeds_up_past_it():
    clock = FakeClock()
    limiter = AdaptiveConcurrencyLimiter(4, maximum=256, clock=clock)
    simulate(limiter, clock, capacity=24, rounds=60)  # settled around 24
    w_max = limiter._w_max
    assert w_max is not None and 22 <= w_max <= 27
    # capacity doubles: past W_max growth speeds up (a flat +1 per round trip needed 24 round trips)
    assert _round_trips_until(limiter, clock, capacity=1000, target=48) <= 18


def test_near_the_overload_point_probes_are_rarer_than_with_a_flat_increase():
    clock = FakeClock()
    limiter = AdaptiveConcurrencyLimiter(4, maximum=256, clock=clock)
    simulate(limiter, clock, capacity=48, rounds=100)
    decreases = limiter.decreases
    limits = simulate(limiter, clock, capacity=48, rounds=100)
    assert limiter.decreases - decreases <= 16  # 15; a flat +1 per round trip: 19
    assert sum(limits) / len(limits) >= 46.5  # 47.1; a flat +1 per round trip: 47.0


def test_a_refusal_on_arrival_does_not_refill_its_slot():
    """A cap's 429 comes back at once while the accepted requests are still in flight: the limit
    falls to those, instead of each freed slot drawing another 429 until the next decrease."""
    clock = FakeClock()
    limiter = AdaptiveConcurrencyLimiter(8, maximum=256, clock=clock)
    while limiter.limit < 64:  # slow start, each answer 100 ms
        started = limiter.try_acquire()
        clock.now += 0.1
        asyncio.run(limiter.release("ok", started))
    starts = [limiter.try_acquire() for _ in range(64)]
    clock.now += 0.002
    for started in starts[48:]:  # the server took 48; the other 16 are refused on arrival
        asyncio.run(limiter.release("overload", started))
    assert limiter.limit == 48 and limiter.decreases == 1  # one decrease (x0.9 = 57), then no slot refilled


def test_another_workers_overload_ends_this_ones_slow_start():
    clock = FakeClock()
    limiter = AdaptiveConcurrencyLimiter(8, maximum=256, clock=clock)
    for _ in range(8):
        asyncio.run(limiter.release("ok", limiter.try_acquire()))
    assert limiter.limit == 16  # slow start: one more per success
    limiter.on_shared_overload()
    for _ in range(16):
        asyncio.run(limiter.release("ok", limiter.try_acquire()))
    assert limiter.limit == 16  # at the shared overload point: a slow probe, not a doubling
    assert limiter.decreases == 0  # it was not refused itself: nothing taken back
