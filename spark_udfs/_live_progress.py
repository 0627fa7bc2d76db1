"""Live progress of interactive queries: ``spark_udfs.sql(spark, q, progress=True)``.

``spark.sql`` returns a lazy DataFrame: the rows are sent when an action (``show``, ``collect``,
a write) runs, later, maybe several times. So progress belongs to the session, not to one call:
the first ``progress=True`` starts one ``ai_query.ProgressCollector`` for the session (the UDFs
rewritten from then on send their counters to it) and a watcher thread. The watcher opens a bar
when rows start arriving, keeps it up to date (rows done, failed, tokens, rows/s, the endpoints'
concurrency) and closes it once no row has arrived for ``idle_s``: one bar per burst of work,
which is one action in practice. ``tqdm.auto`` draws a widget in Jupyter and a text bar elsewhere.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import IO, Any, Callable

from ai_query import ProgressCollector, ProgressCounts


class LiveProgress:
    """A session's progress bars (see the module docstring); ``close()`` stops the watcher."""

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
        """Bars opened so far (one per burst of rows)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="ai-query-live-progress", daemon=True)
        self._thread.start()

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
        bar: Any = None
        base = seen = ProgressCounts()
        last_change = 0.0
        while not self._stop.wait(self.poll_s):
            now = self._clock()
            snap = self.collector.snapshot()
            if (snap.rows, snap.tokens) != (seen.rows, seen.tokens):
                if bar is None:
                    bar, base = self._new_bar(), seen
                    self.bars += 1
                seen, last_change = snap, now
                show(bar, snap, base)
            elif bar is not None and now - last_change >= self.idle_s:
                bar.close()
                bar = None
        if bar is not None:
            show(bar, self.collector.snapshot(), base)
            bar.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.collector.close()


def show(bar: Any, snap: ProgressCounts, base: ProgressCounts) -> None:
    """Put the counts since ``base`` on ``bar`` (tqdm computes rows/s from ``n``)."""
    bar.n = snap.rows - base.rows
    conc = ",".join(f"{name}={n}" for name, n in sorted(snap.concurrency.items()))
    bar.set_postfix(failed=snap.rows_failed - base.rows_failed, tokens=snap.tokens - base.tokens, concurrency=conc or "-",
                    refresh=False)
    bar.refresh()


def in_notebook() -> bool:
    """True in a Jupyter kernel (progress is on by default there)."""
    shell = sys.modules.get("IPython")
    try:
        return shell is not None and type(shell.get_ipython()).__name__ == "ZMQInteractiveShell"  # type: ignore[attr-defined]
    except Exception:  # an IPython without get_ipython: not a notebook
        return False
