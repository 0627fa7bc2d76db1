"""Object storage options (credentials, endpoint, region) given by a job spec instead of the environment.

A job spec's ``[storage_options]`` holds delta-rs storage option names (``AWS_ACCESS_KEY_ID``,
``AWS_ENDPOINT_URL``, ``AZURE_STORAGE_ACCOUNT_KEY`` ...): string values apply to every object
storage path of the job, a sub-table named by a URI prefix (``[storage_options."s3://raw"]``)
applies to the paths under it, over the job-wide ones. Credentials are secret references
(``{{secrets/scope/key}}``, the one mechanism endpoints use): the spec, the process environment
and Spark's configuration hold their names only; the value is resolved where it is used.

Why an environment variable (``AIQ_STORAGE_OPTIONS``) carries them: delta-rs and ``pyarrow.fs``
run in processes we do not start (Spark's Python workers on the executors, and the driver-side
workers that plan and commit the Delta data source), and every one of them inherits the
environment of the JVM that starts it. ``ai-query run`` installs the options before Spark starts,
and forwards ``AIQ_*`` to executors on a cluster (``spark.executorEnv.*``), as it does secrets.
The variable holds ``{prefix: options}`` with job-wide options already merged into an entry per
path of the job, so several jobs of one ``ai-query run`` combine (the same prefix with other
options is an error, not a silent override).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

from ._errors import ConfigError

ENV = "AIQ_STORAGE_OPTIONS"
"""The environment variable holding the installed options (JSON ``{prefix: {NAME: value-or-secret-ref}}``)."""

_NAME = re.compile(r"^(AWS|AZURE|GOOGLE)_[A-Z0-9_]+$")
_CREDENTIAL = re.compile(r"SECRET|TOKEN|PASSWORD|ACCOUNT_KEY|ACCESS_KEY|SAS|SERVICE_ACCOUNT_KEY")
_URI = re.compile(r"^[a-z][a-z0-9+.-]*://[^/]+")


def parse_section(raw: Any, where: str) -> dict[str, dict[str, str]]:
    """``[storage_options]`` checked: ``{"": job-wide options, "<uri prefix>": options}``, names upper case.

    A credential (a name with SECRET, TOKEN, PASSWORD, ACCOUNT_KEY, ACCESS_KEY, SAS) must be a
    secret reference: a plain value would sit in the spec and in Spark's environment page.
    """
    from .config import is_secret_ref

    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: [storage_options] must be a table, e.g. [storage_options] "
                          "AWS_SECRET_ACCESS_KEY = \"{{secrets/s3/secret}}\"")
    out: dict[str, dict[str, str]] = {}

    def check(prefix: str, name: str, value: Any) -> None:
        key = f"storage_options.{name}" if not prefix else f"storage_options.\"{prefix}\".{name}"
        upper = name.upper()
        if not _NAME.match(upper):
            raise ConfigError(f"{where}: {key} is not a storage option: names are delta-rs option names starting with "
                              "AWS_, AZURE_ or GOOGLE_ (e.g. AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, AZURE_STORAGE_ACCOUNT_KEY); "
                              "a table under [storage_options] must be named by a URI prefix such as \"s3://bucket\"")
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: {key} must be a non-empty string, got {value!r}")
        if _CREDENTIAL.search(upper) and not upper.endswith("ACCESS_KEY_ID") and not is_secret_ref(value):
            raise ConfigError(f"{where}: {key} is a credential and must be a secret reference like "
                              f"\"{{{{secrets/storage/{upper.lower()}}}}}\" (set AIQ_SECRET_STORAGE_{upper} or a secrets "
                              "file): a plain value would be kept in the spec and shown in Spark's environment page")
        out.setdefault(prefix, {})[upper] = value

    for name, value in raw.items():
        if isinstance(value, Mapping):
            if not _URI.match(name):
                raise ConfigError(f"{where}: [storage_options.{name}] must be named by a URI prefix such as "
                                  f"[storage_options.\"s3://bucket/prefix\"], got {name!r}")
            out.setdefault(name.rstrip("/"), {})
            for sub, sub_value in value.items():
                check(name.rstrip("/"), sub, sub_value)
        else:
            check("", name, value)
    return out


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def expand(section: Mapping[str, Mapping[str, str]], paths: Iterable[str]) -> dict[str, dict[str, str]]:
    """Entries per path prefix for ``paths`` (the job's remote paths) and the section's own prefixes.

    Each entry is the job-wide options, then those of every section prefix it lies under, the
    longest last."""
    job_wide = dict(section.get("", {}))
    prefixes = sorted((p for p in section if p), key=len)
    out: dict[str, dict[str, str]] = {}
    for path in [*prefixes, *(p.rstrip("/") for p in paths if "://" in p and not p.startswith("file://"))]:
        merged = dict(job_wide)
        for prefix in prefixes:
            if _under(path, prefix):
                merged.update(section[prefix])
        if merged:
            out[path] = merged
    return out


def install(entries: Mapping[str, Mapping[str, str]]) -> None:
    """Add ``entries`` to this process's options (``AIQ_STORAGE_OPTIONS``); a prefix installed with other options is an error."""
    if not entries:
        return
    current = installed()
    for prefix, options in entries.items():
        if prefix in current and current[prefix] != dict(options):
            raise ConfigError(f"storage options for {prefix} differ between the jobs of this run (or from {ENV} in the "
                              "environment); give each path one set of [storage_options], or run the jobs separately")
    merged = {**current, **{p: dict(o) for p, o in entries.items()}}
    os.environ[ENV] = json.dumps(merged, sort_keys=True)


@lru_cache(maxsize=8)
def _parse(text: str) -> dict[str, dict[str, str]]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{ENV} is not valid JSON ({exc}); unset it and let `ai-query run` set it from the job's "
                          "[storage_options]") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(f"{ENV} must be a JSON object {{\"s3://bucket/prefix\": {{\"AWS_...\": \"...\"}}}}")
    return data


