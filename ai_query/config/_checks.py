"""The base of every config value, and the checks that turn a bad value into a message.

Each config is a ``ConfigStruct``: a frozen msgspec ``Struct`` that refuses unknown fields, whose
bounds and choices are written in its annotations (``Annotated[int, Meta(ge=1)]``, ``Literal``).
They are checked when the value is built, whatever builds it: ``from_dict`` on the driver, direct
construction in code, ``msgspec.structs.replace``, unpickling on an executor. A config's
cross-field rules live in its ``_check(path)``.

Every message names the field by its path, the value and the fix, e.g.
``endpoints[0]['chat'].client_config.max_concurrency must be >= 1, got 0``. The path is the one
``from_dict`` was given (set around the construction by ``building(path)``); a config built
directly is named by its class (``ClientConfig.max_concurrency ...``). msgspec's own
``ValidationError`` never reaches a user: ``decode`` translates it into the same text.
"""

from __future__ import annotations

import re
import types
import typing
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cache
from typing import Annotated, Any, Iterable, Iterator, Literal, Mapping, Union, get_args, get_origin

import msgspec
from msgspec import Meta

from .._errors import ConfigError

_PATH: ContextVar[str | None] = ContextVar("ai_query_config_path", default=None)

NonEmpty = Annotated[str, Meta(pattern=r"\S", description="a non-empty string")]
HttpUrl = Annotated[str, Meta(pattern=r"^https?://", description="an http(s) URL")]
Task = Literal["llm/v1/chat", "llm/v1/completions", "llm/v1/embeddings"]
TASKS: tuple[str, ...] = get_args(Task)


@contextmanager
def building(path: str) -> Iterator[None]:
    """Name the config built inside this block by ``path`` in its error messages."""
    token = _PATH.set(path)
    try:
        yield
    finally:
        _PATH.reset(token)


class ConfigStruct(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A frozen config value, checked at construction (see the module docstring)."""

    def __post_init__(self) -> None:
        path = _PATH.get() or type(self).__name__
        # the path is for this config only: configs built inside _check (none today) name themselves
        token = _PATH.set(None)
        try:
            for name, annotation in _field_types(type(self)).items():
                problem = value_problem(getattr(self, name), annotation)
                if problem is not None:
                    raise ConfigError(f"{self._field_path(path, name)} {problem}")
            self._check(path)
        finally:
            _PATH.reset(token)

    def _check(self, path: str) -> None:
        """Cross-field rules of this config; raise ``ConfigError`` naming ``path``."""

    @classmethod
    def _field_path(cls, path: str, name: str) -> str:
        """How messages name field ``name`` of the config at ``path`` (a file format may spell it otherwise)."""
        return f"{path}.{name}"

    def __repr__(self) -> str:
        # plain-text credentials (``*_plaintext``) are never shown
        fields = ", ".join(
            f"{name}={'********' if name.endswith('_plaintext') and value is not None else repr(value)}"
            for name, value in ((n, getattr(self, n)) for n in self.__struct_fields__)
        )
        return f"{type(self).__name__}({fields})"

    def replace(self, **changes: Any) -> Any:
        """A copy with ``changes``, checked like any new config."""
        return msgspec.structs.replace(self, **changes)


@cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls, include_extras=True)
    return {name: hints[name] for name in cls.__struct_fields__}  # type: ignore[attr-defined]


def value_problem(value: Any, annotation: Any) -> str | None:
    """What is wrong with ``value`` for a field typed ``annotation`` (``None``: nothing), as the
    end of a sentence that starts with the field's path."""
    meta: Meta | None = None
    if get_origin(annotation) is Annotated:
        annotation, *extras = get_args(annotation)
        meta = next((m for m in extras if isinstance(m, Meta)), None)
    origin = get_origin(annotation)
    if value is None and origin not in (Union, types.UnionType) and annotation is not Any:
        return f"is required ({meta.description})" if meta is not None and meta.description else "is required"
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(annotation) if a is not type(None)]
        if value is None:
            return None if len(options) < len(get_args(annotation)) else "is required"
        problems = [value_problem(value, a) for a in options]
        if any(p is None for p in problems):
            return None
        return f"must be {meta.description}, got {value!r:.80}" if meta is not None and meta.description else problems[0]
    if origin is Literal:
        choices = get_args(annotation)
        return None if value in choices else f"is {value!r}; use one of {', '.join(map(str, choices))}"
    if annotation is Any:
        return None
    if annotation is bool:
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if annotation in (int, float):
        return _number_problem(value, annotation, meta)
    if annotation is str:
        if not isinstance(value, str) or (meta is not None and meta.pattern and not re.search(meta.pattern, value)):
            return f"must be {meta.description if meta and meta.description else 'a string'}, got {value!r:.80}"
        return None
    if origin is dict or annotation is dict:
        return None if isinstance(value, dict) else f"must be a table, got {value!r:.80}"
    if origin is tuple or annotation is tuple:
        return None if isinstance(value, tuple) else f"must be a list, got {value!r:.80}"
    if isinstance(annotation, type) and not isinstance(value, annotation):
        return f"must be {_article(annotation.__name__)}, got {value!r:.80}"
    return None


