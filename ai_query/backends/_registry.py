"""Which backend serves which kind of served entity: the core's built-ins plus entry points.

The registry is keyed by the served entity's kind (``entity_kind``): ``openai``, ``anthropic``,
``databricks-model-serving`` (the ``external_model`` providers), ``mlflow``, and the kinds other
packages add through the ``ai_query.backends`` entry-point group (``gpu_workers`` registers
``local_model`` and ``vllm_pool``)::

    [project.entry-points."ai_query.backends"]
    vllm_pool = "gpu_workers._backends:VLLMPoolBackend"

Each kind's class is imported when that kind is first used, never at ``import ai_query``, so the
core stays free of the engine packages and of mlflow.
"""

from __future__ import annotations

import importlib
import threading
from pathlib import Path
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Mapping

from .._errors import ConfigError
from ._protocol import Backend, Capabilities

if TYPE_CHECKING:
    from ..config import ServedEntity

ENTRY_POINT_GROUP = "ai_query.backends"

_BUILT_IN: dict[str, str] = {
    "openai": "ai_query.backends._openai:OpenAICompatibleBackend",
    "anthropic": "ai_query.backends._anthropic:AnthropicBackend",
    "databricks-model-serving": "ai_query.backends._serving_endpoint:ServingEndpointBackend",
    "mlflow": "ai_query.backends._mlflow:MLflowPyfuncBackend",
}

_PROVIDED_BY: dict[str, tuple[str, str]] = {
    "local_model": ("gpu_workers", "ai-query[local]"),
    "vllm_pool": ("gpu_workers", "ai-query[local]"),
}
"""Kinds the core knows of but does not ship: the package that registers each, and the extra."""

_classes: dict[str, type] = {}
_lock = threading.Lock()


def entity_kind(entity: ServedEntity) -> str:
    """The registry key of a served entity."""
    if entity.external_model is not None:  # one kind per provider
        return entity.external_model.provider
    return entity.kind


def backend_class(kind: str) -> type:
    """The backend class registered for ``kind``; ``ConfigError`` naming what to install if none is."""
    cls = _classes.get(kind)
    if cls is None:
        with _lock:
            cls = _classes.get(kind)
            if cls is None:
                if kind in _BUILT_IN:
                    module, _, attr = _BUILT_IN[kind].partition(":")
                    cls = getattr(importlib.import_module(module), attr)
                else:
                    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == kind]
                    if not found:
                        raise ConfigError(_missing(kind))
                    cls = found[0].load()
                _classes[kind] = cls
    return cls


def _missing(kind: str) -> str:
    package, extra = _PROVIDED_BY.get(kind, (None, None))
    installed = sorted({*_BUILT_IN, *(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))})
    if package is not None:
        return (f"no backend is installed for served entities of kind {kind!r}: the {package} package registers it "
                f"(entry-point group {ENTRY_POINT_GROUP!r}); install it with: pip install '{extra}'")
    return (f"no backend is installed for served entities of kind {kind!r} (installed: {', '.join(installed)}); "
            f"install the package that registers it in the entry-point group {ENTRY_POINT_GROUP!r}")


def register(kind: str, cls: type) -> None:
    """Register (or replace) the backend class of ``kind`` in this process (tests, embedding)."""
    with _lock:
        _classes[kind] = cls


def backend_for(entity: ServedEntity) -> Backend:
    return backend_class(entity_kind(entity)).for_entity(entity)


def capabilities_of(entity: ServedEntity) -> Capabilities:
    return backend_for(entity).capabilities


def validate_options(kind: str, options: Mapping[str, Any], path: str) -> None:
    """Check the engine options of a served entity of ``kind`` on the driver, always.

    Options of a kind whose backend is not installed cannot be checked, so they are refused with
    what to install; a kind without options needs no backend to be read.
    """
    if not options:
        return
    try:
        cls = backend_class(kind)
    except ConfigError as exc:
        raise ConfigError(f"{path}: cannot check the engine options {sorted(options)}: {exc}") from None
    cls.validate_options(options, path)


def local_model_folder(model: str) -> Path | None:
    """The folder of ``model`` if it is an alias the ``local_model`` backend knows (None otherwise,
    also when no such backend is installed)."""
    try:
        cls = backend_class("local_model")
    except ConfigError:
        return None
    return cls.model_folder(model)


def prepare(entity: ServedEntity) -> None:
    """Start or attach what ``entity`` needs on this node, blocking (the driver calls it before tasks run)."""
    backend_class(entity_kind(entity)).prepare(entity)
