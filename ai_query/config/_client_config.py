"""How the client treats an endpoint (``ClientConfig``: concurrency, timeouts, retries, quotas) and
the serving endpoint's per-key call limits (``RateLimit``)."""

from __future__ import annotations

from typing import Annotated, Literal

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
    """The limiter: ``aimd`` (429/503/timeouts; remote endpoints), ``gradient`` (latency; self-hosted
    engines that queue instead of refusing), or ``auto`` (gradient for local models, else aimd)."""
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

    def _check(self, path: str) -> None:
        if self.initial_concurrency > self.max_concurrency:
            raise ConfigError(
                f"{path}.initial_concurrency ({self.initial_concurrency}) is larger than max_concurrency "
                f"({self.max_concurrency}); lower it or raise max_concurrency"
            )

    from_dict = classmethod(decode)  # (data, path): built from JSON, errors naming ``path``