def _number_problem(value: Any, kind: type, meta: Meta | None) -> str | None:
    low = meta.ge if meta is not None else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        if meta is not None and meta.description:
            return f"must be {meta.description}, got {value!r}"
        what = "an integer" if kind is int else "a number"
        return f"must be {what}{f' >= {low}' if low is not None else ''}, got {value!r}"
    if meta is None or (
        (low is None or value >= low) and (meta.gt is None or value > meta.gt) and (meta.le is None or value <= meta.le)
    ):
        return None
    return f"must be {meta.description}, got {value!r}" if meta.description else f"must be >= {low}, got {value!r}"


def _article(name: str) -> str:
    return f"an {name}" if name[:1].lower() in "aeiou" else f"a {name}"


def mapping(value: Any, path: str) -> Mapping[str, Any]:
    """``value`` as a JSON object, or an error naming ``path``."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path}: expected a JSON object, got {type(value).__name__} {value!r:.80}")
    return value


def check_keys(data: Mapping[str, Any], allowed: Iterable[str], path: str) -> None:
    """Refuse unknown fields, listing all of them and the allowed ones."""
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{path}: unknown field(s) {', '.join(map(repr, unknown))}; allowed fields are "
            f"{', '.join(sorted(allowed))}. Fix the spelling or remove the field."
        )


_AT = re.compile(r"at `\$\.(\w+)")
_MISSING = re.compile(r"missing required field `(\w+)`")


def decode(cls: type[Any], data: Any, path: str, *, accepted: Iterable[str] = ()) -> Any:
    """Build ``cls`` from the JSON object ``data``, every error in our words naming ``path``.

    ``accepted``: further keys that are allowed and ignored (the Databricks format has some).
    """
    data = mapping(data, path)
    check_keys(data, (*cls.__struct_fields__, *accepted), path)
    fields = {k: v for k, v in data.items() if k in cls.__struct_fields__}
    with building(path):
        try:
            return msgspec.convert(fields, cls)
        except msgspec.ValidationError as exc:
            raise ConfigError(_translate(str(exc), cls, fields, path)) from None


def _translate(message: str, cls: type, data: Mapping[str, Any], path: str) -> str:
    missing = _MISSING.search(message)
    if missing:
        return f"{path}.{missing.group(1)} is required"
    at = _AT.search(message)
    if at and at.group(1) in data:
        name = at.group(1)
        problem = value_problem(data[name], _field_types(cls)[name])
        if problem is not None:
            return f"{path}.{name} {problem}"
        return f"{path}.{name}: {message.split(' - at ')[0]}, got {data[name]!r:.80}"
    return f"{path}: {message}"
