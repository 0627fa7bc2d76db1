"""Batch-API mode's shared machinery: the poll loop with deadline routing, and a batch answer as a
row's result. Two callers, one mechanism:

* a job's batch phase (``batch_runner``, ``[batch_api]``): resumable, its batch ids in the job
  state, answers journaled before the chunks run;
* a batch call of an endpoint with ``client_config.batch_api`` (``AIQueryClient.amap``: SQL, the
  DataFrame UDFs, task functions): the rows of one call go out as batches, are waited for in a
  worker thread of the client's loop, and the rows no batch answered go online in the same call.

**Deadline routing** (``poll_until_ended``): the loop stops waiting at ``deadline_at - reserve``,
``reserve`` being the time the unanswered lines would take online (``online_rows_per_s``) with
a margin (x ``RESERVE_FACTOR`` + ``RESERVE_FIXED_S``: the cancel, the wait for the batch to end,
the online phase's start-up and commits; without it the benchmark's 30-s deadline ended at 30.9 s); it
cancels the open batches and collects what they finished (a provider keeps a cancelled batch's
finished lines), so the caller sends only the rest online. A failed line (an error line) is not an
answer either: only those lines go online again.

**Exactly like online** (``batch_result``): the value, usage, model and finish reason of the
backend's own ``parse``; the cost at the price table's batch rate; ``request_id`` the provider's
line id and ``batch_id`` the batch's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from .._errors import EndpointError
from .._schemas import ModelParameters, ModelResponse
from ..backends import BatchContext, backend_class, entity_kind
from ..backends._batch_api import BatchState, ProviderBatches
from ..config import EndpointConfig, ServedEntity
from .request import prompt_text_of, row_fault
from .results import CallResult, check_exactly_once, without_gaps

if TYPE_CHECKING:
    from .._client import AIQueryClient

ONLINE_ONLY_PROPERTY = "aiq.batch_api.online_only"
"""A Spark local property: set, the calls of the tasks go online even where the endpoint's
``client_config.batch_api`` asks for batches (a job's batch phase already sent them)."""

DEFAULT_ONLINE_ROWS_PER_S = 5.0


def batch_result(answer: ModelResponse, endpoint: str, entity: ServedEntity, batch_id: str, latency_ms: float,
                 index: int = 0) -> CallResult:
    """A row's result from a batch line's answer: as online, priced at the batch rate."""
    usage = answer.usage
    pricing = entity.pricing
    return CallResult(
        index, endpoint, "ok", value=answer.value, model=answer.model or entity.model_name,
        prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens, total_tokens=usage.total_tokens,
        usage_estimated=usage.estimated, cost_usd=pricing.batch_cost(usage.prompt_tokens, usage.completion_tokens) if pricing else None,
        latency_ms=latency_ms, attempts=1, request_id=answer.request_id, finish_reason=answer.finish_reason, batch_id=batch_id)


RESERVE_FACTOR = 1.25
"""The online time of the unanswered lines is planned 25 % longer than the measured rate says."""
RESERVE_FIXED_S = 1.0
"""Seconds kept for the cancel, the batch's end, and the online phase's start-up and commit."""


def poll_until_ended(batches: ProviderBatches, batch_ids: Iterable[str], collect: Callable[[str, BatchState], None], *,
                     deadline_at: float | None = None, online_rows_per_s: float = DEFAULT_ONLINE_ROWS_PER_S,
                     poll_s: float = 2.0, max_poll_s: float = 60.0, on_cancel: Callable[[str], None] | None = None,
                     sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.time) -> int:
    """Poll ``batch_ids`` with a growing wait until each has ended, calling ``collect`` once per
    batch; at the deadline (minus the online time of the lines not done) cancel the open ones and
    collect what they did. Returns how many batches were cancelled."""
    open_ids = list(batch_ids)
    cancelled = 0
    poll = poll_s
    while open_ids:
        unanswered = 0
        for batch_id in list(open_ids):
            seen = batches.poll(batch_id)
            if seen.ended:
                collect(batch_id, seen)
                open_ids.remove(batch_id)
            else:
                unanswered += seen.total - seen.done
        if not open_ids:
            break
        if deadline_at is not None:
            left = deadline_at - clock() - (unanswered / online_rows_per_s * RESERVE_FACTOR + RESERVE_FIXED_S)
            if left <= 0:
                for batch_id in open_ids:
                    batches.cancel(batch_id)
                    cancelled += 1
                    if on_cancel is not None:
                        on_cancel(batch_id)
                poll, deadline_at = 0.05, None  # cancelled: wait for the batches to end, then collect what they did
                continue
            sleep(max(0.01, min(poll, left)))
        else:
            sleep(poll)
        poll = min(poll * 1.5, max_poll_s)
    return cancelled


def answer_in_batches(config: EndpointConfig, values: Sequence[Any], params: ModelParameters,
                      response_format: Mapping[str, Any] | None) -> dict[int, CallResult]:
    """Blocking: send ``values`` as batches of the endpoint's served entity, wait (up to the
    deadline), return the rows the batches answered by position; the rest are the caller's to
    send online. A systemic failure of the batch API (bad key, quota) raises as online would."""
    options = config.client_config.batch_api.options()  # type: ignore[union-attr]
    entity = config.entity
    batches = batch_client(entity, options.get("max_requests"))
    texts = [prompt_text_of(v) for v in values]
    lines = batches.lines(config.task, values, [params] * len(values), texts, response_format)
    row_of = {line.custom_id: i for i, line in enumerate(lines)}
    by_id = {line.custom_id: line for line in lines}
    submitted: dict[str, float] = {}
    for part in batches.split(lines):
        submitted[batches.submit(part, options["completion_window"])] = time.time()
    answered: dict[int, CallResult] = {}

    def collect(batch_id: str, _: BatchState) -> None:
        latency_ms = (time.time() - submitted[batch_id]) * 1000.0
        for custom_id, answer in batches.results(batch_id, by_id).items():
            if not isinstance(answer, EndpointError):
                answered[row_of[custom_id]] = batch_result(answer, config.name, entity, batch_id, latency_ms)

    deadline_s = options.get("deadline_s")
    poll_until_ended(batches, list(submitted), collect,
                     deadline_at=min(submitted.values()) + deadline_s if deadline_s is not None and submitted else None,
                     online_rows_per_s=options.get("online_rows_per_s", DEFAULT_ONLINE_ROWS_PER_S),
                     poll_s=options["poll_s"], max_poll_s=options["max_poll_s"])
    return answered


async def amap_in_batches(aiq: "AIQueryClient", endpoint: str, values: Sequence[Any], params: ModelParameters,
                          response_format: Mapping[str, Any] | None, on_result: Callable[[CallResult], None] | None,
                          context: BatchContext | None) -> list[CallResult]:
    """``AIQueryClient.amap`` through the endpoint's batch API (``client_config.batch_api``): the
    rows the batches answer, then the rest (not answered by the deadline, failed lines, rows
    refused before sending) online, each row once. The batches are waited for in a worker thread."""
    config = aiq.endpoint(endpoint).config
    sendable = [i for i, v in enumerate(values) if row_fault(v, config.client_config.max_prompt_chars) is None]
    answered = await asyncio.get_running_loop().run_in_executor(
        None, answer_in_batches, config, [values[i] for i in sendable], params, response_format)
    results: list[CallResult | None] = [None] * len(values)
    for j, result in answered.items():
        result.index = sendable[j]
        results[result.index] = result
        if on_result is not None:
            on_result(result)
    rest = [i for i, r in enumerate(results) if r is None]
    if rest:
        online = dataclasses.replace(context, online_only=True) if context is not None else BatchContext(online_only=True)
        callback = (lambda r: on_result(dataclasses.replace(r, index=rest[r.index]))) if on_result is not None else None
        for result in await aiq.amap(endpoint, [values[i] for i in rest], params, response_format, on_result=callback,
                                     context=online):
            result.index = rest[result.index]
            results[result.index] = result
    out = without_gaps(results)
    check_exactly_once(out, len(values))
    return out


def batch_client(entity: ServedEntity, max_requests: int | None = None) -> ProviderBatches:
    """The batch API of ``entity``: its provider's (OpenAI, Anthropic), or the one its backend
    brings (a ``vllm_pool``: vLLM's batch runner over the same JSONL; ``Backend.batch_api``)."""
    if entity.external_model is None:
        factory = getattr(backend_class(entity_kind(entity)), "batch_api", None)
        if factory is not None:
            return factory(entity, max_requests=max_requests)  # type: ignore[no-any-return]
    return ProviderBatches(entity, max_requests=max_requests)


__all__ = ["DEFAULT_ONLINE_ROWS_PER_S", "ONLINE_ONLY_PROPERTY", "amap_in_batches", "answer_in_batches", "batch_client", "batch_result",
           "poll_until_ended"]
