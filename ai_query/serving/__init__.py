"""The serving endpoint: the batch code path answering single requests in real time.

``ai-query serve`` (or ``python -m ai_query.serving``) runs it on uvicorn; ``ServingServer`` runs
it in a background thread. Routes, auth and rate limits: see ``ai_query.serving._app``. Starlette
and uvicorn are imported only when an app is built, so ``import ai_query`` stays light.
"""

from .._errors import RateLimitedError, ServingError
from ._app import ServingApp
from ._auth import LEVELS, Principal, TokenAuthenticator
from ._ratelimit import RateLimiter
from ._server import ServingServer, build_app, mask_text, serve_main
from ._store import EndpointStore, masked

RateLimited = RateLimitedError
"""The old name of a refusal by ``RateLimiter`` (exported before the error tree was one)."""

__all__ = [
    "EndpointStore",
    "LEVELS",
    "Principal",
    "RateLimited",
    "RateLimitedError",
    "RateLimiter",
    "ServingApp",
    "ServingError",
    "ServingServer",
    "TokenAuthenticator",
    "build_app",
    "mask_text",
    "masked",
    "serve_main",
]
