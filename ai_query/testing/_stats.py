"""The simulator's server-side counters, which tests and benchmarks compare with what clients saw."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SimulatorStats:
    """Counters since the simulator started or was last reset.

    Only the simulator's event-loop thread writes them; reading one field from another thread is
    safe, and :meth:`ProviderSimulator.snapshot` (or ``GET /_sim/stats``) gives a consistent copy.
    """

    requests: int = 0
    """Inference requests received on any format's route (``/v1/models`` and ``/_sim/*`` excluded)."""
    ok: int = 0
    """Successful answers: 200 with a well-formed body (a malformed 200 is not one)."""
    by_status: Counter = field(default_factory=Counter)
    """Answers by HTTP status, 200 included; a reset connection has no status and is not here."""
    faults: Counter = field(default_factory=Counter)
    """Faults injected at random by ``error_rates``, by kind: ``500 503 reset malformed timeout``."""
    directives: Counter = field(default_factory=Counter)
    """Answers decided by a ``[[...]]`` directive in the prompt, by directive."""
    prompt_tokens: int = 0
    """Prompt tokens of successful answers only."""
    completion_tokens: int = 0
    """Completion tokens of successful answers only."""
    rate_limited: int = 0
    """429 answers, whatever the cause (concurrency cap, quota, ``[[ratelimit:N]]``)."""
    concurrency_rejections: int = 0
    """429s because ``max_concurrency`` requests were already in flight."""
    rpm_rejections: int = 0
    """429s because the window's request quota was used up."""
    tpm_rejections: int = 0
    """429s because the window's token quota had no room for the request's charge."""
    admitted: int = 0
    """Requests that passed the concurrency cap and the quota (and so were charged to it)."""
    admitted_tokens: int = 0
    """Tokens charged to the quota at admission (prompt + max_tokens), net of refunds."""
    peak_concurrency: int = 0
    """The most requests in flight at once (past the concurrency cap)."""
    peak_offered: int = 0
    """The most requests open at once, those the cap refused included (above the cap: a client sent too many)."""
    admitted_by_second: Counter = field(default_factory=Counter)
    """Admitted requests per whole second since start/reset."""
    admitted_by_window: Counter = field(default_factory=Counter)
    """Admitted requests per quota window (window ``i`` starts ``i * window_s`` after start/reset)."""
    admitted_tokens_by_window: Counter = field(default_factory=Counter)
    """Tokens charged per quota window."""
    first_request_s: float | None = None
    """Seconds from start/reset to the first inference request (None: none yet)."""
    last_request_s: float | None = None
    """Seconds from start/reset to the latest inference request."""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def quota_violations(self) -> int:
        """Requests that arrived when their window's quota was already used up (429 from rpm/tpm)."""
        return self.rpm_rejections + self.tpm_rejections

    @property
    def errors(self) -> Counter:
        """Non-200 answers by status."""
        return Counter({status: n for status, n in self.by_status.items() if status != 200})

    def clear(self) -> None:
        """Zero every counter in place (references to this object stay valid)."""
        self.__init__()  # type: ignore[misc]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready copy (counter keys become strings)."""

        def keyed(counter: Counter) -> dict[str, int]:
            return {str(k): v for k, v in sorted(counter.items())}

        return {
            "requests": self.requests,
            "ok": self.ok,
            "by_status": keyed(self.by_status),
            "faults": keyed(self.faults),
            "directives": keyed(self.directives),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "rate_limited": self.rate_limited,
            "concurrency_rejections": self.concurrency_rejections,
            "rpm_rejections": self.rpm_rejections,
            "tpm_rejections": self.tpm_rejections,
            "quota_violations": self.quota_violations,
            "admitted": self.admitted,
            "admitted_tokens": self.admitted_tokens,
            "peak_concurrency": self.peak_concurrency,
            "peak_offered": self.peak_offered,
            "admitted_by_second": keyed(self.admitted_by_second),
            "admitted_by_window": keyed(self.admitted_by_window),
            "admitted_tokens_by_window": keyed(self.admitted_tokens_by_window),
            "first_request_s": self.first_request_s,
            "last_request_s": self.last_request_s,
        }
