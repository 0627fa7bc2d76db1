"""Request parameters, usage and responses of the ``llm/v1/*`` tasks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Mapping

from ._errors import ArgumentError

_PARAMETER_TYPES: dict[str, tuple[type, ...]] = {
    "max_tokens": (int,),
    "temperature": (int, float),
    "top_p": (int, float),
    "top_k": (int,),
    "stop": (str, list, tuple),
    "presence_penalty": (int, float),
    "frequency_penalty": (int, float),
    "seed": (int,),
    "logprobs": (bool,),
    "top_logprobs": (int,),
}
_RANGES: dict[str, tuple[float, float]] = {
    "max_tokens": (1, 1_000_000),
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "top_k": (-1, 1_000_000),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
    "top_logprobs": (0, 20),
}


@dataclass(frozen=True)
class ModelParameters:
    """Validated generation parameters (``modelParameters => named_struct(...)``)."""

    values: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def from_mapping(cls, params: Mapping[str, Any] | None, *, custom: bool = False) -> "ModelParameters":
        """Validate names, types and ranges; an ``ArgumentError`` names the parameter and the fix.

        ``custom``: for a custom model, whose signature declares its own params (``threshold``):
        names outside the ``llm/v1`` set are kept as given (Decimals as floats) for the model's
        backend to check against the signature; the ``llm/v1`` names are still checked here.
        """
        if not params:
            return cls()
        out: dict[str, Any] = {}
        for name, value in params.items():
            if value is None:
                continue
            if custom and name not in _PARAMETER_TYPES:
                if isinstance(value, Decimal):
                    value = float(value)
                out[name] = tuple(value) if isinstance(value, list) else value
                continue
            if name not in _PARAMETER_TYPES:
                raise ArgumentError(
                    f"modelParameters: unknown parameter {name!r}; supported are {', '.join(sorted(_PARAMETER_TYPES))}"
                )
            if isinstance(value, Decimal):  # named_struct('temperature', 0.0) arrives as DECIMAL(1,1)
                value = float(value)
            if isinstance(value, float) and value.is_integer() and _PARAMETER_TYPES[name] == (int,):
                value = int(value)
            expected = _PARAMETER_TYPES[name]
            if isinstance(value, bool) and bool not in expected:
                raise ArgumentError(f"modelParameters.{name} must be a number, got {value!r}")
            if not isinstance(value, expected):
                kinds = " or ".join(t.__name__ for t in expected)
                raise ArgumentError(f"modelParameters.{name} must be {kinds}, got {type(value).__name__} {value!r:.60}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ArgumentError(f"modelParameters.{name} must be finite, got {value!r}")
            if name in _RANGES and not isinstance(value, bool):
                low, high = _RANGES[name]
                if not low <= value <= high:
                    raise ArgumentError(f"modelParameters.{name} must be between {low} and {high}, got {value!r}")
            if name == "stop":
                stops = [value] if isinstance(value, str) else list(value)
                if not all(isinstance(s, str) for s in stops):
                    raise ArgumentError(f"modelParameters.stop must be a string or a list of strings, got {value!r:.60}")
                value = tuple(stops)
            out[name] = value
        return cls(tuple(sorted(out.items())))

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.values}


@dataclass(frozen=True)
class Usage:
    """Token usage of one request; ``estimated`` when the endpoint sent none."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    estimated: bool = False

    @classmethod
    def from_payload(cls, usage: Any, prompt_text: str, completion_text: str) -> "Usage":
        if isinstance(usage, Mapping) and isinstance(usage.get("prompt_tokens", usage.get("input_tokens")), int):
            prompt = int(usage.get("prompt_tokens", usage.get("input_tokens")) or 0)
            completion = int(usage.get("completion_tokens", usage.get("output_tokens")) or 0)
            total = int(usage.get("total_tokens") or prompt + completion)
            return cls(prompt, completion, total, False)
        return cls.estimate(prompt_text, completion_text)

    @classmethod
    def estimate(cls, prompt_text: str, completion_text: str) -> "Usage":
        """(characters + 1) / 4 tokens each way, the usual rule of thumb for English text."""
        prompt = (len(prompt_text) + 1) // 4
        completion = (len(completion_text) + 1) // 4 if completion_text else 0
        return cls(prompt, completion, prompt + completion, True)


@dataclass(frozen=True)
class ModelResponse:
    """What one successful call returned."""

    value: Any
    """The text (chat, completions) or the vector (embeddings)."""
    usage: Usage
    model: str | None = None
    request_id: str | None = None
    finish_reason: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    prediction: Any = None
    """What a custom model returned for the row when it is not ``value`` itself: a one-column
    DataFrame's record ``{"column": value}``, which MLflow's scoring server answers."""
