"""Live progress of interactive queries: ``spark_udfs.sql(spark, q, progress=True)``.

``spark.sql`` returns a lazy DataFrame: the rows are sent when an action (``show``, ``collect``,
a write) runs, later, maybe several times. So progress belongs to the session, not to one call:
the first ``progress=True`` starts one ``ai_query.ProgressCollector`` for the session (the UDFs
rewritten from then on send their counters to it) and a watcher thread. The tasks' counts name
the action they belong to (the root SQL execution: ``BatchContext.action``), and the watcher keeps
one bar per action: it opens when the action's first rows arrive, keeps up to date (rows done,
failed, tokens, rows/s, the endpoints' concurrency) and closes when the next action's rows start
arriving or once none has arrived for ``idle_s``. Cutting bars at pauses alone merged
``df.collect(); df.collect()`` into one bar with twice the query's rows and tokens: the second
action starts long before any pause a display could wait for. An action whose rows arrive again
after its bar closed (two actions running at once from two threads) gets a new bar counting from
there. ``tqdm.auto`` draws a widget in Jupyter and a text bar elsewhere.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import IO, Any, Callable

from ai_query import ProgressCollector, ProgressCounts


class LiveProgress:
    """A session's progress bars (see the module docstring); ``close()`` stops the watcher.

    In a Jupyter kernel the bars of a cell also close when the cell ends (IPython's
    ``post_run_cell``), drawn with every count the cell's actions sent: a bar closed by the
    watcher ``idle_s`` later would land its last line in whichever cell runs then."""

    def __init__(self, host: str = "127.0.0.1", *, stream: IO[str] | None = None, idle_s: float = 2.0, poll_s: float = 0.25,
                 clock: Callable[[], float] = time.monotonic, bar_factory: Callable[..., Any] | None = None) -> None:
        self.collector = ProgressCollector(host)
        self.address = self.collector.address
        self.stream = stream
        self.idle_s = idle_s
        self.poll_s = poll_s
        self._clock = clock
        self._bar_factory = bar_factory
        self.bars = 0
        """Bars opened so far (one per action, see the module docstring)."""
        self._lock = threading.Lock()
        self._open: dict[str | None, tuple[Any, ProgressCounts]] = {}  # action -> (bar, its counts when the bar opened)
        self._seen: dict[str | None, ProgressCounts] = {}
        self._last_change: dict[str | None, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="ai-query-live-progress", daemon=True)
        self._thread.start()
        self._events = _ipython_events() if in_notebook() else None
        if self._events is not None:
            self._events.register("post_run_cell", self._cell_done)

    def _new_bar(self) -> Any:
        if self._bar_factory is not None:
            return self._bar_factory()
        try:  # a widget in Jupyter needs ipywidgets; without it tqdm.auto would warn, then draw text anyway
            import ipywidgets  # noqa: F401
            from tqdm.auto import tqdm
        except ImportError:
            from tqdm import tqdm

        return tqdm(desc="ai_query", unit="row", file=self.stream or sys.stderr, dynamic_ncols=True)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            with self._lock:
                self._poll(self._clock())

    def _poll(self, now: float) -> None:
        bars, seen = self._open, self._seen
        changed: dict[str | None, ProgressCounts] = {}  # action -> its counts before this poll
        for action, snap in self.collector.by_action().items():
            before = seen.get(action, ProgressCounts())
            if (snap.rows, snap.tokens) != (before.rows, before.tokens):
                changed[action] = before
                seen[action], self._last_change[action] = snap, now
        starting = any(action not in bars for action in changed)
        for action in list(bars):  # an earlier action is done once a new one sends rows, or after a pause
            if action not in changed and (starting or now - self._last_change[action] >= self.idle_s):
                bars.pop(action)[0].close()
        for action, before in changed.items():
            if action not in bars:  # counting from its counts so far (none, unless its bar closed before)
                bars[action] = (self._new_bar(), before)
                self.bars += 1
            bar, base = bars[action]
            show(bar, seen[action], base)

    def close_bars(self) -> None:
        """Close the open bars now, with every count that reached the driver so far."""
        self.collector.sync()
        with self._lock:
            self._poll(self._clock())
            for bar, _ in self._open.values():
                bar.close()
            self._open.clear()

    def _cell_done(self, *_: Any) -> None:
        self.close_bars()

    def close(self) -> None:
        if self._events is not None:
            self._events.unregister("post_run_cell", self._cell_done)
            self._events = None
        self._stop.set()
        self._thread.join(timeout=5)
        self.close_bars()
        self.collector.close()


def show(bar: Any, snap: ProgressCounts, base: ProgressCounts) -> None:
    """Put the counts since ``base`` on ``bar`` (tqdm computes rows/s from ``n``)."""
    bar.n = snap.rows - base.rows
    conc = ",".join(f"{name}={n}" for name, n in sorted(snap.concurrency.items()))
    bar.set_postfix(failed=snap.rows_failed - base.rows_failed, tokens=snap.tokens - base.tokens, concurrency=conc or "-",
                    refresh=False)
    bar.refresh()


def _ipython_events() -> Any:
    shell = sys.modules["IPython"].get_ipython()  # type: ignore[attr-defined]
    return shell.events


def in_notebook() -> bool:
    """True in a Jupyter kernel (progress is on by default there)."""
    shell = sys.modules.get("IPython")
    try:
        return shell is not None and type(shell.get_ipython()).__name__ == "ZMQInteractiveShell"  # type: ignore[attr-defined]
    except Exception:  # an IPython without get_ipython: not a notebook
        return False
