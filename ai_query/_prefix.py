"""Prefix-aware ordering: send prompts that share a prefix one after another.

A self-hosted engine with a prefix cache (vLLM's automatic prefix caching) computes a shared
prefix once while it stays cached; providers with prompt caching bill cached input for less. Rows
of a table rarely arrive grouped (questions about many documents, per-category instructions,
shuffled partitions), so with more distinct prefixes than the cache holds, input order evicts
each prefix before its next use. Sorting the prompts of a batch puts every group of shared
prefixes together (lexicographic order is trie order), so the engine sees a prefix's rows in one
run. Results still come back in input order: only the dispatch order changes.

``auto`` sorts when it pays: when neighbours in sorted order share, on average, at least
``min_shared_chars`` characters (about one 16-token KV-cache block) and sorting shares more than
the input order already does.
"""

from __future__ import annotations

import os
from typing import Sequence

MODES = ("auto", "on", "off")


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


__all__ = ["MODES", "mean_shared_prefix", "prefix_order"]
