"""Secret references (``{{secrets/scope/key}}``), resolved at call time and never stored.

Resolution order: the environment variable ``AIQ_SECRET_<SCOPE>_<KEY>`` (upper case, every
character outside ``[A-Za-z0-9]`` replaced by ``_``), then the JSON secrets file named by
``AIQ_SECRETS_FILE`` (``{"scope": {"key": "value"}}``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .._errors import SecretNotFoundError
from .._redact import remember_secret

SECRET_REF = re.compile(r"^\{\{\s*secrets/([^/\s{}]+)/([^/\s{}]+)\s*\}\}$")


def is_secret_ref(value: object) -> bool:
    return isinstance(value, str) and SECRET_REF.match(value) is not None


def secret_env_var(scope: str, key: str) -> str:
    """The environment variable that holds ``{{secrets/scope/key}}``."""
    return "AIQ_SECRET_" + re.sub(r"[^A-Za-z0-9]", "_", f"{scope}_{key}").upper()


def resolve_secret(ref: str) -> str:
    """Return the value behind a secret reference; raise naming where it was looked for.

    The value is returned to the caller only: it is never logged, cached in a config object,
    or put into an error message; it is noted for ``redact``, so that no error text (a provider
    echoing it) can carry it either.
    """
    match = SECRET_REF.match(ref)
    if match is None:
        raise SecretNotFoundError(f"{ref!r} is not a secret reference of the form '{{{{secrets/scope/key}}}}'")
    scope, key = match.groups()
    env_name = secret_env_var(scope, key)
    value = os.environ.get(env_name)
    if value:
        remember_secret(value)
        return value
    secrets_file = os.environ.get("AIQ_SECRETS_FILE")
    if secrets_file:
        path = Path(secrets_file)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SecretNotFoundError(f"cannot read the secrets file {path} (AIQ_SECRETS_FILE): {exc}") from exc
        value = data.get(scope, {}).get(key) if isinstance(data.get(scope), dict) else None
        if value:
            remember_secret(str(value))
            return str(value)
    where = f"the environment variable {env_name}"
    where += f" or scope {scope!r} key {key!r} of {secrets_file}" if secrets_file else " or a secrets file (AIQ_SECRETS_FILE)"
    raise SecretNotFoundError(
        f"secret {{{{secrets/{scope}/{key}}}}} is not set: set {where} "
        f"(Spark executors need it too: spark.executorEnv.{env_name}, or a secrets file readable on every node)"
    )


def mask(value: str | None) -> str:
    """What a secret looks like wherever it must be shown."""
    if value is None:
        return "None"
    return value if is_secret_ref(value) else "********"
