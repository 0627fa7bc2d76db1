"""The one slot queue under both concurrency policies: FIFO order and cancellation at either point."""

import asyncio

import pytest

from ai_query.limits import AdaptiveConcurrencyLimiter, GradientConcurrencyLimiter, SlotQueue

from .fakes import FakeClock


class Limit:
    """A limit the test can change between hand-overs, as a policy does."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __call__(self) -> int:
        return self.value


def test_waiters_get_slots_in_arrival_order_and_a_newcomer_never_overtakes():
    slots = SlotQueue(Limit(2))
    order: list[int] = []

    async def one(i: int) -> None:
        await slots.take()
        order.append(i)
        await asyncio.sleep(0)
        slots.give_back()

    async def main() -> None:
        assert slots.try_take() and slots.try_take()
        tasks = [asyncio.ensure_future(one(i)) for i in range(100)]
        await asyncio.sleep(0)
        assert slots.waiting == 100
        slots.give_back()  # one slot free, but 100 callers wait: a newcomer does not take it
        assert not slots.try_take()
        slots.give_back()
        await asyncio.gather(*tasks)

    asyncio.run(main())
    assert order == list(range(100))
    assert slots.in_flight == 0 and slots.waiting == 0


def test_a_waiter_cancelled_while_waiting_leaks_no_slot_and_does_not_block_the_fast_path():
    slots = SlotQueue(Limit(1))

    async def main() -> None:
        assert slots.try_take()
        waiter = asyncio.ensure_future(slots.take())
        await asyncio.sleep(0)
        assert slots.waiting == 1
        waiter.cancel()
        await asyncio.sleep(0)
        assert waiter.cancelled() and slots.waiting == 0 and slots.in_flight == 1
        slots.give_back()
        assert slots.in_flight == 0  # nothing was handed to the cancelled waiter
        assert slots.try_take()  # and it does not make a newcomer wait behind it

    asyncio.run(main())


def test_a_waiter_cancelled_after_its_slot_was_handed_over_passes_it_to_the_next():
    slots = SlotQueue(Limit(1))

    async def main() -> None:
        assert slots.try_take()
        first = asyncio.ensure_future(slots.take())
        second = asyncio.ensure_future(slots.take())
        await asyncio.sleep(0)
        slots.give_back()  # the slot goes to `first`...
        assert slots.in_flight == 1 and slots.waiting == 1
        first.cancel()  # ...which is cancelled before it runs
        await asyncio.wait_for(second, 1.0)
        assert first.cancelled() and slots.in_flight == 1 and slots.waiting == 0
        slots.give_back()

    asyncio.run(main())
    assert slots.in_flight == 0


def test_a_raised_limit_hands_over_as_many_slots_as_it_frees():
    limit = Limit(1)
    slots = SlotQueue(limit)

    async def main() -> None:
        assert slots.try_take()
        tasks = [asyncio.ensure_future(slots.take()) for _ in range(5)]
        await asyncio.sleep(0)
        limit.value = 4
        slots.hand_over()
        assert slots.in_flight == 4 and slots.waiting == 2
        await asyncio.sleep(0)
        assert [t.done() for t in tasks] == [True, True, True, False, False]
        for t in tasks[3:]:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    assert slots.in_flight == 4 and slots.waiting == 0


def test_mass_cancellation_compacts_the_queue_and_the_survivors_keep_their_order():
    slots = SlotQueue(Limit(1))
    order: list[int] = []

    async def one(i: int) -> None:
        await slots.take()
        order.append(i)
        slots.give_back()

    async def main() -> None:
        assert slots.try_take()
        tasks = [asyncio.ensure_future(one(i)) for i in range(1000)]
        await asyncio.sleep(0)
        for i, t in enumerate(tasks):
            if i % 10:
                t.cancel()
        await asyncio.gather(*tasks[1:10], return_exceptions=True)
        await asyncio.sleep(0)
        assert slots.waiting == 100 and len(slots._waiters) <= 2 * 100 + 64 + 1
        slots.give_back()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    assert order == list(range(0, 1000, 10))
    assert slots.in_flight == 0 and slots.waiting == 0


@pytest.mark.parametrize("policy", [AdaptiveConcurrencyLimiter, GradientConcurrencyLimiter])
def test_both_policies_keep_fifo_and_cancel_safety_over_the_one_queue(policy):
    limiter = policy(2, maximum=2, clock=FakeClock())
    admitted: list[int] = []

    async def one(i: int) -> None:
        started = await limiter.acquire()
        admitted.append(i)
        await asyncio.sleep(0)
        await limiter.release("error", started)

    async def main() -> None:
        held = [limiter.try_acquire(), limiter.try_acquire()]
        tasks = [asyncio.ensure_future(one(i)) for i in range(200)]
        await asyncio.sleep(0)
        assert limiter.try_acquire() is None
        tasks[0].cancel()  # cancelled while waiting
        await asyncio.sleep(0)
        await limiter.release("error", held[0])  # the slot goes to task 1...
        tasks[1].cancel()  # ...cancelled before it runs: task 2 gets it
        await limiter.release("error", held[1])
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    assert admitted == list(range(2, 200))
    assert limiter.in_flight == 0 and limiter.try_acquire() is not None
