"""The batch pipeline's entry: rows in, each row's result back exactly once, at its position.

``start_rows`` runs the stages in data-flow order for one batch of rows (an Arrow batch of a
Spark task, a task function's rows):

1. plan: ``group_rows`` (by endpoint, parameters, response format; one ``RequestKey`` per row),
   ``plan_group`` (dedup within the batch and against ``StageAnswers``), ``journal.replay``
   (answers a killed run of the job, or a killed attempt of the task, already received);
2. fan out: the remaining rows go to the process's ``AIQueryClient`` (``submit_many``), which
   orders them (``prefix_order``), starts them a window at a time (``WindowScheduler``) and
   exchanges them with the endpoint;
3. collect: ``PendingRows.wait`` places every result, copies shared answers to their rows and
   checks that no row is missing.

Nothing here knows Spark: the Spark adapter passes the task's journal and the stage's answers.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import hashlib
import json
import os
import threading
from typing import Any, Callable

from .._client import AIQueryClient
from ..config import EndpointRegistry
from .._progress import reporter_for
from .._errors import ArgumentError
from .._schemas import ModelParameters
from ..backends import BatchContext
from .answers import StageAnswers
from .journal import ResponseJournal, TaskJournal, replay
from .plan import group_rows, plan_group
from .request import RequestKey
from .results import CallResult, shared_copy, without_gaps


class PendingRows:
    """Rows on their way to their endpoints; ``wait()`` returns each row's result at its position."""

    def __init__(self, results: list[CallResult | None], reporter: Any, action: str | None = None) -> None:
        self.results = results
        self.reporter = reporter
        self.action = action
        """The user action the rows belong to (``BatchContext.action``): their progress counts say so."""
        self.journal: ResponseJournal | TaskJournal | None = None
        """The task's journal: what it still queues is written before the rows are returned."""
        self.rounds: list[tuple[concurrent.futures.Future[list[list[CallResult]]], list[list[int]]]] = []
        self.copies: list[tuple[int, int]] = []  # (duplicate row, the row whose request is sent)
        self.earlier: list[tuple[int, CallResult]] = []  # (duplicate row, the answer an earlier batch got)
        self.waiting: list[tuple[int, concurrent.futures.Future[CallResult]]] = []  # (row, an answer still in flight)

    def cancel(self) -> None:
        """Stop the rows still in flight (the consumer went away, e.g. a ``LIMIT`` was reached)."""
        for future, _ in self.rounds:
            future.cancel()

    def wait(self) -> list[CallResult]:
        results = self.results
        try:
            for future, rows_of_batches in self.rounds:
                for rows, sent in zip(rows_of_batches, future.result()):
                    for i, result in zip(rows, sent):
                        result.index = i
                        results[i] = result
        except BaseException:
            self.cancel()
            raise
        for i, answer in self.waiting:  # sent by an earlier batch of this stage, answered since
            results[i] = shared_copy(answer.result(), i)
        for i, source in self.copies:
            original = results[source]
            assert original is not None
            results[i] = shared_copy(original, i)
        if self.journal is not None:
            self.journal.flush()
        if self.reporter is not None:
            shared = [*self.copies, *self.earlier, *self.waiting]
            for i, _ in shared:
                self.reporter.add(results[i].ok, 0, None, None, deduplicated=True, action=self.action)  # type: ignore[union-attr]
            self.reporter.flush()
        return without_gaps(results)


Reserved = dict[int, tuple[RequestKey, concurrent.futures.Future[CallResult]]]
"""Rows whose request this batch marked as in flight in the stage's answers: (key, answer)."""


def start_rows(
    client: AIQueryClient,
    progress_address: tuple[str, int] | None,
    endpoints: list[Any],
    requests: list[Any],
    params: list[Any],
    response_formats: list[Any],
    journal: ResponseJournal | TaskJournal | None = None,
    answers: StageAnswers | None = None,
    context: BatchContext | None = None,
) -> PendingRows:
    """Start sending each row to its endpoint (rows grouped by endpoint, parameters and response format).

    Returns at once (``.wait()`` for the results); the rows queue behind those started earlier in
    this process, so a caller may start its next batch before waiting for this one. Every row
    comes back exactly once, at its own position; a gap is an internal error. With a response
    journal (a batch job's), a request answered before a kill is answered from it, and every new
    answer is journaled as it arrives, before the row is used. An identical request already sent
    in this stage (answered or still in flight; ``answers``, by default only this batch's) is not
    sent again: the row shares that answer. ``context`` (the task running the batch) goes to a
    backend that runs whole batches.
    """
    pending = PendingRows([None] * len(requests), reporter_for(progress_address), context.action if context is not None else None)
    pending.journal = journal
    cache = answers if answers is not None else StageAnswers()
    reserved: Reserved = {}
    try:
        return _start_groups(client, pending, cache, reserved, endpoints, requests, params, response_formats, journal, context)
    except BaseException as exc:
        # Nothing will answer the requests this batch marked as in flight: release them, so a
        # retried task of this stage in this worker sends them instead of waiting forever.
        pending.cancel()
        for key, answer in reserved.values():
            cache.abandon(key, answer, exc)
        raise


