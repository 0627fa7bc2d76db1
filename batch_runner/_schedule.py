"""``ai-query schedule``: run a command at every firing of a cron expression, in the foreground."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime
from typing import Callable, Sequence

from ._cron import Cron


def run_schedule(
    cron: str | Cron,
    command: Sequence[str],
    *,
    max_runs: int | None = None,
    run_now: bool = False,
    clock: Callable[[], datetime] = datetime.now,
    sleep: Callable[[float], None] = time.sleep,
    runner: Callable[[Sequence[str]], int] = subprocess.call,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> int:
    """Run ``command`` at each firing of ``cron``; return the last run's exit code.

    Runs never overlap: a run that outlasts the next firing makes that firing be skipped (the
    next one after the run ends is taken). ``clock``, ``sleep`` and ``runner`` are injectable
    so that tests drive the loop without waiting.
    """
    schedule = cron if isinstance(cron, Cron) else Cron.parse(cron)
    runs = 0
    code = 0
    due = clock() if run_now else schedule.next_after(clock())
    while max_runs is None or runs < max_runs:
        now = clock()
        if due > now:
            log(f"ai-query schedule: next run at {due:%Y-%m-%d %H:%M} ({schedule})")
            while (now := clock()) < due:
                sleep(min(60.0, (due - now).total_seconds()))
        log(f"ai-query schedule: run {runs + 1} at {now:%Y-%m-%d %H:%M:%S}: {' '.join(command)}")
        code = runner(command)
        runs += 1
        log(f"ai-query schedule: run {runs} exited with code {code}")
        due = schedule.next_after(max(clock(), due))
    return code


__all__ = ["run_schedule"]
