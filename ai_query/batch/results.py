"""[4 collect] A row's outcome, and the check that every row comes back exactly once, in order.

Every stage before this one may reorder rows (prefix order, dedup, journal replay, rows of
several endpoints sent in one round); each result carries its row's ``index`` so that
collecting them is a placement, not a search, and a row placed twice or never is a bug that
stops the batch instead of shifting every later answer by one row.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Sequence

from .._errors import AIQueryError


@dataclass
class CallResult:
    """One row's outcome: the value or the error, and the audit fields."""

    index: int
    endpoint: str
    status: str  # "ok" | "error"
    value: Any = None
    error: str | None = None
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    usage_estimated: bool = False
    cost_usd: float | None = None
    latency_ms: float = 0.0
    attempts: int = 0
    request_id: str | None = None
    finish_reason: str | None = None
    completed_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    deduplicated: bool = False
    """The same request was sent for another row of the batch; this row shares its answer."""
    status_code: int | None = None
    """The endpoint's HTTP status of a failed row's last attempt (None: no answer, e.g. a timeout)."""
    logprobs: Any = None
    """The answer's ``choices[0].logprobs`` when the request asked for them and the endpoint sent them."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def shared_copy(original: CallResult, index: int) -> CallResult:
    """Row ``index``'s result when its request was sent for another row: the same answer, no cost.

    Its tokens stay with the row that was sent, so the token totals of a table still equal what
    the endpoint served.
    """
    return replace(original, index=index, prompt_tokens=0, completion_tokens=0, total_tokens=0,
                   cost_usd=0.0 if original.cost_usd is not None else None, attempts=0, deduplicated=True)


def check_exactly_once(results: Sequence[CallResult], expected: int) -> None:
    """Every input row must come back once, in order; anything else is a bug, never silent."""
    if len(results) != expected or any(r.index != i for i, r in enumerate(results)):
        indices = [r.index for r in results]
        raise AIQueryError(
            f"internal error: expected rows 0..{expected - 1} exactly once and in order, got {len(results)} "
            f"results (first indices {indices[:10]}); please report this"
        )


def without_gaps(results: Sequence[CallResult | None]) -> list[CallResult]:
    """``results`` once every position holds its row's result; a gap is a bug, never silent."""
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:
        raise AIQueryError(f"internal error: rows {missing[:10]} got no result; please report this")
    return list(results)  # type: ignore[arg-type]


__all__ = ["CallResult", "check_exactly_once", "shared_copy", "without_gaps"]
