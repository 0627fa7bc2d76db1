"""Backends: the plug-in seam for every kind of served entity (see ``_protocol`` and ``_registry``).

The core ships the ``openai``, ``anthropic``, ``databricks-model-serving`` and ``mlflow``
backends; other packages register theirs in the ``ai_query.backends`` entry-point group.
The names below are the public API a backend package builds on.
"""

from ._batch_api import LIMITS as BATCH_LIMITS, BatchLine, BatchState, ProviderBatches, provider_of
from ._custom import ModelContract, check_params
from ._http_common import PATHS, bearer, llm_v1_body, malformed_answer, parse_openai_shape, parse_retry_after, raise_for_status
from ._mlflow import model_contract
from ._openai import OpenAICompatibleBackend
from ._protocol import Backend, BackendBase, BatchContext, Capabilities, HTTPRequest
from ._registry import (
    ENTRY_POINT_GROUP,
    backend_class,
    backend_for,
    capabilities_of,
    entity_kind,
    local_model_folder,
    prepare,
    register,
    validate_options,
)

__all__ = [
    "BATCH_LIMITS",
    "BatchLine",
    "BatchState",
    "ProviderBatches",
    "provider_of",
    "ENTRY_POINT_GROUP",
    "PATHS",
    "Backend",
    "BackendBase",
    "BatchContext",
    "Capabilities",
    "HTTPRequest",
    "ModelContract",
    "OpenAICompatibleBackend",
    "backend_class",
    "backend_for",
    "bearer",
    "check_params",
    "capabilities_of",
    "entity_kind",
    "llm_v1_body",
    "local_model_folder",
    "malformed_answer",
    "model_contract",
    "parse_openai_shape",
    "parse_retry_after",
    "prepare",
    "raise_for_status",
    "register",
    "validate_options",
]
