"""ai-query's engine-free core: endpoint configs, backends, concurrency, retries, usage.

Nothing here imports pyspark or vllm, so the same code runs in Spark tasks, batch jobs and the
serving endpoint. Quick use::

    from ai_query import AIQueryClient
    client = AIQueryClient()                       # built-in endpoints + $AIQ_ENDPOINTS
    [r] = client.map("local-chat", ["Say hello"], {"max_tokens": 16, "temperature": 0.0})
    r.status, r.value, r.total_tokens
"""

from ._client import AIQueryClient, EndpointClient
from .limits.aimd import AdaptiveConcurrencyLimiter
from .limits.gradient import GradientConcurrencyLimiter
from .config import (
    TASKS,
    ClientConfig,
    EndpointConfig,
    EndpointRegistry,
    ExternalModel,
    LocalModel,
    OpenAIConfig,
    RateLimit,
    ServedEntity,
    VLLMPool,
)
from ._errors import (
    AIQueryError,
    ArgumentError,
    BadRequestError,
    ConfigError,
    ConnectFailedError,
    ConnectionLostError,
    CronError,
    DeltaCommitError,
    EndpointError,
    EndpointOutageError,
    EndpointTimeoutError,
    EndpointUnavailableError,
    LocalEngineError,
    PermanentEndpointError,
    RateLimitedError,
    ReplicaUnavailableError,
    RetryableEndpointError,
    RowFailedError,
    SecretNotFoundError,
    ServingError,
    SystemicEndpointError,
    TransportError,
    TransportTimeoutError,
    UnknownEndpointError,
    UnsupportedFileError,
    recover_error,
)
from ._commands import Command
from ._logging import RedactingFilter, Throttled, get_logger
from ._progress import ProgressCollector, ProgressCounts, ProgressReporter
from .limits.retry import make_retrying
from ._schemas import ModelParameters, ModelResponse, Usage
from .config import resolve_secret
from .batch.pipeline import shared_client
from .batch.results import CallResult, check_exactly_once

from ._version import __version__

__all__ = [
    "AIQueryClient",
    "AIQueryError",
    "AdaptiveConcurrencyLimiter",
    "ArgumentError",
    "BadRequestError",
    "CallResult",
    "ClientConfig",
    "Command",
    "ConfigError",
    "ConnectFailedError",
    "ConnectionLostError",
    "CronError",
    "DeltaCommitError",
    "EndpointClient",
    "EndpointConfig",
    "EndpointError",
    "EndpointOutageError",
    "EndpointRegistry",
    "EndpointTimeoutError",
    "EndpointUnavailableError",
    "ExternalModel",
    "GradientConcurrencyLimiter",
    "LocalEngineError",
    "LocalModel",
    "ModelParameters",
    "ModelResponse",
    "OpenAIConfig",
    "PermanentEndpointError",
    "ProgressCollector",
    "ProgressCounts",
    "ProgressReporter",
    "RateLimit",
    "RateLimitedError",
    "RedactingFilter",
    "ReplicaUnavailableError",
    "RetryableEndpointError",
    "RowFailedError",
    "SecretNotFoundError",
    "ServedEntity",
    "ServingError",
    "SystemicEndpointError",
    "TASKS",
    "Throttled",
    "TransportError",
    "TransportTimeoutError",
    "UnknownEndpointError",
    "UnsupportedFileError",
    "Usage",
    "VLLMPool",
    "check_exactly_once",
    "get_logger",
    "make_retrying",
    "recover_error",
    "resolve_secret",
    "shared_client",
    "__version__",
]
