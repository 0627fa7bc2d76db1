"""The window scheduler: rows start in dispatch order, a window at a time that follows the
limiters; results come back by position; a systemic failure cancels the rest. No Spark, no
network, no sleeps: rows are futures the test resolves, the limiter runs on an injected clock."""

from __future__ import annotations

import asyncio

import pytest

from ai_query import AdaptiveConcurrencyLimiter, SystemicEndpointError
from ai_query.batch import WindowScheduler, window_size

from .fakes import FakeClock


class Rows:
    """Rows that finish when the test says so; records the order they started in."""

    def __init__(self, count: int) -> None:
        self.started: list[int] = []
        self.cancelled: list[int] = []
        self.gates: dict[int, asyncio.Future[str]] = {}
        self.count = count

    async def run(self, i: int) -> str:
        self.started.append(i)
        gate = self.gates[i] = asyncio.get_running_loop().create_future()
        try:
            return await gate
        except asyncio.CancelledError:
            self.cancelled.append(i)
            raise

    def finish(self, i: int, value: str | None = None, error: BaseException | None = None) -> None:
        if error is not None:
            self.gates[i].set_exception(error)
        else:
            self.gates[i].set_result(value if value is not None else f"row {i}")

    def running(self) -> list[int]:
        return [i for i, gate in self.gates.items() if not gate.done()]


async def settle() -> None:
    """Let every ready callback and task run (a yield to the loop, not a wait for time)."""
    for _ in range(5):
        await asyncio.sleep(0)


def test_the_window_is_twice_the_limiters_slots_plus_16():
    limiters = [AdaptiveConcurrencyLimiter(3, clock=FakeClock()), AdaptiveConcurrencyLimiter(2, clock=FakeClock())]
    assert window_size(limiters) == 2 * (3 + 2) + 16


def test_rows_start_in_dispatch_order_a_window_at_a_time_and_return_by_position():
    async def main() -> None:
        rows = Rows(30)
        limiter = AdaptiveConcurrencyLimiter(1, maximum=1, clock=FakeClock())  # window 2 * 1 + 16 = 18
        order = list(reversed(range(30)))
        scheduler = WindowScheduler(rows.run, 30, [limiter], order)
        run = asyncio.ensure_future(scheduler.run())
        await settle()
        assert rows.started == order[:18]  # the window, in dispatch order
        rows.finish(29)
        rows.finish(28)
        await settle()
        assert rows.started == order[:20]  # each finished row lets the next one start
        while rows.running():
            for i in rows.running():
                rows.finish(i)
            await settle()
        assert await run == [f"row {i}" for i in range(30)]  # by position, not by start order
        assert rows.started == order and scheduler.max_running == 18

    asyncio.run(main())


def test_the_window_follows_the_limiter_as_it_grows():
    async def main() -> None:
        clock = FakeClock()
        limiter = AdaptiveConcurrencyLimiter(1, maximum=64, clock=clock)
        rows = Rows(100)
        run = asyncio.ensure_future(WindowScheduler(rows.run, 100, [limiter]).run())
        await settle()
        assert len(rows.started) == 18
        for _ in range(4):  # answers arrive fast: slow start grows the limit
            clock.now += 0.1
            limiter.on_outcome("ok", clock.now - 0.05)
        assert limiter.limit > 1
        rows.finish(0)
        await settle()
        assert len(rows.running()) == window_size([limiter]) > 18
        while rows.running():
            for i in rows.running():
                rows.finish(i)
            await settle()
        assert len(await run) == 100

    asyncio.run(main())


def test_a_systemic_failure_stops_starting_rows_cancels_the_rest_and_is_raised():
    async def main() -> None:
        rows = Rows(40)
        scheduler = WindowScheduler(rows.run, 40, [AdaptiveConcurrencyLimiter(1, maximum=1, clock=FakeClock())])
        run = asyncio.ensure_future(scheduler.run())
        await settle()
        rows.finish(0)
        rows.finish(1, error=SystemicEndpointError("HTTP 401 from 'fake': bad key"))
        with pytest.raises(SystemicEndpointError, match="bad key"):
            await run
        assert len(rows.started) == 19  # row 0's slot went to row 18; row 1's failure started nothing
        assert sorted(rows.cancelled) == list(range(2, 19))

    asyncio.run(main())


def test_no_rows_no_work():
    async def main() -> list[str]:
        return await WindowScheduler(Rows(0).run, 0, []).run()

    assert asyncio.run(main()) == []