def installed() -> dict[str, dict[str, str]]:
    """The options installed in this process (``{}`` when none)."""
    text = os.environ.get(ENV)
    return dict(_parse(text)) if text else {}


def references(path: str) -> dict[str, str] | None:
    """The options (secret references unresolved) of the longest installed prefix ``path`` lies under."""
    entries = installed()
    if not entries:
        return None
    path = path.rstrip("/")
    best = max((p for p in entries if _under(path, p)), key=len, default=None)
    return dict(entries[best]) if best is not None else None


def resolved(path: str) -> dict[str, str] | None:
    """``references(path)`` with every secret resolved (``SecretNotFoundError`` naming the secret and the fix)."""
    from .config import is_secret_ref, resolve_secret

    options = references(path)
    if options is None:
        return None
    return {name: resolve_secret(value) if is_secret_ref(value) else value for name, value in options.items()}


def pyarrow_filesystem(scheme: str, options: Mapping[str, str]) -> Any:
    """A ``pyarrow.fs`` filesystem for ``scheme`` made from delta-rs option names (resolved values).

    S3: access key, secret, session token, region, endpoint (its scheme picks http or https).
    Azure (``az``, ``abfs[s]``, ...): see ``_azure_filesystem``. ``None`` for other schemes (``gs``):
    their state files keep pyarrow's own credentials (``from_uri``: the environment), their tables
    still get the options through delta-rs."""
    import pyarrow.fs as pafs

    from .storage import AZURE_SCHEMES, S3_SCHEMES

    def first(*names: str) -> str | None:
        return next((options[n] for n in names if options.get(n)), None)

    if scheme in S3_SCHEMES:
        kwargs: dict[str, Any] = {"allow_delayed_open": True}  # a small object: one PUT, not a multipart upload
        if first("AWS_ACCESS_KEY_ID"):
            kwargs.update(access_key=first("AWS_ACCESS_KEY_ID"), secret_key=first("AWS_SECRET_ACCESS_KEY"),
                          session_token=first("AWS_SESSION_TOKEN"))
        region = first("AWS_REGION", "AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        endpoint = first("AWS_ENDPOINT_URL", "AWS_ENDPOINT", "AWS_ENDPOINT_URL_S3")
        if endpoint:
            endpoint_scheme, _, host = endpoint.rpartition("://")
            kwargs["endpoint_override"] = host.rstrip("/")
            kwargs["scheme"] = endpoint_scheme or "https"
        return pafs.S3FileSystem(**kwargs)
    if scheme in AZURE_SCHEMES:
        return _azure_filesystem(first)
    return None


AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
"""The Azurite emulator's published account key (devstoreaccount1), as delta-rs uses it with AZURE_STORAGE_USE_EMULATOR."""


def _azure_filesystem(first: Any) -> Any:
    """pyarrow's AzureFileSystem from delta-rs's Azure option names (and their aliases): the account
    name, then an account key, a SAS token or a service principal (client id, secret, tenant);
    none of them: Azure's default credential chain. ``AZURE_STORAGE_USE_EMULATOR`` (Azurite on
    127.0.0.1:10000, or ``AZURITE_BLOB_STORAGE_URL``) and ``AZURE_STORAGE_ENDPOINT`` point it at
    another endpoint, as they point delta-rs."""
    import pyarrow.fs as pafs

    account = first("AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT", "AZURE_ACCOUNT_NAME")
    emulator = (first("AZURE_STORAGE_USE_EMULATOR", "AZURE_USE_EMULATOR") or "").lower() in ("1", "true", "yes")
    endpoint = first("AZURE_STORAGE_ENDPOINT", "AZURE_ENDPOINT")
    if emulator:
        account = account or "devstoreaccount1"
        endpoint = endpoint or os.environ.get("AZURITE_BLOB_STORAGE_URL") or "http://127.0.0.1:10000"  # as delta-rs
    if not account:
        raise ValueError("an Azure path needs the storage account: set AZURE_STORAGE_ACCOUNT_NAME (in the environment "
                         "or the job's [storage_options]), or use abfss://<container>@<account>.dfs.core.windows.net/...")
    kwargs: dict[str, Any] = {}
    key = first("AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_ACCESS_KEY", "AZURE_STORAGE_MASTER_KEY", "AZURE_STORAGE_KEY")
    sas = first("AZURE_STORAGE_SAS_KEY", "AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_TOKEN")
    if key:
        kwargs["account_key"] = key
    elif sas:
        kwargs["sas_token"] = sas
    elif emulator:
        kwargs["account_key"] = AZURITE_KEY
    client = first("AZURE_STORAGE_CLIENT_ID", "AZURE_CLIENT_ID")
    if client and not kwargs:
        kwargs.update(client_id=client, client_secret=first("AZURE_STORAGE_CLIENT_SECRET", "AZURE_CLIENT_SECRET"),
                      tenant_id=first("AZURE_STORAGE_TENANT_ID", "AZURE_TENANT_ID", "AZURE_STORAGE_AUTHORITY_ID"))
    if endpoint:
        endpoint_scheme, _, host = endpoint.rpartition("://")
        authority = host.split("/", 1)[0]  # an emulator's URL may carry /<account>: pyarrow adds it itself
        kwargs.update(blob_storage_authority=authority, dfs_storage_authority=authority,
                      blob_storage_scheme=endpoint_scheme or "https", dfs_storage_scheme=endpoint_scheme or "https")
    return pafs.AzureFileSystem(account, **kwargs)


def secret_references(section: Mapping[str, Mapping[str, str]]) -> list[tuple[str, str, str]]:
    """``(prefix, name, reference)`` for every secret reference of a ``[storage_options]`` section."""
    from .config import is_secret_ref

    return [(prefix, name, value) for prefix, options in section.items() for name, value in options.items()
            if is_secret_ref(value)]


__all__ = ["ENV", "expand", "install", "installed", "parse_section", "pyarrow_filesystem", "references", "resolved",
           "secret_references"]
