"""Concurrency leased from the driver's broker by the workers sending now: a real broker on 127.0.0.1, real limiters."""

from __future__ import annotations

import asyncio
import random

import pytest

from ai_query import EndpointRegistry
from ai_query.limits.aimd import AdaptiveConcurrencyLimiter
from ai_query.limits.gradient import GradientConcurrencyLimiter
from ai_query.limits.leases import ConcurrencyLeases
from ai_query.limits.quota import QuotaBroker
from ai_query.limits.share import ConcurrencyShare


@pytest.fixture()
def broker():
    b = QuotaBroker(list(EndpointRegistry.builtin()))
    yield b
    b.close()


async def _until(predicate, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def _two_workers(broker, interval_s: float):
    """Two workers' limiters (each built at its static half of 64) and their shares of endpoint "ep"."""
    a_lim, b_lim = AdaptiveConcurrencyLimiter(32, maximum=32), AdaptiveConcurrencyLimiter(32, maximum=32)
    a = ConcurrencyShare("ep", broker.address, 64, [a_lim], interval_s=interval_s, worker="a")
    b = ConcurrencyShare("ep", broker.address, 64, [b_lim], interval_s=interval_s, worker="b")
    return a_lim, b_lim, a, b


def test_leases_never_sum_above_the_total():
    leases = ConcurrencyLeases()
    assert leases.lease("ep", "a", 64)["grant"] == 64  # alone: the whole endpoint
    assert leases.lease("ep", "b", 64)["grant"] == 0  # a holds every slot: b waits, it does not take its half
    assert leases.lease("ep", "a", 64, held=64, seq=1, ceiling=64)["grant"] == 32  # a is told to shed half
    leases.lease("ep", "a", 64, held=50, seq=1, grant=False)  # 50 still in flight on a
    assert leases.lease("ep", "b", 64)["grant"] == 14  # only the room a gave back
    leases.lease("ep", "a", 64, held=32, seq=1, grant=False)
    reply = leases.lease("ep", "b", 64, held=14, seq=1, ceiling=14)
    assert reply == {"grant": 32, "seq": 2, "workers": 2, "overloads": 0}
    assert leases.held("ep") == {"a": 32, "b": 32}
    # A report b sent before it heard of that raise cannot lower the record below it.
    leases.lease("ep", "b", 64, held=14, seq=1, grant=False)
    assert leases.held("ep")["b"] == 32
    assert leases.lease("ep", "c", 64)["grant"] == 0
    assert sum(leases.held("ep").values()) <= 64
    # 64 over three workers: 22 for the first to join, 21 for the others, once a and b shed theirs
    assert leases.lease("ep", "a", 64, held=32, seq=1, ceiling=32)["grant"] == 22
    assert leases.lease("ep", "b", 64, held=32, seq=2, ceiling=32)["grant"] == 21
    leases.lease("ep", "a", 64, held=22, seq=1, grant=False)
    leases.lease("ep", "b", 64, held=21, seq=2, grant=False)
    assert leases.lease("ep", "c", 64, ceiling=0)["grant"] == 21
    leases.lease("ep", "a", 64, active=False)
    assert leases.lease("ep", "c", 64, held=21, seq=1, ceiling=21)["grant"] == 32
    assert leases.held("ep") == {"b": 21, "c": 32}


def test_a_worker_that_stops_beating_drops_out():
    now = [0.0]
    leases = ConcurrencyLeases(clock=lambda: now[0])
    assert leases.lease("ep", "dead", 8, ttl_s=5.0)["grant"] == 8
    assert leases.lease("ep", "live", 8, ttl_s=30.0)["grant"] == 0  # dead still holds its slots until its ttl ends
    now[0] = 5.5
    assert leases.lease("ep", "live", 8, ttl_s=30.0)["grant"] == 8
    assert leases.held("ep") == {"live": 8}


def test_no_row_is_sent_before_the_first_grant(broker):
    async def scenario() -> None:
        a_lim, _, a, _ = _two_workers(broker, interval_s=60.0)
        assert a_lim.try_acquire() is None  # built holding nothing: lease before send
        a.enter()
        await _until(lambda: a.ceiling == 64)
        assert a_lim.try_acquire() is not None
        await a_lim.release("ok")
        await a.exit()
        await _until(lambda: broker.leases.held("ep") == {})
        assert a_lim.try_acquire() is None  # it left: it leases again when it comes back

    asyncio.run(scenario())


def test_the_ceiling_follows_the_workers_sending_now(broker):
    async def scenario() -> None:
        a_lim, b_lim, a, b = _two_workers(broker, interval_s=60.0)  # beats 60 s apart: only the long poll is in time
        a.enter()
        await _until(lambda: a.ceiling == 64)
        b.enter()
        await _until(lambda: a.ceiling == 32 and b.ceiling == 32)  # a heard b come and shed half
        assert a_lim.maximum == b_lim.maximum == 32
        await b.exit()
        await _until(lambda: a.ceiling == 64)  # a heard b leave, and takes b's room at once
        await a.exit()
        await _until(lambda: broker.leases.held("ep") == {})

    asyncio.run(scenario())


def test_a_cut_waits_for_the_requests_in_flight(broker):
    async def scenario() -> None:
        a_lim, b_lim = AdaptiveConcurrencyLimiter(64, maximum=64), AdaptiveConcurrencyLimiter(32, maximum=32)
        a = ConcurrencyShare("ep", broker.address, 64, [a_lim], interval_s=60.0, worker="a")
        b = ConcurrencyShare("ep", broker.address, 64, [b_lim], interval_s=60.0, worker="b")
        a.enter()
        await _until(lambda: a.ceiling == 64)
        held = [await a_lim.acquire() for _ in range(40)]  # 40 in flight on a
        b.enter()
        await _until(lambda: a.ceiling == 32)
        await asyncio.sleep(0.05)
        assert b.ceiling == 24 and b_lim.try_acquire() is not None  # only what a does not use
        for started in held[:8]:
            await a_lim.release("ok", started)
        await _until(lambda: b.ceiling == 32)  # a reported its fall: b gets the rest
        await a.exit()
        await b.exit()

    asyncio.run(scenario())


def test_without_a_broker_the_static_share_stays():
    async def scenario() -> None:
        lim = AdaptiveConcurrencyLimiter(8, maximum=16)
        share = ConcurrencyShare("ep", ("127.0.0.1", 9), 64, [lim], interval_s=0.01)  # port 9: nothing listens
        share.enter()
        await _until(lambda: share.failed)
        assert lim.try_acquire() is not None  # rows go on at the static share
        await share.exit()
        assert lim.maximum == 16

    asyncio.run(scenario())


def test_peak_in_flight_over_workers_never_above_the_total(broker):
    """Three workers come and go at random while their rows run: the sum in flight stays <= total."""
    total = 24

    async def scenario() -> None:
        rng = random.Random(7)
        limiters = [AdaptiveConcurrencyLimiter(8, maximum=8) for _ in range(3)]
        shares = [ConcurrencyShare("ep", broker.address, total, [lim], interval_s=0.05, grace_s=0.0, worker=f"w{i}")
                  for i, lim in enumerate(limiters)]
        peak = 0
        grown: list[int] = []

        async def row(lim: AdaptiveConcurrencyLimiter) -> None:
            nonlocal peak
            started = await lim.acquire()
            peak = max(peak, sum(x.in_flight for x in limiters))
            grown.append(max(share.ceiling for share in shares))
            await asyncio.sleep(rng.uniform(0.001, 0.02))
            await lim.release("ok", started)

        async def worker(i: int) -> None:
            for _ in range(6):
                shares[i].enter()
                try:
                    await asyncio.gather(*(row(limiters[i]) for _ in range(rng.randint(20, 80))))
                finally:
                    await shares[i].exit()
                await asyncio.sleep(rng.uniform(0, 0.03))

        await asyncio.gather(*(worker(i) for i in range(3)))
        for share in shares:
            await share.aclose()
        assert peak <= total  # never past the total
        assert max(grown) > 8  # while workers did take more than their static share

    asyncio.run(scenario())


@pytest.mark.parametrize("cls", [AdaptiveConcurrencyLimiter, GradientConcurrencyLimiter])
def test_a_higher_ceiling_lets_waiting_rows_in_at_once(cls):
    async def scenario() -> None:
        lim = cls(4, maximum=4)
        for _ in range(4):
            await lim.acquire()
        waiters = [asyncio.ensure_future(lim.acquire()) for _ in range(4)]
        await asyncio.sleep(0)
        assert not any(w.done() for w in waiters)
        lim.set_maximum(8)
        if cls is AdaptiveConcurrencyLimiter:  # it slow-starts into the new room: one more per success
            for _ in range(4):
                await lim.release("ok", None)
        await asyncio.sleep(0)
        assert all(w.done() for w in waiters) and lim.in_flight == 8 - (4 if cls is AdaptiveConcurrencyLimiter else 0)
        lim.set_maximum(2)
        assert lim.limit == 2 and lim.maximum == 2

    asyncio.run(scenario())


def test_a_worker_back_within_the_grace_never_left(broker):
    async def scenario() -> None:
        a_lim, b_lim, a, b = _two_workers(broker, interval_s=60.0)
        a.enter()
        b.enter()
        await _until(lambda: a.ceiling == 32 and b.ceiling == 32)
        await b.exit()
        b.enter()  # the same Spark task's next Arrow batch
        await asyncio.sleep(3 * b.grace_s)
        assert a.ceiling == 32 and set(broker.leases.held("ep")) == {"a", "b"}  # a never took b's room
        await a.exit()
        await b.exit()
        await _until(lambda: broker.leases.held("ep") == {})

    asyncio.run(scenario())


def test_one_workers_overload_ends_the_others_slow_start(broker):
    async def scenario() -> None:
        a_lim, b_lim, a, b = _two_workers(broker, interval_s=60.0)
        a.enter()
        b.enter()
        await _until(lambda: a.ceiling == 32 and b.ceiling == 32)
        b_lim.on_outcome("overload")  # b was refused
        await _until(lambda: a.overloads_seen == 1)  # a heard it through the broker, not a beat later
        before = a_lim.limit
        for _ in range(8):
            await a_lim.release("ok", await a_lim.acquire())
        assert a_lim.limit < before + 8  # no longer one more per success: a's slow start ended with b's refusal
        assert a_lim.decreases == 0
        await a.exit()
        await b.exit()

    asyncio.run(scenario())
