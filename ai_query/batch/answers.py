"""The cross-batch answer cache: requests already sent in one stage of a query, by this process.

A query's rows reach a Python worker as many Arrow batches, and the next batch starts while the
one before is still in flight (so the endpoint never idles). An identical request in a later
batch shares the earlier answer instead of being sent (and paid for) again: the cache holds each
request's answer, or while it is in flight a future of it. A failed answer is dropped (a later
batch asks again); a batch that fails or is cancelled abandons what it marked as in flight, so
rows waiting for it fail the same way instead of waiting forever.

The cache is bounded in entries (a bound on memory, not an eviction policy: past it, no more
sharing) and scoped to a stage: ``stage_answers(stage)`` keeps the last four stages' caches, so a
retried task of a stage reuses its answers and a new query starts empty.
"""

from __future__ import annotations

import concurrent.futures
import threading
from dataclasses import replace
from typing import Hashable

from .request import RequestKey
from .results import CallResult

STAGES_KEPT = 4


class StageAnswers:
    """Requests already sent in one stage (one query's evaluation) by this process, by key."""

    def __init__(self, limit: int = 200_000) -> None:
        self.limit = limit
        self._answers: dict[RequestKey, CallResult | concurrent.futures.Future[CallResult]] = {}
        self._lock = threading.Lock()

    def get(self, key: RequestKey) -> CallResult | concurrent.futures.Future[CallResult] | None:
        return self._answers.get(key)

    def reserve(self, key: RequestKey) -> concurrent.futures.Future[CallResult] | None:
        """Mark ``key`` as in flight; ``None`` past the memory bound (then there is no dedup)."""
        with self._lock:
            if len(self._answers) >= self.limit:  # a bound on memory, not an eviction policy
                return None
            answer: concurrent.futures.Future[CallResult] = concurrent.futures.Future()
            self._answers[key] = answer
            return answer

    def settle(self, key: RequestKey, answer: concurrent.futures.Future[CallResult], result: CallResult) -> None:
        """The answer arrived: rows waiting share it; an ``ok`` one answers later batches too."""
        with self._lock:
            if answer.done():
                return
            kept = replace(result)  # a copy: the row's own result is changed later (its index, a conversion error)
            if self._answers.get(key) is answer:
                if result.ok:
                    self._answers[key] = kept
                else:
                    del self._answers[key]  # a failed request is sent again by a later batch
            answer.set_result(kept)  # rows waiting make their own copies of it

    def abandon(self, key: RequestKey, answer: concurrent.futures.Future[CallResult], why: BaseException) -> None:
        """No answer will come (the batch failed or was cancelled)."""
        with self._lock:
            if answer.done():
                return
            if self._answers.get(key) is answer:
                del self._answers[key]
            answer.set_exception(why)


_STAGES: dict[Hashable, StageAnswers] = {}
_STAGE_LOCK = threading.Lock()


def stage_answers(stage: Hashable | None) -> StageAnswers:
    """The answers of ``stage`` in this process (the last ``STAGES_KEPT`` are kept); ``None``: a
    fresh, empty cache (outside any stage, only rows of one batch share answers)."""
    if stage is None:
        return StageAnswers()
    with _STAGE_LOCK:
        answers = _STAGES.get(stage)
        if answers is None:
            while len(_STAGES) >= STAGES_KEPT:
                _STAGES.pop(next(iter(_STAGES)))
            answers = _STAGES[stage] = StageAnswers()
        return answers


__all__ = ["STAGES_KEPT", "StageAnswers", "stage_answers"]
