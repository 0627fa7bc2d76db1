"""OpenTelemetry spans per endpoint request, when ``opentelemetry-api`` is installed and configured.

One span per request of a row (``EndpointClient.call``: its attempts, retries and a fallback to
another served entity included), a ``CLIENT`` span named after the OTel GenAI semantic
conventions (``"{gen_ai.operation.name} {gen_ai.request.model}"``, e.g. ``chat gpt-4o-mini``),
child of the caller's current span. Attributes: ``gen_ai.operation.name``, ``gen_ai.provider.name``,
``gen_ai.request.model``, ``gen_ai.response.model``, ``gen_ai.usage.input_tokens`` /
``output_tokens``, ``http.response.status_code`` and ``error.type`` for a failed row, and ours:
``aiq.endpoint``, ``aiq.served_entity``, ``aiq.attempts``, ``aiq.status``, ``aiq.cost_usd``. Each
retry adds an event ``aiq.retry`` (``aiq.attempt``, ``aiq.wait_s``, ``http.response.status_code``,
``error.type``). No attribute carries a prompt, an answer, a header or an error text: only names,
numbers and the error's class, so no secret can reach a span (the span's status description is
the row's error text, which is scrubbed at the source, ``_redact``).

**Cost when off.** The endpoint exchange is benchmarked, so the decision is made once, when an
``EndpointClient`` is built: without ``opentelemetry`` installed, or with the API's default
provider (nothing configured: ``ProxyTracerProvider`` / ``NoOpTracerProvider``), there is no
tracer and the client keeps its plain ``call``: no branch, no allocation, nothing per request.
With a provider, the client's ``call`` is bound to the traced one at construction. A provider
set up after a client was built is not seen by that client (build clients after configuring
OpenTelemetry, or pass ``tracer_provider=`` to ``AIQueryClient``).

The synchronous faces (``map``, ``call``) run rows on the client's event-loop thread; the
caller's current span still parents them, because ``run_coroutine_threadsafe`` schedules the
task with a copy of the calling thread's ``contextvars`` (where OTel keeps its context).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Callable

from ._version import __version__

if TYPE_CHECKING:
    import tenacity

    from .batch.results import CallResult
    from .config import EndpointConfig

_OPERATIONS = {"llm/v1/chat": "chat", "llm/v1/completions": "text_completion", "llm/v1/embeddings": "embeddings"}


def request_tracer(provider: Any = None) -> Any:
    """A tracer for request spans, or None when tracing is off (not installed, nothing configured)."""
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    if provider is None:
        provider = trace.get_tracer_provider()
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return None  # the API's defaults: spans would be dropped, so make none
    return provider.get_tracer("ai_query", __version__)


class RequestSpans:
    """What one endpoint's spans share: the tracer, the span name and the fixed attributes."""

    def __init__(self, tracer: Any, config: "EndpointConfig") -> None:
        from opentelemetry.trace import SpanKind, Status, StatusCode

        self.tracer = tracer
        self._kind = SpanKind.CLIENT
        self._status = Status
        self._error_code = StatusCode.ERROR
        entity = config.entity
        operation = _OPERATIONS.get(config.task, config.task)
        self.name = f"{operation} {entity.model_name}"
        provider = entity.external_model.provider if entity.external_model is not None else entity.kind
        self.attributes = {"gen_ai.operation.name": operation, "gen_ai.provider.name": provider,
                           "gen_ai.request.model": entity.model_name, "aiq.endpoint": config.name}
        self._entities = {e.model_name: e.name for e in config.served_entities}

    def traced(self, call: Callable[..., Awaitable["CallResult"]]) -> Callable[..., Awaitable["CallResult"]]:
        """``call`` (the client's plain one) inside a span per request."""
        async def traced_call(*args: Any, **kwargs: Any) -> "CallResult":
            with self.tracer.start_as_current_span(self.name, kind=self._kind, attributes=self.attributes,
                                                   record_exception=False) as span:
                result = await call(*args, **kwargs)
                self.record(span, result)
                return result
        return traced_call

    def record(self, span: Any, result: "CallResult") -> None:
        attributes: dict[str, Any] = {"aiq.status": result.status, "aiq.attempts": result.attempts}
        if result.model is not None:
            attributes["gen_ai.response.model"] = result.model
            attributes["aiq.served_entity"] = self._entities.get(result.model, "")
        if result.ok:
            attributes["gen_ai.usage.input_tokens"] = result.prompt_tokens
            attributes["gen_ai.usage.output_tokens"] = result.completion_tokens
            if result.cost_usd is not None:
                attributes["aiq.cost_usd"] = result.cost_usd
        else:
            attributes["error.type"] = str(result.status_code) if result.status_code is not None else "error"
            if result.status_code is not None:
                attributes["http.response.status_code"] = result.status_code
            span.set_status(self._status(self._error_code, (result.error or "")[:300]))
        span.set_attributes(attributes)

    def retry_events(self, before_sleep: Callable[["tenacity.RetryCallState"], None]) -> Callable[["tenacity.RetryCallState"], None]:
        """tenacity's ``before_sleep`` that also adds an ``aiq.retry`` event to the row's span."""
        from opentelemetry import trace

        def with_event(state: "tenacity.RetryCallState") -> None:
            before_sleep(state)
            exc = state.outcome.exception() if state.outcome is not None else None
            event: dict[str, Any] = {"aiq.attempt": state.attempt_number,
                                     "aiq.wait_s": state.next_action.sleep if state.next_action is not None else 0.0,
                                     "error.type": type(exc).__name__ if exc is not None else ""}
            status = getattr(exc, "status_code", None)
            if status is not None:
                event["http.response.status_code"] = status
            trace.get_current_span().add_event("aiq.retry", event)
        return with_event


__all__ = ["RequestSpans", "request_tracer"]
