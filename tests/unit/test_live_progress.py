"""The live progress watcher (spark_udfs/_live_progress.py) fed by real datagrams: a real
``ProgressReporter`` sends to the watcher's real ``ProgressCollector`` over UDP, tqdm draws into
a string. The clock is the test's, so a pause is a step of the clock, not a sleep.

Mutations caught: ``show`` putting an action's total instead of the counts since its bar opened
(``- base.rows_failed`` or ``- base.rows`` removed): the reopened bar says failed=3 / 6row; a new
action not closing the bars of the others (``starting or`` removed): bar "a" is still open
when "b" starts, the first closed bar is "b"'s; the collector keeping one total for every action
(``per_action`` never filled): no bar at all.
"""

from __future__ import annotations

import io
import time

from ai_query import ProgressReporter
from spark_udfs import LiveProgress


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def closed(stream: io.StringIO) -> list[str]:
    return [line.split("\r")[-1] for line in stream.getvalue().split("\n")[:-1] if "ai_query:" in line]


def wait_for(condition, what: str) -> None:
    for _ in range(400):
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


def test_one_bar_per_action_and_a_reopened_bar_counts_from_where_the_last_one_stopped():
    clock, stream = Clock(), io.StringIO()
    live = LiveProgress(stream=stream, idle_s=10, poll_s=0.01, clock=clock)
    reporter = ProgressReporter(live.address)
    try:
        def send(action: str, ok: int, failed: int, tokens_each: int) -> None:
            for i in range(ok + failed):
                reporter.add(i < ok, tokens_each if i < ok else 0, "ep", 8, action=action)
            reporter.flush()

        send("a", 4, 2, 5)  # action a: 6 rows, 2 failed, 20 tokens
        wait_for(lambda: live.bars == 1 and "tokens=20" in stream.getvalue(), "a's bar")
        clock.now += 11  # a pause longer than idle_s: a's bar closes
        wait_for(lambda: len(closed(stream)) == 1, "a's bar closed")
        send("a", 2, 1, 7)  # a again (two actions at once from two threads): a new bar from there
        wait_for(lambda: live.bars == 2 and "tokens=14" in stream.getvalue(), "a's second bar")
        send("b", 1, 0, 3)  # b starts: a's second bar closes at once, b's opens
        wait_for(lambda: live.bars == 3 and len(closed(stream)) == 2, "b's bar, a's second closed")
    finally:
        reporter.close()
        live.close()
    bars = closed(stream)
    assert len(bars) == 3, bars
    assert bars[0].startswith("ai_query: 6row ") and "failed=2," in bars[0] and "tokens=20" in bars[0], bars
    assert bars[1].startswith("ai_query: 3row ") and "failed=1," in bars[1] and "tokens=14" in bars[1], bars
    assert bars[2].startswith("ai_query: 1row ") and "failed=0," in bars[2] and "tokens=3" in bars[2], bars
    assert all("concurrency=ep=8" in bar for bar in bars), bars
    counts = live.collector.by_action()
    assert (counts["a"].rows, counts["a"].rows_failed, counts["a"].tokens) == (9, 3, 34)
    assert live.collector.snapshot().rows == 10
