"""The cron parser and the schedule loop (injected clock, sleep and runner: no waiting)."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from batch_runner._cron import Cron, CronError
from batch_runner._schedule import run_schedule


@pytest.mark.parametrize(
    "expr, after, expected",
    [
        ("0 2 * * *", datetime(2026, 11, 20, 2, 0), datetime(2026, 11, 21, 2, 0)),
        ("0 2 * * *", datetime(2026, 11, 20, 1, 59, 30), datetime(2026, 11, 20, 2, 0)),
        ("*/15 * * * *", datetime(2026, 11, 20, 2, 7), datetime(2026, 11, 20, 2, 15)),
        ("5-10/2 * * * *", datetime(2026, 11, 20, 2, 7), datetime(2026, 11, 20, 2, 9)),
        ("1,30,59 * * * *", datetime(2026, 11, 20, 2, 30), datetime(2026, 11, 20, 2, 59)),
        ("0 9 * * mon-fri", datetime(2026, 11, 20, 10, 0), datetime(2026, 11, 23, 9, 0)),  # Fri -> Mon
        ("0 0 * * 7", datetime(2026, 11, 20, 0, 0), datetime(2026, 11, 22, 0, 0)),  # 7 is Sunday
        ("0 0 1 jan *", datetime(2026, 11, 20), datetime(2027, 1, 1)),
        ("0 0 29 2 *", datetime(2026, 3, 1), datetime(2028, 2, 29)),  # the next leap day
        ("0 12 13 * fri", datetime(2026, 11, 14), datetime(2026, 11, 20, 12, 0)),  # dom OR dow when both are set
        ("@daily", datetime(2026, 12, 31, 23, 59), datetime(2027, 1, 1)),
        ("@hourly", datetime(2026, 11, 20, 2, 0), datetime(2026, 11, 20, 3, 0)),
        ("30 4 */10 * *", datetime(2026, 11, 20, 5, 0), datetime(2026, 11, 21, 4, 30)),  # days 1, 11, 21, 31
    ],
)
def test_next_after(expr, after, expected):
    assert Cron.parse(expr).next_after(after) == expected


def test_matches_and_every_minute():
    cron = Cron.parse("* * * * *")
    t = datetime(2026, 11, 20, 2, 7, 42)
    assert cron.next_after(t) == datetime(2026, 11, 20, 2, 8)
    assert Cron.parse("0-4 3 * * *").matches(datetime(2026, 11, 20, 3, 4))
    assert not Cron.parse("0-4 3 * * *").matches(datetime(2026, 11, 20, 3, 5))


@pytest.mark.parametrize(
    "expr, message",
    [
        ("0 2 * *", "has 4 field(s); it needs five"),
        ("60 * * * *", "minute 60 is out of range; allowed 0-59"),
        ("* 24 * * *", "hour 24 is out of range"),
        ("*/0 * * * *", "step '0' must be a whole number >= 1"),
        ("5-1 * * * *", "runs backwards"),
        ("* * * foo *", "month 'foo' is not a number or a name"),
        ("1,,2 * * * *", "empty list item"),
        ("@sometimes", "unknown cron macro"),
        ("0 0 31 2 *", "never fires"),
    ],
)
def test_bad_expressions_name_the_field(expr, message):
    with pytest.raises(CronError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        cron = Cron.parse(expr)
        cron.next_after(datetime(2026, 1, 1))


class FakeClock:
    def __init__(self, start: datetime) -> None:
        self.now = start
        self.slept: list[float] = []

    def __call__(self) -> datetime:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += timedelta(seconds=seconds)


def test_schedule_runs_at_each_firing_and_skips_overlaps():
    clock = FakeClock(datetime(2026, 11, 20, 1, 50))
    started: list[datetime] = []

    def runner(command):
        started.append(clock.now)
        clock.now += timedelta(minutes=20 if len(started) == 1 else 1)  # the first run outlasts the next firing
        return 3 if len(started) == 3 else 0

    code = run_schedule("*/15 * * * *", ["ai-query", "run", "job.toml"], max_runs=3, clock=clock, sleep=clock.sleep,
                        runner=runner, log=lambda line: None)
    assert started == [datetime(2026, 11, 20, 2, 0), datetime(2026, 11, 20, 2, 30), datetime(2026, 11, 20, 2, 45)]
    assert code == 3 and all(s <= 60 for s in clock.slept)


def test_schedule_now_runs_first():
    clock = FakeClock(datetime(2026, 11, 20, 1, 50, 30))
    started = []
    run_schedule("@daily", ["x"], max_runs=2, run_now=True, clock=clock, sleep=clock.sleep,
                 runner=lambda c: started.append(clock.now) or 0, log=lambda line: None)
    assert started == [datetime(2026, 11, 20, 1, 50, 30), datetime(2026, 11, 21, 0, 0)]
