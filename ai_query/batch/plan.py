"""[2 plan] Which rows go out together, which share an answer, and in which order they are sent.

* ``group_rows``: rows of one Arrow batch grouped by (endpoint, model parameters, response
  format), each row with its ``RequestKey``. Rows mostly repeat the row before (a literal
  parameter column), so a row's parameters are compared with the row before, not re-encoded.
* ``plan_group``: dedup inside a group. An identical request is sent once; its copies share the
  answer, whether the first is in this batch or an earlier batch of the stage (``StageAnswers``,
  settled or still in flight).
* ``prefix_order``: the dispatch order of a group's prompts, so that prompts sharing a prefix
  are sent one after another.

Prefix order: a self-hosted engine with a prefix cache (vLLM's automatic prefix caching) computes
a shared prefix once while it stays cached; providers with prompt caching bill cached input for
less. Rows of a table rarely arrive grouped (questions about many documents, per-category
instructions, shuffled partitions), so with more distinct prefixes than the cache holds, input
order evicts each prefix before its next use. Sorting the prompts of a batch puts every group of
shared prefixes together (lexicographic order is trie order), so the engine sees a prefix's rows
in one run. Results still come back in input order: only the dispatch order changes. ``auto``
sorts when it pays: when neighbours in sorted order share, on average, at least
``min_shared_chars`` characters (about one 16-token KV-cache block) and sorting shares more than
the input order already does.
"""

from __future__ import annotations

import concurrent.futures
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from .answers import StageAnswers
from .request import RequestKey, canonical_json
from .results import CallResult

MODES = ("auto", "on", "off")


@dataclass
class RowGroup:
    """Rows that go to one endpoint with equal parameters and response format."""

    endpoint: Any
    """The endpoint's name; ``None`` when the rows' endpoint argument is NULL (nothing is sent)."""
    params: Any
    """The rows' model parameters (equal for every row; the first row's)."""
    response_format: Any
    rows: list[int] = field(default_factory=list)
    keys: list[RequestKey] = field(default_factory=list)
    """``keys[k]`` is the request key of ``rows[k]`` (empty when ``endpoint`` is ``None``)."""


def group_rows(endpoints: Sequence[Any], requests: Sequence[Any], params: Sequence[Any],
               response_formats: Sequence[Any]) -> list[RowGroup]:
    """The rows grouped by (endpoint, parameters, response format), in order of first appearance."""
    groups: dict[tuple[Any, str, str], RowGroup] = {}
    group: RowGroup | None = None
    for i in range(len(requests)):
        if group is None or endpoints[i] != endpoints[i - 1] or params[i] != params[i - 1] \
                or response_formats[i] != response_formats[i - 1]:
            params_json, format_json = canonical_json(params[i]), canonical_json(response_formats[i])
            id_ = (endpoints[i], params_json, format_json)
            group = groups.get(id_)
            if group is None:
                group = groups[id_] = RowGroup(endpoints[i], params[i], response_formats[i])
        group.rows.append(i)
        if group.endpoint is not None:
            group.keys.append(RequestKey(group.endpoint, params_json, format_json, canonical_json(requests[i])))
    return list(groups.values())


@dataclass
class GroupPlan:
    """What happens to each row of a group (see ``plan_group``)."""

    send: list[int] = field(default_factory=list)
    """Rows whose request goes out (unless a journal answers it): the first of each request."""
    keys: dict[int, RequestKey] = field(default_factory=dict)
    """The request key of every row in ``send``."""
    shareable: set[int] = field(default_factory=set)
    """Rows of ``send`` whose answer later batches of the stage may share (dedup on, a request)."""
    copies: list[tuple[int, int]] = field(default_factory=list)
    """(row, the earlier row of this batch whose identical request is sent)."""
    cached: list[tuple[int, CallResult | concurrent.futures.Future[CallResult]]] = field(default_factory=list)
    """(row, the answer an earlier batch of the stage got, or a future of it while in flight)."""


def plan_group(group: RowGroup, requests: Sequence[Any], answers: StageAnswers, deduplicate: bool) -> GroupPlan:
    """Dedup the group's rows: the first of each request is sent, identical ones share its answer.

    With ``deduplicate`` off (sampling at a temperature above 0) every row is sent. A NULL
    request is never shared: it is sent (and fails as a row error) for each row.
    """
    plan = GroupPlan()
    first_of: dict[RequestKey, int] = {}
    for i, key in zip(group.rows, group.keys):
        shared = deduplicate and requests[i] is not None
        if shared and key in first_of:
            plan.copies.append((i, first_of[key]))
            continue
        first_of[key] = i
        if shared and (hit := answers.get(key)) is not None:
            plan.cached.append((i, hit))
            continue
        plan.send.append(i)
        plan.keys[i] = key
        if shared:
            plan.shareable.add(i)
    return plan


def _shared(a: str, b: str) -> int:
    return len(os.path.commonprefix((a, b)))


def mean_shared_prefix(texts: Sequence[str], order: Sequence[int]) -> float:
    """Mean characters shared by consecutive prompts in ``order``."""
    if len(order) < 2:
        return 0.0
    return sum(_shared(texts[a], texts[b]) for a, b in zip(order, order[1:])) / (len(order) - 1)


def prefix_order(texts: Sequence[str], mode: str = "auto", *, min_shared_chars: int = 64) -> list[int] | None:
    """The dispatch order for ``texts`` (indices), or ``None`` to keep input order."""
    if mode not in MODES:
        raise ValueError(f"prefix ordering {mode!r} is not one of {MODES}")
    if mode == "off" or len(texts) < 3:
        return None
    order = sorted(range(len(texts)), key=texts.__getitem__)
    if mode == "on":
        return order
    sorted_share = mean_shared_prefix(texts, order)
    if sorted_share < min_shared_chars:
        return None
    if mean_shared_prefix(texts, range(len(texts))) >= sorted_share:  # already grouped
        return None
    return order


__all__ = ["MODES", "GroupPlan", "RowGroup", "group_rows", "mean_shared_prefix", "plan_group", "prefix_order"]
