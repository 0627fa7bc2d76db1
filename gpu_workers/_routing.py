"""Routing over the replicas of a node's vLLM pool (the ``vllm_pool`` backend's router).

``PrefixAffinityRouter`` picks a replica for each request. It keeps, per replica, the requests
this process has outstanding there and a bounded memory of the prompt prefixes it has sent
there, as a chain of block hashes (block ``k`` hashes the prompt's first ``k`` blocks of
``block_chars`` characters, so two prompts share hash ``k`` exactly when they share their first
``k`` blocks, as in vLLM's own prefix cache)::

    match(r)  = leading blocks of the prompt that replica r has seen
    least     = fewest outstanding requests among the ready replicas
    warm      = the replica with the longest match (ties: fewest outstanding)
    cold      = rendezvous hash of the first block over the replicas (the same in every process)
    pick      = warm if match > 0 and outstanding(warm) <= least + max_imbalance
                else cold if outstanding(cold) <= least + max_imbalance
                else least (round robin among equals)

so requests that share a prefix go to the replica whose KV cache already holds it, until that
replica has ``max_imbalance`` more requests outstanding than the idlest one; then the prefix
spreads to a second replica, which remembers it too. Prompts shorter than one block have no
prefix worth sharing and go to the least loaded replica.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Sequence

__all__ = ["PrefixAffinityRouter", "prefix_hashes"]


def prefix_hashes(text: str, block_chars: int, limit: int = 64) -> list[bytes]:
    """Chain hashes of the prompt's full leading blocks (at most ``limit``)."""
    out: list[bytes] = []
    previous = b""
    for k in range(min(len(text) // block_chars, limit)):
        previous = hashlib.blake2b(previous + text[k * block_chars:(k + 1) * block_chars].encode(), digest_size=8).digest()
        out.append(previous)
    return out


@dataclass
class _Replica:
    url: str
    outstanding: int = 0
    sent: int = 0
    down_until: float = 0.0
    seen: OrderedDict[bytes, None] = field(default_factory=OrderedDict)


class PrefixAffinityRouter:
    """Least outstanding requests with prefix affinity over a changing set of replica URLs.

    Thread-safe; the clock is injected so tests need no real time.
    """

    def __init__(self, block_chars: int = 256, max_imbalance: int = 8, *, memory: int = 50_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if block_chars < 1 or max_imbalance < 0 or memory < 1:
            raise ValueError(f"need block_chars >= 1 ({block_chars}), max_imbalance >= 0 ({max_imbalance}), memory >= 1 ({memory})")
        self.block_chars = block_chars
        self.max_imbalance = max_imbalance
        self.memory = memory
        self._clock = clock
        self._replicas: dict[str, _Replica] = {}
        self._ready: list[str] = []
        self._round_robin = 0
        self._lock = threading.Lock()

    def set_ready(self, urls: Sequence[str]) -> None:
        """The replicas that take requests now; counts and memories of known ones are kept."""
        with self._lock:
            for url in urls:
                self._replicas.setdefault(url, _Replica(url))
            self._ready = list(urls)

    def mark_down(self, url: str, seconds: float) -> None:
        """Take a replica out of rotation for ``seconds`` (it refused a connection); forget its cache."""
        with self._lock:
            replica = self._replicas.get(url)
            if replica is not None:
                replica.down_until = self._clock() + seconds
                replica.seen.clear()  # a restarted engine starts with an empty cache

    def available(self) -> list[str]:
        now = self._clock()
        with self._lock:
            return [u for u in self._ready if self._replicas[u].down_until <= now]

    def pick(self, prompt_text: str) -> str | None:
        """The replica for this prompt (its outstanding count is taken); None if none is available."""
        hashes = prefix_hashes(prompt_text, self.block_chars)
        now = self._clock()
        with self._lock:
            live = [self._replicas[u] for u in self._ready if self._replicas[u].down_until <= now]
            if not live:
                return None
            least = min(r.outstanding for r in live)
            ceiling = least + self.max_imbalance
            chosen: _Replica | None = None
            if hashes:
                best, best_match = None, 0
                for r in live:
                    match = 0
                    for h in hashes:
                        if h not in r.seen:
                            break
                        match += 1
                    if match > best_match or (match == best_match and match and best is not None and r.outstanding < best.outstanding):
                        best, best_match = r, match
                if best is not None and best_match and best.outstanding <= ceiling:
                    chosen = best
                else:
                    cold = max(live, key=lambda r: hashlib.blake2b(hashes[0] + r.url.encode(), digest_size=8).digest())
                    if cold.outstanding <= ceiling:
                        chosen = cold
            if chosen is None:
                idlest = [r for r in live if r.outstanding == least]
                chosen = idlest[self._round_robin % len(idlest)]
                self._round_robin += 1
            chosen.outstanding += 1
            chosen.sent += 1
            for h in hashes:
                chosen.seen[h] = None
                chosen.seen.move_to_end(h)
            while len(chosen.seen) > self.memory:
                chosen.seen.popitem(last=False)
            return chosen.url

    def done(self, url: str) -> None:
        with self._lock:
            replica = self._replicas.get(url)
            if replica is not None and replica.outstanding > 0:
                replica.outstanding -= 1

    def outstanding(self) -> dict[str, int]:
        with self._lock:
            return {u: r.outstanding for u, r in self._replicas.items()}

    def sent(self) -> dict[str, int]:
        """Requests sent to each replica so far (for tests and benchmarks)."""
        with self._lock:
            return {u: r.sent for u, r in self._replicas.items()}
