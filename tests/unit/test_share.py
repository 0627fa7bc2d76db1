"""Concurrency shared by the workers sending now: a real broker on 127.0.0.1, real limiters."""

from __future__ import annotations

import asyncio

import pytest

from ai_query import EndpointRegistry
from ai_query.limits.aimd import AdaptiveConcurrencyLimiter
from ai_query.limits.gradient import GradientConcurrencyLimiter
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
        await asyncio.sleep(0.01)


def _two_workers(broker, interval_s: float):
    """Two workers' limiters (each at its static half of 64) and their shares of endpoint "ep"."""
    a_lim, b_lim = AdaptiveConcurrencyLimiter(32, maximum=32), AdaptiveConcurrencyLimiter(32, maximum=32)
    a = ConcurrencyShare("ep", broker.address, 64, [a_lim], interval_s=interval_s, worker="a")
    b = ConcurrencyShare("ep", broker.address, 64, [b_lim], interval_s=interval_s, worker="b")
    return a_lim, b_lim, a, b


def test_the_ceiling_follows_the_workers_sending_now(broker):
    async def scenario() -> None:
        a_lim, b_lim, a, b = _two_workers(broker, interval_s=0.02)
        a.enter()
        b.enter()
        await _until(lambda: a.workers_seen == 2 and b.workers_seen == 2)
        await asyncio.sleep(0.1)
        assert a_lim.maximum == b_lim.maximum == 32  # two senders: half each, never the whole endpoint
        await b.exit()  # b ran out of rows
        await _until(lambda: a_lim.maximum == 64)
        assert a_lim.limit == 32  # AIMD slow-starts into the room b left, up to twice its limit
        for _ in range(32):
            await a_lim.release("ok", await a_lim.acquire())
        assert a_lim.limit == 64
        b.enter()  # b is back: a gives back half at its next beat
        await _until(lambda: a_lim.maximum == 32)
        await a.exit()
        await b.exit()
        await _until(lambda: broker.workers["ep"] == {})

    asyncio.run(scenario())


def test_a_worker_that_stops_beating_drops_out(broker):
    assert broker.handle("/active", {"endpoint": "ep", "worker": "dead", "active": True, "ttl_s": 0.0}) == {"workers": 1}
    assert broker.handle("/active", {"endpoint": "ep", "worker": "live", "active": True, "ttl_s": 30.0}) == {"workers": 1}
    assert set(broker.workers["ep"]) == {"live"}


def test_without_a_broker_the_static_share_stays():
    async def scenario() -> None:
        lim = AdaptiveConcurrencyLimiter(8, maximum=16)
        share = ConcurrencyShare("ep", ("127.0.0.1", 9), 64, [lim], interval_s=0.01)  # port 9: nothing listens
        share.enter()
        await _until(lambda: share.failed)
        await share.exit()
        assert lim.maximum == 16

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


def test_a_departure_is_heard_at_once_not_a_beat_later(broker):
    async def scenario() -> None:
        a_lim, b_lim, a, b = _two_workers(broker, interval_s=60.0)  # beats 60 s apart: only the long poll is in time
        a.enter()
        await _until(lambda: a.workers_seen == 1)
        b.enter()
        await _until(lambda: a.workers_seen == 2 and b.workers_seen == 2)  # a heard b come
        assert a_lim.maximum == 32
        await b.exit()
        await _until(lambda: a_lim.maximum == 64)  # a heard b leave, and takes b's room at once
        await a.exit()
        await _until(lambda: broker.workers["ep"] == {})

    asyncio.run(scenario())


def test_a_worker_back_within_the_grace_never_left(broker):
    async def scenario() -> None:
        a_lim, b_lim, a, b = _two_workers(broker, interval_s=60.0)
        a.enter()
        await _until(lambda: a.workers_seen == 1)
        b.enter()
        await _until(lambda: a.workers_seen == 2 and b.workers_seen == 2)
        await b.exit()
        b.enter()  # the same Spark task's next Arrow batch
        await asyncio.sleep(3 * b.grace_s)
        assert a_lim.maximum == 32 and set(broker.workers["ep"]) == {"a", "b"}  # a never took b's room
        await a.exit()
        await b.exit()
        await _until(lambda: broker.workers["ep"] == {})

    asyncio.run(scenario())
