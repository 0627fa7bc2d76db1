"""How much goes out, and when: concurrency limits, quotas, shares across workers, retries.

- ``slots``: the one first-come-first-served, cancel-safe queue of slots in flight;
- ``aimd`` and ``gradient``: the two concurrency policies over it (AIMD grows until 429s, 503s or
  timeouts, for every built-in backend; the latency gradient on request), with the same
  interface, picked by ``limiter_for``;
- ``quota``: request/token quotas, leased from the driver's ``QuotaBroker`` across workers;
- ``share`` and ``leases``: an endpoint's concurrency split over the workers sending to it now,
  leased from the same broker before sending (the worker's side and the broker's);
- ``retry``: the retry policy composed from tenacity, and the retry budget.
"""

from collections.abc import Callable
from typing import Any

from .aimd import AdaptiveConcurrencyLimiter
from .gradient import GradientConcurrencyLimiter
from .quota import BrokeredQuota, LocalQuota, Quota, QuotaBroker, QuotaLimits, SlidingWindowLimit
from .retry import RecentFaults, RetryBudget, make_retrying
from .share import ConcurrencyShare
from .slots import Outcome, SlotQueue


def limiter_for(kind: str, capabilities: Any, initial: int, maximum: int,
                clock: Callable[[], float]) -> AdaptiveConcurrencyLimiter | GradientConcurrencyLimiter:
    """The limiter of ``client_config.concurrency`` = ``kind`` for a backend's ``capabilities``
    (``backends.Capabilities``): under ``auto`` its ``limiter``; AIMD unless the latency gradient
    is asked for (a shared self-hosted server whose other users' latency matters). AIMD starts at
    ``maximum`` for a backend that ``starts_full`` (an engine of our own: no quota to find)."""
    if kind == "gradient" or (kind == "auto" and capabilities.limiter == "gradient"):
        return GradientConcurrencyLimiter(initial, maximum=maximum, clock=clock)
    return AdaptiveConcurrencyLimiter(maximum if capabilities.starts_full else initial, maximum=maximum, clock=clock)

__all__ = [
    "AdaptiveConcurrencyLimiter", "BrokeredQuota", "ConcurrencyShare", "GradientConcurrencyLimiter", "LocalQuota",
    "Outcome", "Quota", "QuotaBroker", "QuotaLimits", "RecentFaults", "RetryBudget", "SlidingWindowLimit", "SlotQueue",
    "limiter_for", "make_retrying",
]
