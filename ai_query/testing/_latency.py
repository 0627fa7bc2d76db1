"""How long the simulated model takes to answer: a fixed delay or a seeded distribution.

>>> Latency(0.2)                          # always 200 ms
>>> Latency(0.2, p99_s=0.8)               # lognormal, mean 200 ms, 99th percentile 800 ms
>>> Latency.uniform(0.1, 0.3)             # uniform between 100 and 300 ms
>>> Latency.parse("lognormal:0.2,0.8")    # the CLI spelling of the same
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Literal

LatencyKind = Literal["fixed", "uniform", "lognormal"]

# The standard normal's 99th percentile.
_Z99 = 2.3263478740408408


@dataclass(frozen=True)
class Latency:
    """A latency distribution given by its mean and 99th percentile, in seconds.

    ``kind`` defaults to ``"fixed"`` without ``p99_s`` and to ``"lognormal"`` with it. A uniform
    distribution is the one with that mean and p99 (``Latency.uniform(low, high)`` is easier).
    """

    mean_s: float = 0.0
    p99_s: float | None = None
    kind: LatencyKind | None = None
    _params: tuple[float, float] = field(default=(0.0, 0.0), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        kind = self.kind or ("fixed" if self.p99_s is None else "lognormal")
        object.__setattr__(self, "kind", kind)
        mean, p99 = self.mean_s, self.p99_s
        if not isinstance(mean, (int, float)) or isinstance(mean, bool) or mean < 0 or math.isnan(mean):
            raise ValueError(f"Latency mean_s={mean!r} must be a number of seconds >= 0")
        if kind == "fixed":
            if p99 is not None and p99 != mean:
                raise ValueError(f"a fixed Latency has p99_s == mean_s; got mean_s={mean}, p99_s={p99}. Use kind='lognormal' or 'uniform' for a spread")
            object.__setattr__(self, "_params", (float(mean), float(mean)))
            return
        if kind not in ("uniform", "lognormal"):
            raise ValueError(f"Latency kind={kind!r} is not one of 'fixed', 'uniform', 'lognormal'")
        if p99 is None or p99 < mean:
            raise ValueError(f"a {kind} Latency needs p99_s >= mean_s; got mean_s={mean}, p99_s={p99}")
        if kind == "uniform":
            # Uniform on [a, b]: mean = (a + b) / 2 and p99 = a + 0.99 (b - a).
            width = (p99 - mean) / 0.49
            low = mean - width / 2
            if low < -1e-9:
                raise ValueError(
                    f"no uniform latency >= 0 has mean_s={mean} and p99_s={p99}: lower p99_s to at most {mean + 0.49 * 2 * mean:.4g} "
                    "or use Latency.uniform(low_s, high_s)"
                )
            object.__setattr__(self, "_params", (max(0.0, low), mean + width / 2))
            return
        if mean == 0:
            raise ValueError("a lognormal Latency needs mean_s > 0; use Latency(0) for no latency")
        # Lognormal: mean = exp(mu + s^2 / 2) and p99 = exp(mu + z s), so s^2 / 2 - z s + ln(p99 / mean) = 0.
        ratio = math.log(p99 / mean)
        if ratio > _Z99**2 / 2:
            raise ValueError(
                f"no lognormal latency has p99_s / mean_s = {p99 / mean:.3g}; the largest possible ratio is {math.exp(_Z99**2 / 2):.3g}. "
                "Raise mean_s or lower p99_s"
            )
        sigma = _Z99 - math.sqrt(_Z99**2 - 2 * ratio)
        object.__setattr__(self, "_params", (math.log(mean) - sigma**2 / 2, sigma))

    @classmethod
    def fixed(cls, seconds: float) -> "Latency":
        return cls(seconds)

    @classmethod
    def uniform(cls, low_s: float, high_s: float) -> "Latency":
        """Uniform between ``low_s`` and ``high_s``."""
        if not 0 <= low_s <= high_s:
            raise ValueError(f"Latency.uniform needs 0 <= low_s <= high_s; got low_s={low_s}, high_s={high_s}")
        if low_s == high_s:
            return cls(low_s)
        return cls((low_s + high_s) / 2, low_s + 0.99 * (high_s - low_s), "uniform")

    @classmethod
    def lognormal(cls, mean_s: float, p99_s: float) -> "Latency":
        return cls(mean_s, p99_s, "lognormal")

    @classmethod
    def parse(cls, spec: Any) -> "Latency":
        """A ``Latency``, seconds, ``(kind, params)`` or ``"kind:params"``.

        Params: ``fixed`` seconds, ``uniform`` (low, high), ``lognormal`` (mean, p99).
        """
        if isinstance(spec, Latency):
            return spec
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            return cls(float(spec))
        if isinstance(spec, str):
            kind, _, rest = spec.partition(":")
            if not rest:
                try:
                    return cls(float(kind))
                except ValueError:
                    raise ValueError(f"latency {spec!r} is not seconds or 'kind:params' (e.g. 'lognormal:0.2,0.8')") from None
            try:
                params: Any = tuple(float(p) for p in rest.split(","))
            except ValueError:
                raise ValueError(f"latency {spec!r}: the params after ':' must be numbers (e.g. 'uniform:0.1,0.3')") from None
            spec = (kind.strip(), params)
        if isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str):
            kind, params = spec
            if isinstance(params, (int, float)):
                params = (params,)
            params = tuple(params)
            expected = {"fixed": 1, "uniform": 2, "lognormal": 2}
            if kind not in expected:
                raise ValueError(f"latency kind {kind!r} is not one of 'fixed', 'uniform', 'lognormal'")
            if len(params) != expected[kind]:
                what = {"fixed": "(seconds,)", "uniform": "(low_s, high_s)", "lognormal": "(mean_s, p99_s)"}[kind]
                raise ValueError(f"latency {kind!r} takes {what}; got {params!r}")
            return {"fixed": cls.fixed, "uniform": cls.uniform, "lognormal": cls.lognormal}[kind](*params)
        raise ValueError(
            f"latency={spec!r} is not a Latency, seconds, (kind, params) or 'kind:params'; e.g. Latency(0.2, p99_s=0.8) or ('uniform', (0.1, 0.3))"
        )

    def sample(self, rng: random.Random) -> float:
        """One delay in seconds (``rng`` makes the sequence reproducible)."""
        a, b = self._params
        if self.kind == "fixed":
            return a
        if self.kind == "uniform":
            return rng.uniform(a, b)
        return rng.lognormvariate(a, b)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "mean_s": self.mean_s, "p99_s": self.p99_s if self.kind != "fixed" else self.mean_s}
