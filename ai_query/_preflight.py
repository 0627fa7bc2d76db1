"""Preflight: what a job or a server checks on the driver before it spends anything.

A job that finds a bad key after 4 paid requests, or an unwritable usage table after a whole
chunk, has spent money for nothing and left its tables disagreeing. Everything that can be known
before the first paid request is therefore checked first, on the driver, in one place:

* **paths** (:func:`check_writable`): a local output, usage, payload or state path must be a
  directory we can create or write (its nearest existing ancestor writable, and not a file).
  Remote URIs (``s3://``, ``abfss://`` ...) are left to the Delta commit: checking them needs
  their credentials, which only the writer has.
* **secrets** (:func:`check_credentials`): every ``{{secrets/scope/key}}`` an endpoint uses is
  resolved here, so an unset one fails with its one-paragraph message instead of on an executor
  under a page of Spark traceback.
* **reachability** (:func:`probe_endpoint`): an HTTP backend offers a free request
  (``Backend.probe_request``: ``GET /v1/models`` for OpenAI-compatible servers and Anthropic,
  ``GET /api/2.0/serving-endpoints/{name}`` for serving endpoints); no answer, 401/403 (the key)
  or 404 (the URL or the name) stops the job before any paid request. Backends without a free
  request (local models, vLLM pools, MLflow) are started by the run itself and are not probed.

Every failure is an :class:`~ai_query.AIQueryError` whose message names the value and the fix;
the ``ai-query`` runner prints it as one paragraph and exits 2.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path

from . import storage
from ._errors import ConfigError, SecretNotFoundError, SystemicEndpointError, TransportError
from .config import EndpointRegistry, ServedEntity, is_secret_ref, resolve_secret

PROBE_TIMEOUT_S = 10.0
"""How long a probe waits for its answer: a server that cannot answer a free GET in this time is down."""

_REMOTE_SCHEMES = ("s3://", "s3a://", "s3n://", "gs://", "abfss://", "abfs://", "az://", "adl://", "wasbs://", "dbfs:/",
                   "hdfs://", "memory://")


def check_writable(path: str, what: str, fix: str) -> None:
    """``ConfigError`` unless ``path`` (a local directory, made on first write) can be written.

    ``what`` names the path in the message (``output.usage_path``), ``fix`` says what to change.
    Writability is tried, not read from the mode bits (root passes every ``os.access`` check): a
    file is created and removed in the directory, or in its nearest existing ancestor, and in a
    Delta table's ``_delta_log``. Nothing else is made, so a refused job leaves no trace.
    On object storage a small object is put under ``path`` and deleted (credentials, bucket and
    permissions are checked before any request is paid for).
    """
    if path.startswith(_REMOTE_SCHEMES):
        problem = _remote_write_problem(path)
        if problem:
            raise ConfigError(f"{what} {path} cannot be written ({problem}); check the bucket, the credentials "
                              f"(AWS_*, AZURE_*, GOOGLE_* in the environment) and the permissions, or {fix}")
        return
    local = Path(path[len("file://"):] if path.startswith("file://") else path).absolute()
    target = local
    while not target.exists():
        if target.parent == target:
            break
        target = target.parent
    if not target.is_dir():
        where = "is a file" if target == local else f"cannot be created: {target} is a file"
        raise ConfigError(f"{what} {path} {where}, not a directory (a Delta table is a directory); {fix}")
    for directory in (target, target / "_delta_log"):
        if directory.is_dir():
            problem = _write_problem(directory)
            if problem:
                where = "is not writable" if directory == local else (
                    "is a Delta table whose _delta_log is not writable" if directory.name == "_delta_log"
                    else f"cannot be created in {directory}")
                raise ConfigError(f"{what} {path} {where} ({problem}); {fix}")


def _remote_write_problem(path: str) -> str | None:
    """Why an object cannot be put (and deleted) under ``path`` (``None``: it can, or the scheme is not one pyarrow opens)."""
    import pyarrow as pa

    try:
        storage.filesystem(path)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
        return None  # a scheme only Spark or delta-rs opens (dbfs:/, wasbs://): checked when written
    except OSError as exc:  # the store cannot be reached at all (no endpoint, the bucket's region unknown)
        return " ".join(str(exc).split())[:300]
    probe = storage.join(path, f".aiq-preflight-{uuid.uuid4().hex}")
    try:
        storage.write_bytes(probe, b"")
        storage.remove(probe)
    except OSError as exc:
        return " ".join(str(exc).split())[:300]
    return None


def _write_problem(directory: Path) -> str | None:
    """Why a file cannot be created in ``directory`` (``None``: it can)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".aiq-preflight-", dir=directory)
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    os.unlink(name)
    return None


def check_credentials(endpoint: str, entity: ServedEntity) -> None:
    """Resolve every secret reference of ``entity``'s provider config (``SecretNotFoundError`` naming the endpoint)."""
    config = entity.external_model.config if entity.external_model is not None else None
    if config is None:
        return
    for value in config.credential():
        if is_secret_ref(value):
            try:
                resolve_secret(value)  # type: ignore[arg-type]
            except SecretNotFoundError as exc:
                raise SecretNotFoundError(f"endpoint {endpoint!r} (served entity {entity.name!r}) needs its key: {exc}") from None


def probe_endpoint(endpoint: str, entity: ServedEntity, *, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Send ``entity``'s free probe request; raise when the endpoint is unreachable, refuses the key or is not there."""
    from .backends import backend_for
    from .transport import Request, request_blocking

    probe = backend_for(entity).probe_request()
    if probe is None:
        return
    where = f"endpoint {endpoint!r} (served entity {entity.name!r})"
    skip = "or run with --no-probe if this server has no such route"
    try:
        answer = request_blocking(Request(probe.method, probe.url, headers=probe.headers, timeout=timeout))
    except TransportError as exc:
        raise SystemicEndpointError(
            f"{where} is unreachable: {probe.method} {probe.url} got no answer ({exc}); check that the server runs and "
            "that the endpoint's URL (openai_api_base, anthropic_api_base or databricks_workspace_url) is right. "
            "No paid request was sent") from None
    status = answer.status_code
    if status in (401, 403):
        raise SystemicEndpointError(
            f"{where} refuses its key: {probe.method} {probe.url} answered {status}; set a valid key (the secret behind "
            "the endpoint's api key reference, or its plain-text key). No paid request was sent", status_code=status) from None
    if status == 404:
        raise SystemicEndpointError(
            f"{where} is not there: {probe.method} {probe.url} answered 404; check the endpoint's URL (an OpenAI "
            f"base usually ends in /v1) and its name, {skip}. No paid request was sent", status_code=status) from None


def preflight_endpoints(registry: EndpointRegistry, names: Iterable[str], *, probe: bool = True) -> None:
    """Check each endpoint in ``names``: known, its secrets set, and (``probe``) reachable with its key."""
    endpoints = [registry.get(name) for name in sorted(set(names))]
    for endpoint in endpoints:
        for entity in endpoint.served_entities:
            check_credentials(endpoint.name, entity)
    if probe:
        for endpoint in endpoints:
            for entity in endpoint.served_entities:
                probe_endpoint(endpoint.name, entity)


__all__ = ["PROBE_TIMEOUT_S", "check_credentials", "check_writable", "preflight_endpoints", "probe_endpoint"]
