"""[4 collect] A row's outcome with its audit fields, and the check that every row comes back
exactly once, in order.

Every stage before this one may reorder rows (prefix order, dedup, journal replay, rows of
several endpoints sent in one round); each result carries its row's ``index`` so that
collecting them is a placement, not a search, and a row placed twice or never is a bug that
stops the batch instead of shifting every later answer by one row.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

from .._errors import AIQueryError, EndpointError
from .._schemas import ModelResponse


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
    """The endpoint's HTTP status of a failed row's last attempt (None: no answer, e.g. a timeout;
    400 for a row refused before sending, its request at fault: ``request.row_fault``)."""
    logprobs: Any = None
    """The answer's ``choices[0].logprobs`` when the request asked for them and the endpoint sent them."""
    batch_id: str | None = None
    """The provider batch that answered the row (``client_config.batch_api``); ``None``: answered online."""
    prediction: Any = None
    """A custom model's output for the row when it is not ``value``: a one-column DataFrame's record
    (``ModelResponse.prediction``); the serving endpoint answers it as MLflow's scoring server does."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def http_status(self) -> int | None:
        """The row's status as the endpoint usage table records it: 200 when answered (in-process
        backends too), else ``status_code`` (``None``: no HTTP answer, e.g. a refused connection)."""
        return 200 if self.ok and self.status_code is None else self.status_code


def answered_result(index: int, endpoint: str, model: str | None, pricing: Any, response: ModelResponse, *,
                    latency_ms: float, attempts: int) -> CallResult:
    """A row's result from its endpoint's answer: the value and the audit fields (tokens, cost)."""
    usage = response.usage
    return CallResult(
        index,
        endpoint,
        "ok",
        value=response.value,
        model=response.model or model,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        usage_estimated=usage.estimated,
        cost_usd=pricing.cost(usage.prompt_tokens, usage.completion_tokens) if pricing else None,
        latency_ms=latency_ms,
        attempts=attempts,
        request_id=response.request_id,
        finish_reason=response.finish_reason,
        logprobs=_logprobs(response),
        prediction=response.prediction,
    )


def failed_result(index: int, endpoint: str, model: str | None, exc: EndpointError, why: str, *,
                  latency_ms: float, attempts: int) -> CallResult:
    """A row's result when its endpoint gave no answer: the error says why and after how many attempts."""
    return CallResult(
        index,
        endpoint,
        "error",
        error=f"{exc} ({why} after {attempts} attempt{'s' if attempts != 1 else ''})",
        model=model,
        latency_ms=latency_ms,
        attempts=attempts,
        request_id=exc.request_id,
        status_code=exc.status_code,
    )


def _logprobs(response: ModelResponse) -> Any:
    choices = response.raw.get("choices") if isinstance(response.raw, Mapping) else None
    if isinstance(choices, list) and choices and isinstance(choices[0], Mapping):
        return choices[0].get("logprobs")
    return None


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


__all__ = ["CallResult", "answered_result", "check_exactly_once", "failed_result", "shared_copy", "without_gaps"]
