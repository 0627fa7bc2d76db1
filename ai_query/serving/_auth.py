"""Bearer tokens and per-endpoint permission levels of the serving endpoint.

A tokens file (``--tokens FILE``, or ``AIQ_SERVING_TOKENS_FILE``) or the environment
(``AIQ_SERVING_TOKENS``: the same JSON inline; ``AIQ_SERVING_TOKEN``: one token with
``CAN_MANAGE`` on everything) lists who may do what::

    {"tokens": [
        {"user": "alice@example.com", "token": "{{secrets/serving/alice}}", "permissions": {"*": "CAN_MANAGE"}},
        {"user": "bob@example.com",   "token": "dapi-bob-1234",            "permissions": {"chat": "CAN_QUERY"}}
    ]}

``permissions`` maps an endpoint name (``"*"``: every endpoint) to ``CAN_QUERY`` (query it) or
``CAN_MANAGE`` (also create it, change its config, rate limits and tags, delete it). The creator
of an endpoint can manage it. Tokens may be secret references, resolved once at start-up; they
are kept only as SHA-256 digests and are never logged or echoed. With no tokens configured,
authentication is off and every caller is ``anonymous`` with ``CAN_MANAGE`` (for a laptop only).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .._errors import ConfigError, ServingError
from ..config import is_secret_ref, resolve_secret

LEVELS: dict[str, int] = {"CAN_QUERY": 1, "CAN_MANAGE": 2}
"""Permission levels, weakest first."""


@dataclass(frozen=True)
class Principal:
    """Who sent a request, and the levels their token grants by endpoint name."""

    user: str
    grants: Mapping[str, str] = field(default_factory=dict)

    def level(self, endpoint: str, creator: str | None = None) -> str | None:
        """This principal's level on ``endpoint`` (``None``: no access)."""
        levels = [self.grants.get(endpoint), self.grants.get("*"), "CAN_MANAGE" if creator is not None and creator == self.user else None]
        known = [lvl for lvl in levels if lvl is not None]
        return max(known, key=LEVELS.__getitem__) if known else None

    def require(self, needed: str, endpoint: str, creator: str | None = None) -> str:
        """The principal's level, or ``ServingError(403)`` naming what is missing."""
        level = self.level(endpoint, creator)
        if level is None or LEVELS[level] < LEVELS[needed]:
            has = f"has {level}" if level else "has no permission"
            raise ServingError(403, "PERMISSION_DENIED",
                            f"user {self.user!r} {has} on serving endpoint {endpoint!r}; this needs {needed}. "
                            "Ask an owner to grant it in the server's tokens file.")
        return level


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenAuthenticator:
    """Maps ``Authorization: Bearer <token>`` to a ``Principal``."""

    def __init__(self, entries: list[Mapping[str, Any]] | None = None, *, source: str = "tokens") -> None:
        self.enabled = entries is not None
        self._by_digest: dict[str, Principal] = {}
        for i, entry in enumerate(entries or []):
            path = f"{source}.tokens[{i}]"
            if not isinstance(entry, Mapping):
                raise ConfigError(f"{path} must be an object with user, token and permissions")
            unknown = sorted(set(entry) - {"user", "token", "permissions"})
            if unknown:
                raise ConfigError(f"{path}: unknown field(s) {unknown}; allowed are user, token, permissions")
            user, token = entry.get("user"), entry.get("token")
            if not isinstance(user, str) or not user:
                raise ConfigError(f"{path}.user must be a non-empty string (a user or service principal name)")
            if not isinstance(token, str) or not token:
                raise ConfigError(f"{path}.token must be a non-empty string or a {{{{secrets/scope/key}}}} reference")
            if is_secret_ref(token):
                token = resolve_secret(token)
            grants = entry.get("permissions", {})
            if not isinstance(grants, Mapping) or any(v not in LEVELS for v in grants.values()):
                bad = (f", got {grants!r}" if not isinstance(grants, Mapping) else
                       "".join(f", got {v!r} for {k!r}" for k, v in grants.items() if v not in LEVELS)[:200])
                raise ConfigError(f"{path}.permissions must map endpoint names (or '*') to one of {', '.join(LEVELS)}{bad}")
            digest = _digest(token)
            if digest in self._by_digest:
                raise ConfigError(f"{path}: this token is already given to user {self._by_digest[digest].user!r}; tokens must be unique")
            self._by_digest[digest] = Principal(user, dict(grants))

    @classmethod
    def from_sources(cls, tokens_file: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> "TokenAuthenticator":
        """From ``tokens_file``, else ``AIQ_SERVING_TOKENS_FILE`` / ``AIQ_SERVING_TOKENS`` / ``AIQ_SERVING_TOKEN``."""
        env = os.environ if env is None else env
        tokens_file = tokens_file or env.get("AIQ_SERVING_TOKENS_FILE")
        if tokens_file:
            p = Path(tokens_file)
            try:
                data = json.loads(p.read_text())
            except OSError as exc:
                raise ConfigError(f"cannot read the tokens file {p}: {exc.strerror}") from exc
            except ValueError as exc:
                raise ConfigError(f"the tokens file {p} is not valid JSON: {exc}") from exc
            return cls(_entries(data, str(p)), source=str(p))
        if env.get("AIQ_SERVING_TOKENS"):
            try:
                data = json.loads(env["AIQ_SERVING_TOKENS"])
            except ValueError as exc:
                raise ConfigError(f"AIQ_SERVING_TOKENS is not valid JSON: {exc}") from exc
            return cls(_entries(data, "AIQ_SERVING_TOKENS"), source="AIQ_SERVING_TOKENS")
        if env.get("AIQ_SERVING_TOKEN"):
            return cls([{"user": "admin", "token": env["AIQ_SERVING_TOKEN"], "permissions": {"*": "CAN_MANAGE"}}], source="AIQ_SERVING_TOKEN")
        return cls(None)

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal of an ``Authorization`` header value; ``ServingError(401)`` otherwise."""
        if not self.enabled:
            return Principal("anonymous", {"*": "CAN_MANAGE"})
        if not authorization:
            raise ServingError(401, "UNAUTHENTICATED", "missing credentials: send 'Authorization: Bearer <token>'")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ServingError(401, "UNAUTHENTICATED", "malformed Authorization header: expected 'Bearer <token>'")
        principal = self._by_digest.get(_digest(token.strip()))
        if principal is None:  # never echo the token
            raise ServingError(401, "UNAUTHENTICATED", "invalid access token (it is not in the server's tokens)")
        return principal


def _entries(data: Any, source: str) -> list[Mapping[str, Any]]:
    if isinstance(data, Mapping) and isinstance(data.get("tokens"), list):
        return data["tokens"]
    if isinstance(data, list):
        return data
    raise ConfigError(f"{source}: expected {{\"tokens\": [{{\"user\": ..., \"token\": ..., \"permissions\": {{...}}}}]}}")
