"""How the client treats an endpoint (``ClientConfig``: concurrency, timeouts, retries, quotas) and
the serving endpoint's per-key call limits (``RateLimit``)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from msgspec import Meta

from .._errors import ConfigError
from ._checks import ConfigStruct, decode

_Positive = Annotated[int, Meta(ge=1)]
_NonNegative = Annotated[float, Meta(ge=0)]


class RateLimit(ConfigStruct):
    """``calls`` per ``renewal_period`` per ``key`` (enforced by the serving endpoint)."""

    calls: _Positive
    key: Literal["user", "endpoint"] = "user"
    renewal_period: Literal["minute"] = "minute"

    from_dict = classmethod(decode)  # (data, path): built from JSON, errors naming ``path``


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")


def duration_s(value: Any, where: str) -> float:
    """``"6h"``, ``"90m"``, ``"30s"``, ``"1d"`` or a number of seconds, as seconds."""
    m = _DURATION.match(str(value)) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else None
    if m is None or float(m.group(1)) <= 0:
        raise ConfigError(f"{where} must be a duration such as \"6h\", \"90m\" or \"30s\", got {value!r}")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2) or "s"]


class BatchAPIConfig(ConfigStruct):
    """``client_config.batch_api``: batch calls (SQL, DataFrames, ``map``) send their rows as provider
    batches (OpenAI Batch API, Anthropic Message Batches; a ``vllm_pool`` runs the same JSONL
    through vLLM's batch runner) at the batch price; rows not answered when ``deadline`` nears go online."""

    completion_window: str = "24h"
    """The provider's completion window of each batch."""
    deadline: str | None = None
    """How long a batch of rows may wait (``"6h"``, ``"90m"``), counted from its submission; rows not
    answered by then minus the time online sending needs go online. ``None``: wait for the batch."""
    poll_s: Annotated[float, Meta(gt=0, description="a number > 0")] = 2.0
    """First wait between polls; it grows by half each poll up to ``max_poll_s``."""
    max_poll_s: Annotated[float, Meta(gt=0, description="a number > 0")] = 60.0
    """The longest wait between polls."""
    online_rows_per_s: Annotated[float, Meta(gt=0, description="a number > 0")] | None = None
    """The online rate deadline routing plans with (``None``: 5 rows/s)."""
    max_requests: _Positive | None = None
    """Requests per batch, below the provider's own limit."""

    def _check(self, path: str) -> None:
        duration_s(self.completion_window, f"{path}.completion_window")
        if self.deadline is not None:
            duration_s(self.deadline, f"{path}.deadline")

    def options(self) -> dict[str, Any]:
        """The options as the batch loop takes them (the job spec's ``[batch_api]`` shape)."""
        out: dict[str, Any] = {"completion_window": self.completion_window, "poll_s": self.poll_s, "max_poll_s": self.max_poll_s}
        if self.deadline is not None:
            out["deadline_s"] = duration_s(self.deadline, "batch_api.deadline")
        if self.online_rows_per_s is not None:
            out["online_rows_per_s"] = self.online_rows_per_s
        if self.max_requests is not None:
            out["max_requests"] = self.max_requests
        return out

    from_dict = classmethod(decode)


class ClientConfig(ConfigStruct):
    """How the client talks to an endpoint: concurrency, timeouts and retries."""

    max_concurrency: _Positive = 64
    """Upper bound on requests in flight to the endpoint, over all the job's workers (each gets its share)."""
    initial_concurrency: _Positive = 8
    """Where the adaptive limiter starts; it grows while the endpoint keeps up."""
    request_timeout_s: Annotated[float, Meta(ge=0.001)] = 120.0
    max_attempts: _Positive = 8
    """Attempts per row for 5xx, timeouts, resets and malformed bodies. The retry budget bounds
    retries over all rows, so this can be generous: at 14 % random faults, 6 attempts fail 1 row
    in 130,000 (0.14 ** 6), 8 attempts 1 in 6.6 million."""
    rate_limit_wait_s: _NonNegative = 600.0
    """How long a row may keep waiting through 429s (quota windows) before it is failed."""
    outage_wait_s: _NonNegative = 300.0
    """How long rows wait for an endpoint that stopped answering (refused or broken connections,
    502/503/504), counted from the outage's first failure, before they fail with a message that
    says how to resume; 0 fails them as soon as the endpoint's circuit breaker opens."""
    requests_per_minute: _Positive | None = None
    """The endpoint's request quota (pay-per-token limits); the client keeps under it."""
    tokens_per_minute: _Positive | None = None
    """The endpoint's token quota; prompt + max_tokens is reserved at admission, refunded from usage."""
    queries_per_hour: _Positive | None = None
    concurrency: Literal["auto", "aimd", "gradient"] = "auto"
    """The limiter: ``aimd`` (grows until 429/503/timeouts), ``gradient`` (holds in flight where latency
    starts to rise: for a shared self-hosted server whose other users' latency matters), or ``auto``
    (what the backend says: aimd for every built-in one, the local engines included, whose batches
    it keeps full)."""
    quota_refunds_unused: bool = True
    """Whether the endpoint gives unused ``max_tokens`` back to the tokens/min window (OpenAI-style
    gateways differ): if false, the client keeps the full reservation on its books too."""
    retry_budget: _NonNegative = 0.5
    """Retries of 5xx / timeouts / resets earn this many per row sent (from a floor of 10, up to 100 banked)."""
    deduplicate: bool = True
    """Send an identical (endpoint, request, parameters) once per query; its copies share the answer
    (``aiq_deduplicated``). Turn off to sample every row anew at a temperature above 0."""
    prefix_ordering: Literal["auto", "on", "off"] = "auto"
    """Dispatch a batch's prompts sorted so shared prefixes go together (``on``), never (``off``), or
    when the prompts share enough to pay (``auto``: >= 64 characters between sorted neighbours)."""
    default_max_tokens: _Positive | None = None
    """``max_tokens`` for chat and completions requests that set none (``modelParameters`` wins), so
    a plain call cannot run on to the model's context limit; ``None``: the server's own default."""
    max_prompt_chars: _Positive | None = None
    """A prompt longer than this many characters is that row's error, not sent (a guard below the
    model's context window, counted exactly instead of estimated in tokens); ``None``: no limit here."""
    retry_backoff_s: _NonNegative = 0.1
    """Backoff before retrying a timeout, or a 5xx / reset / unparseable body a second time (the first retry
    of those goes at once); doubled each time, jittered, capped at 30 s (Envoy starts at 25 ms).
    Rate limits wait for ``Retry-After`` instead; the retry budget keeps a failing endpoint from a storm."""
    batch_api: BatchAPIConfig | None = None
    """Set: batch calls go to the provider's batch API at the batch price (``BatchAPIConfig``)."""

    def _check(self, path: str) -> None:
        if self.initial_concurrency > self.max_concurrency:
            raise ConfigError(
                f"{path}.initial_concurrency ({self.initial_concurrency}) is larger than max_concurrency "
                f"({self.max_concurrency}); lower it or raise max_concurrency"
            )

    @classmethod
    def from_dict(cls, data: Any, path: str) -> "ClientConfig":
        """Built from JSON, errors naming ``path`` (``batch_api``'s by its own path)."""
        if isinstance(data, dict) and isinstance(data.get("batch_api"), dict):
            batch = BatchAPIConfig.from_dict(data["batch_api"], f"{path}.batch_api")
            return decode(cls, {k: v for k, v in data.items() if k != "batch_api"}, path).replace(batch_api=batch)  # type: ignore[no-any-return]
        return decode(cls, data, path)  # type: ignore[no-any-return]