def _start_groups(
    client: AIQueryClient,
    pending: PendingRows,
    cache: StageAnswers,
    reserved: Reserved,
    endpoints: list[Any],
    requests: list[Any],
    params: list[Any],
    response_formats: list[Any],
    journal: ResponseJournal | TaskJournal | None,
    context: BatchContext | None,
) -> PendingRows:
    results, reporter = pending.results, pending.reporter
    batches, batch_rows = [], []
    keys: dict[int, RequestKey] = {}
    for group in group_rows(endpoints, requests, params, response_formats):
        name = group.endpoint
        if name is None:
            for i in group.rows:
                results[i] = CallResult(i, "", "error", error="the endpoint argument is NULL")
            continue
        config = client.endpoint(name).config  # an unknown endpoint fails the query here
        deduplicate = config.client_config.deduplicate
        try:
            params = ModelParameters.from_mapping(group.params, custom=any(e.may_be_custom for e in config.served_entities))
        except ArgumentError as exc:  # a row's own parameters (a column): that row's error, nothing sent
            for i in group.rows:
                results[i] = CallResult(i, name, "error", error=f"{exc}; not sent", status_code=400)
            continue
        plan = plan_group(group, requests, cache, deduplicate)
        keys.update(plan.keys)
        pending.copies.extend(plan.copies)
        for i, hit in plan.cached:
            if isinstance(hit, CallResult):
                pending.earlier.append((i, hit))
                results[i] = shared_copy(hit, i)
            else:
                pending.waiting.append((i, hit))
        send = plan.send
        if journal is not None:  # answered before the job was killed: take it from the journal
            replayed, send = replay(journal, send, plan.keys)
            for result in replayed:
                i = result.index
                results[i] = result
                if reporter is not None:
                    reporter.add(result.ok, result.total_tokens, None, None, action=pending.action)
                if i in plan.shareable and (answer := cache.reserve(keys[i])) is not None:
                    # later batches of the stage share it, as they shared the answer before the kill
                    cache.settle(keys[i], answer, result)
        for i in send:
            if i in plan.shareable and (answer := cache.reserve(keys[i])) is not None:
                reserved[i] = (keys[i], answer)
        if send:
            batches.append((name, [requests[i] for i in send], params,
                            group.response_format))
            batch_rows.append(send)

    # submit_many reports a result by endpoint name: one round per set of batches with distinct
    # names (usually one), so that a journaled answer is filed under its own row's request.
    rounds: list[list[int]] = []
    for b, batch in enumerate(batches):
        target = next((r for r in rounds if all(batches[o][0] != batch[0] for o in r)), None)
        if target is None:
            rounds.append([b])
        else:
            target.append(b)
    for round_ in rounds:
        row_of = {batches[b][0]: batch_rows[b] for b in round_}
        on_result = _on_result(client, row_of, keys, journal, reporter, pending.action, cache, reserved)
        future = client.submit_many([batches[b] for b in round_], on_result=on_result, context=context)
        rows_of_round = [batch_rows[b] for b in round_]
        if reserved:
            future.add_done_callback(_releaser(rows_of_round, cache, reserved))
        pending.rounds.append((future, rows_of_round))
    return pending


def _on_result(client: AIQueryClient, row_of: dict[str, list[int]], keys: dict[int, RequestKey],
               journal: ResponseJournal | TaskJournal | None, reporter: Any, action: str | None, cache: StageAnswers,
               reserved: Reserved) -> Callable[[str, CallResult], None]:
    """What happens to each answer as it arrives: journaled, counted, shared with waiting rows."""

    def on_result(name: str, r: CallResult) -> None:
        i = row_of[name][r.index]
        if journal is not None:
            journal.record(keys[i], r)
        if reporter is not None:
            reporter.add(r.ok, r.total_tokens, name, client.endpoint(name).limiter.limit, action=action)
        if i in reserved:
            cache.settle(*reserved[i], r)

    return on_result


def _releaser(rows_of_round: list[list[int]], cache: StageAnswers,
              reserved: Reserved) -> Callable[[concurrent.futures.Future[Any]], None]:
    """A row that never got its answer (a systemic failure, a cancel) releases its request: rows
    of later batches waiting for it fail the same way instead of waiting forever."""

    def release(f: concurrent.futures.Future[Any]) -> None:
        why = concurrent.futures.CancelledError() if f.cancelled() else f.exception()
        if why is None:
            why = RuntimeError("internal error: a row got no answer; please report this")
        for rows in rows_of_round:
            for i in rows:
                if i in reserved:
                    cache.abandon(*reserved[i], why)

    return release


_SHARED: dict[str, AIQueryClient] = {}
_SHARED_PID = os.getpid()
_SHARED_LOCK = threading.Lock()


def registry_fingerprint(registry: EndpointRegistry) -> str:
    """A stable digest of a registry's content (no secrets: they are only references)."""
    data = json.dumps([e.to_dict() for e in registry], sort_keys=True, default=str)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def shared_client(
    registry: EndpointRegistry, quota_broker: tuple[str, int] | None = None, quota_share: float = 1.0
) -> AIQueryClient:
    """The process-wide client for ``registry``: one long-lived client per Python worker."""
    global _SHARED_PID
    key = f"{registry_fingerprint(registry)}|{quota_broker}|{quota_share}"
    with _SHARED_LOCK:
        if os.getpid() != _SHARED_PID:  # forked: the parent's loop thread does not exist here
            _SHARED.clear()
            _SHARED_PID = os.getpid()
        client = _SHARED.get(key)
        if client is None:
            client = _SHARED[key] = AIQueryClient(registry, quota_broker=quota_broker, quota_share=quota_share)
        return client


@atexit.register
def _close_shared() -> None:
    for client in list(_SHARED.values()):
        client.close()
    _SHARED.clear()


__all__ = ["PendingRows", "registry_fingerprint", "shared_client", "start_rows"]
