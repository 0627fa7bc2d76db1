"""Latency-gradient concurrency: find a self-hosted server's knee, where it starts to queue.

A self-hosted vLLM server never answers 429: past its batch capacity it queues, and the only
signal is that requests take longer. ``GradientConcurrencyLimiter`` follows Netflix's
concurrency-limits ``Gradient2Limit``. Once per window of samples (about one round trip: the
window closes after ``max(limit, min_samples)`` successful requests, or after two round trips
with at least ``min_samples`` when fewer arrive)::

    short    = mean latency of the window
    long     = mean of the first 10 windows, then an EMA over ``long_window`` windows
    gradient = clamp(long / short, 0.5, 1.0)           # 1.0: no queueing seen
    target   = limit * gradient + queue_size(limit)    # about sqrt(limit)
    limit    = limit * (1 - smoothing) + target * smoothing

Below the knee latency is flat, ``gradient`` is 1 and the limit grows by ``sqrt(limit)`` per
window; above it latency grows with the queue and the limit settles where the two terms balance,
a little above the knee (a standing queue of about ``sqrt(limit)`` requests keeps the server full).

Gradient2's weakness is that ``long`` is an average of what it sees: under a standing queue it
slowly absorbs the queue, and the limit creeps to the maximum (``long`` also starts out wrong
when the first requests already queue). So the limiter probes, in the spirit of BBR's ProbeRTT:
after the first 10 windows, then every ``probe_interval`` windows, and whenever the limit has
halved since the last probe while latency still says "queue", the limit drops to
``limit * probe_factor`` and the latency of the whole cohort of requests admitted under it (not
its first completions alone, which are the fast ones) is compared with the window before:

- it fell about in proportion to the load: still queueing, so halve again (this costs no
  throughput while the server stays full);
- it did not fall (< 10%): nothing queued, the model itself is slower or faster than ``long``
  says; ``long`` becomes the probe's latency;
- it fell, but less: the knee is between the two limits; ``long`` moves to the probe's latency
  (halfway after a single step, as noise matters more than drift there).

Then the limit before the probe comes back. A probe costs about one window at half the limit,
about 0.5% of the throughput at the default interval.

``overload`` outcomes (429, 503, timeouts) multiply the limit by ``backoff`` at most once per
round trip, as in ``AdaptiveConcurrencyLimiter``; ``error`` outcomes neither grow nor shrink
the limit and their latency is not sampled. While the client keeps fewer than half of ``limit``
requests in flight (the end of a batch, a trickle of online requests), the limit does not grow.

The interface is the one of ``AdaptiveConcurrencyLimiter``, so the client can use either; the
clock is injected so tests need no real time.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import Callable

from .slots import Outcome, SlotQueue

WARMUP_WINDOWS = 10
"""The long-term latency is the plain mean of the first windows before it becomes a slow EMA."""


def default_queue_size(limit: float) -> float:
    """Headroom added each window: ``sqrt(limit)``, but at most a quarter of it for small limits.

    Plain ``sqrt`` keeps at least 4 requests in flight (the gradient's 0.5 floor balances it
    at ``limit = 2 * sqrt(limit)``), a 4x queue in front of a server that takes one at a time.
    """
    return min(math.sqrt(limit), limit / 4.0)


class GradientConcurrencyLimiter:
    """Latency-gradient limit on requests in flight, between ``minimum`` and ``maximum``.

    Worked example (``tests/unit/test_gradient.py``): a server whose latency stays 200 ms up to
    48 requests in flight and grows linearly with the queue beyond; started at 8, the limit
    passes 48 after about 60 round trips and then stays at 55-59 (1.19x on average) apart from
    one probe window at half of it every 100; the server stays 99% busy. Without probes the
    same limiter creeps to 100 in 3,000 round trips (to the maximum with ``long_window=100``).
    """

    def __init__(
        self,
        initial: int = 8,
        *,
        minimum: int = 1,
        maximum: int = 256,
        smoothing: float = 0.2,
        long_window: int = 600,
        queue_size: Callable[[float], float] = default_queue_size,
        backoff: float = 0.7,
        probe_interval: int | None = 100,
        probe_factor: float = 0.5,
        min_samples: int = 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 1 <= minimum <= initial <= maximum:
            raise ValueError(f"need 1 <= minimum ({minimum}) <= initial ({initial}) <= maximum ({maximum})")
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        if long_window < 2:
            raise ValueError(f"long_window must be >= 2 windows, got {long_window}")
        if not 0.0 < backoff < 1.0:
            raise ValueError(f"backoff must be in (0, 1), got {backoff}")
        if probe_interval is not None and probe_interval < 1:
            raise ValueError(f"probe_interval must be >= 1 window (or None: never probe), got {probe_interval}")
        if not 0.0 < probe_factor < 1.0:
            raise ValueError(f"probe_factor must be in (0, 1), got {probe_factor}")
        if min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, got {min_samples}")
        self.minimum = minimum
        self.maximum = maximum
        self.smoothing = smoothing
        self.long_window = long_window
        self.queue_size = queue_size
        self.backoff = backoff
        self.probe_interval = probe_interval
        self.probe_factor = probe_factor
        self.min_samples = min_samples
        self._clock = clock
        self._limit = float(initial)
        self._slots = SlotQueue(lambda: self.limit)
        # latency state
        self._short = 0.0  # mean latency of the last closed window
        self._long = 0.0  # slow EMA of the window means: the latency without queueing
        self._long_count = 0  # windows in ``_long``: a plain mean over the first WARMUP_WINDOWS
        self._rtt = 0.0  # smoothed latency of recent requests: spacing of decreases, window timeout
        # the open window
        self._window_start = clock()
        self._window_sum = 0.0
        self._window_count = 0
        self._window_peak_in_flight = 0
        # probing for the no-queue latency
        self._windows_since_probe = 0
        self._probe_started: float | None = None
        self._probe_saved_limit = 0.0
        self._probe_short_before = 0.0  # latency of the window before this probe step
        self._probe_steps = 0
        self._peak_limit_since_probe = float(initial)
        self._probe_cohort = 0  # requests admitted under the probe's limit that make its sample
        self._probe_admitted = 0
        self._probe_starts: Counter[float] = Counter()  # admission times of the cohort not yet back
        self._last_decrease = -math.inf
        # counters for tests, notebooks and logs
        self.updates = 0
        self.probes = 0
        self.overload_signals = 0
        self.decreases = 0

    @property
    def limit(self) -> int:
        """Requests allowed in flight now."""
        return max(self.minimum, min(self.maximum, int(self._limit)))

    @property
    def in_flight(self) -> int:
        return self._slots.in_flight

    @property
    def short_latency(self) -> float:
        """Mean latency (seconds) of the last window; 0 before the first."""
        return self._short

    @property
    def long_latency(self) -> float:
        """Long-term latency (seconds), the estimate of the latency without queueing; 0 before the first window."""
        return self._long

    @property
    def probing(self) -> bool:
        return self._probe_started is not None

    def _admitted(self) -> float:
        """Count a request that has just taken its slot into the window (and the probe's cohort)."""
        now = self._clock()
        in_flight = self._slots.in_flight
        if in_flight == 1 and self._window_count == 0:
            self._window_start = now  # after an idle spell the window starts with the first request
        self._window_peak_in_flight = max(self._window_peak_in_flight, in_flight)
        if self._probe_started is not None and self._probe_admitted < self._probe_cohort:
            self._probe_admitted += 1
            self._probe_starts[now] += 1
        return now

    async def acquire(self) -> float:
        """Wait for a slot (first come, first served); returns the clock reading at admission (pass it to ``release``)."""
        await self._slots.take()
        return self._admitted()

    def set_maximum(self, maximum: int) -> None:
        """A new ceiling: this worker's share of the endpoint changed (other workers came or went).

        The limit keeps its place relative to the ceiling (the capacity a departed worker used is
        about its share), and freed slots go to waiting rows at once.
        """
        maximum = max(self.minimum, int(maximum))
        if maximum == self.maximum:
            return
        self._limit = max(float(self.minimum), min(float(maximum), self._limit * maximum / self.maximum))
        self.maximum = maximum
        self._slots.hand_over()

    def set_lease(self, lease: int | None) -> None:
        """At most ``lease`` in flight whatever the limit: the slots leased from the driver's broker."""
        self._slots.set_lease(lease)

    def try_acquire(self) -> float | None:
        """Take a slot if one is free now and nobody waits for one; ``None`` otherwise."""
        return self._admitted() if self._slots.try_take() else None

    def on_outcome(self, outcome: Outcome, started: float | None = None) -> None:
        """Adjust the limit for one finished request (without releasing a slot)."""
        now = self._clock()
        if outcome == "overload":
            self.overload_signals += 1
            if now - self._last_decrease >= max(self._rtt, 1e-3):
                self._end_probe(restore=False)
                self._limit = max(float(self.minimum), self._limit * self.backoff)
                self._last_decrease = now
                self.decreases += 1
                self._open_window(now)
            return
        if started is None:
            return
        if outcome != "ok":
            if self._probe_started is not None and self._probe_starts[started] > 0:
                # a failed member of the probe's cohort: the probe will not wait for its latency
                self._probe_starts[started] -= 1
                self._probe_cohort -= 1
                if self._window_count and self._window_count >= self._probe_cohort:
                    self._close_window(now)
            return
        latency = max(0.0, now - started)
        self._rtt = latency if self._rtt == 0.0 else 0.8 * self._rtt + 0.2 * latency
        if self._probe_started is not None:
            # Only the cohort admitted under the probe's limit counts, and all of it: its first
            # completions alone would be the fast ones.
            if self._probe_starts[started] > 0:
                self._probe_starts[started] -= 1
                self._window_sum += latency
                self._window_count += 1
            done = self._window_count >= self._probe_cohort
            timed_out = now - self._window_start >= 10.0 * self._round_trip()
            if done or (timed_out and self._window_count >= min(self.min_samples, self._probe_cohort)):
                self._close_window(now)
            return
        self._window_sum += latency
        self._window_count += 1
        if self._window_count < self.min_samples:
            return
        if self._window_count >= self.limit or now - self._window_start >= 2.0 * self._round_trip():
            self._close_window(now)

    def _round_trip(self) -> float:
        """A round trip long enough to wait for: single samples vary too much on their own."""
        return max(self._rtt, self._short, self._long)

    def _open_window(self, now: float) -> None:
        self._window_start = now
        self._window_sum = 0.0
        self._window_count = 0
        self._window_peak_in_flight = self._slots.in_flight

    def _close_window(self, now: float) -> None:
        short = max(self._window_sum / self._window_count, 1e-9)
        peak = self._window_peak_in_flight
        self._open_window(now)
        self._short = short
        self.updates += 1
        self._windows_since_probe += 1
        if self._probe_started is not None:
            self._finish_probe_step(now, short)
            return
        # a plain mean over the first windows, then an EMA over about ``long_window`` of them
        self._long += (short - self._long) / (self._long_count + 1 if self._long_count < WARMUP_WINDOWS else self.long_window)
        self._long_count += 1
        if self._long / short > 2.0:
            self._long *= 0.95  # latency fell a lot (load went away): shed the old level faster
        gradient = max(0.5, min(1.0, self._long / short))
        if gradient < 1.0 or peak >= self._limit / 2:  # too few requests say nothing about more
            target = self._limit * gradient + self.queue_size(self._limit)
            limit = self._limit * (1.0 - self.smoothing) + target * self.smoothing
            self._limit = max(float(self.minimum), min(float(self.maximum), limit))
        self._peak_limit_since_probe = max(self._peak_limit_since_probe, self._limit)
        if self.probe_interval is None or peak < self.probe_factor * self._limit:
            return  # probing is off, or a probe would not lower the load: nothing to learn
        due = WARMUP_WINDOWS if self.probes == 0 else self.probe_interval
        if self._windows_since_probe >= due or (
            gradient < 1.0 and self._limit < self.probe_factor * self._peak_limit_since_probe
        ):
            # Due: the long-term latency may have absorbed a standing queue (or started on one).
            # Halved: the latency kept the limit falling; is it queueing, or a slower model?
            self._start_probe(now)

    def _start_probe(self, now: float) -> None:
        self.probes += 1
        self._windows_since_probe = 0
        self._probe_saved_limit = self._limit
        self._probe_steps = 0
        self._probe_step(now)

    def _probe_step(self, now: float) -> None:
        """Lower the limit by ``probe_factor`` and measure the cohort admitted under it."""
        self._probe_started = now
        self._probe_short_before = self._short
        self._limit = max(float(self.minimum), self._limit * self.probe_factor)
        self._probe_cohort = max(self.limit, self.min_samples)
        self._probe_admitted = 0
        self._probe_starts.clear()
        self._probe_steps += 1

    def _finish_probe_step(self, now: float, short: float) -> None:
        before = self._probe_short_before
        if short < 0.6 * before and self.limit > self.minimum:
            # The latency fell with the load: the server still queued at this limit. Go lower:
            # the steps cost no throughput while the server stays full.
            self._probe_step(now)
            return
        if short >= 0.9 * before:
            # Less load, the same latency: no queue to blame, the model itself is slower (or
            # faster) than the long-term latency says.
            self._long = short
        elif short < self._long:
            # The long-term latency had absorbed a queue: a deep probe measured past it, a
            # single step (the periodic check near the knee) is trusted halfway.
            self._long = short if self._probe_steps > 1 else self._long + 0.5 * (short - self._long)
        self._long_count = max(self._long_count, WARMUP_WINDOWS)
        self._end_probe(restore=True)

    def _end_probe(self, *, restore: bool) -> None:
        if self._probe_started is None:
            return
        self._probe_started = None
        if restore:
            self._limit = max(self._limit, self._probe_saved_limit)
        self._peak_limit_since_probe = self._limit

    async def release(self, outcome: Outcome, started: float | None = None) -> None:
        """Free the slot and adapt the limit to the outcome."""
        self.on_outcome(outcome, started)
        self._slots.give_back()
