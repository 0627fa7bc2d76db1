"""How much goes out, and when: concurrency limits, quotas, shares across workers, retries.

- ``slots``: the one first-come-first-served, cancel-safe queue of slots in flight;
- ``aimd`` and ``gradient``: the two concurrency policies over it (429s for remote endpoints,
  latency for self-hosted servers), with the same interface;
- ``quota``: request/token quotas, leased from the driver's ``QuotaBroker`` across workers;
- ``share`` and ``leases``: an endpoint's concurrency split over the workers sending to it now,
  leased from the same broker before sending (the worker's side and the broker's);
- ``retry``: the retry policy composed from tenacity, and the retry budget.
"""

from .aimd import AdaptiveConcurrencyLimiter
from .gradient import GradientConcurrencyLimiter
from .quota import BrokeredQuota, LocalQuota, Quota, QuotaBroker, QuotaLimits, SlidingWindowLimit
from .retry import RecentFaults, RetryBudget, make_retrying
from .share import ConcurrencyShare
from .slots import Outcome, SlotQueue

__all__ = [
    "AdaptiveConcurrencyLimiter", "BrokeredQuota", "ConcurrencyShare", "GradientConcurrencyLimiter", "LocalQuota",
    "Outcome", "Quota", "QuotaBroker", "QuotaLimits", "RecentFaults", "RetryBudget", "SlidingWindowLimit", "SlotQueue",
    "make_retrying",
]
