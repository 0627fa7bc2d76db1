"""A job's preflight: everything that can fail before the first paid request fails there.

``ai-query run`` calls :func:`preflight_job` for every spec before it starts Spark; the run
functions call it again without the probe (a notebook calling ``run_incremental`` gets the same
checks). In order, cheapest first:

0. every secret of ``[storage_options]`` resolves, and the options are installed for this process
   (and, through ``AIQ_STORAGE_OPTIONS``, for the Spark session ``ai-query run`` starts next);
1. the paths the job writes (output, usage, payloads, state) are writable (``ai_query._preflight``);
2. every endpoint the query calls is known and its secrets resolve on the driver;
   (and, with ``options.max_cost_usd``, has prices);
3. the input has one row per key (read with delta-rs from the key columns only, for a job whose
   input is one Delta source; an ``[input] sql`` job is checked by Spark in ``pending_keys``);
4. with ``probe``: each endpoint answers its free probe request with our key.

A failure is a ``ConfigError`` / ``SecretNotFoundError`` / ``SystemicEndpointError`` naming the
value and the fix; the runner prints it as one paragraph and exits 2, and nothing was sent.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from ai_query import AIQueryError, ArgumentError, ConfigError, EndpointRegistry, SecretNotFoundError
from ai_query import storage
from ai_query._preflight import check_writable, preflight_endpoints
from ai_query._storage_options import install, secret_references
from ai_query.config import resolve_secret

from ._spec import JobSpec

if TYPE_CHECKING:
    import pyarrow as pa

_DUPLICATES_SHOWN = 3


def job_endpoints(spec: JobSpec) -> set[str]:
    """The endpoints the job's query names: ``ai_query('name', ...)`` literals and the task functions' defaults."""
    from spark_udfs._rewrite import bind_arguments, find_calls
    from spark_udfs._tasks import TASKS, configured_endpoints
    from spark_udfs._udf import SIGNATURE

    tasks = configured_endpoints(None)
    names: set[str] = set()
    for call in find_calls(spec.query, {"ai_query", *TASKS}):
        if call.name.lower() != "ai_query":
            names.add(tasks[call.name.lower()])
            continue
        argument = bind_arguments(call, SIGNATURE, required=2)["endpoint"]
        if isinstance(argument.literal, str):
            names.add(argument.literal)
        elif argument.literal is not NotImplemented:  # NotImplemented: an expression, e.g. a column of endpoint names
            raise ArgumentError(f"ai_query({argument.text}, ...): the endpoint must be a string naming an endpoint, e.g. "
                                f"ai_query('my-endpoint', ...), got {argument.text}")
    return names


def check_job_paths(spec: JobSpec) -> None:
    """Every path the job writes can be written (see ``ai_query._preflight.check_writable``).

    On object storage each check is a few round trips (put, then delete, a probe object), so the
    paths are checked at once, not one after the other; a problem is raised for the first path
    in the order below."""
    where = spec.source_file or "the job spec"
    checks = [(spec.output_path, "output.path", f"point it at a writable directory in {where} or fix its permissions")]
    if spec.incremental:
        checks += [(spec.state_path, "the job's state directory (output.state_dir, default output.path + '.aiq')",
                    f"set output.state_dir in {where} to a writable directory or fix its permissions"),
                   (spec.usage_table, "output.usage_path",
                    f"set output.usage_path in {where} to a writable directory or fix its permissions")]
        if spec.inference_path:
            checks.append((spec.inference_path, "output.inference_path",
                           f"set output.inference_path in {where} to a writable directory or fix its permissions"))
    if len(checks) == 1 or not any(storage.is_remote(path) for path, _, _ in checks):
        for check in checks:
            check_writable(*check)
        return
    with ThreadPoolExecutor(len(checks), thread_name_prefix="aiq-preflight") as pool:
        futures = [pool.submit(check_writable, *check) for check in checks]
    for future in futures:
        future.result()


def duplicate_keys_message(spec: JobSpec, keys: "pa.Table", where: str) -> str | None:
    """A message naming the keys ``keys`` (key columns of the input) holds more than once; ``None`` if none."""
    import pyarrow.compute as pc

    names = list(spec.key)
    counts = keys.group_by(names).aggregate([([], "count_all")])
    if counts.num_rows == keys.num_rows:
        return None
    repeated = counts.filter(pc.greater(counts.column("count_all"), 1))
    shown = ", ".join(
        f"{tuple(r[k] for k in names) if len(names) > 1 else r[names[0]]!r} ({r['count_all']} rows)"
        for r in repeated.slice(0, _DUPLICATES_SHOWN).to_pylist())
    more = f" and {repeated.num_rows - _DUPLICATES_SHOWN} more" if repeated.num_rows > _DUPLICATES_SHOWN else ""
    return (f"the input {where} has several rows for one key ({', '.join(names)}): {shown}{more}; a job writes one row per "
            "key: make key = [...] unique (add columns) or remove the duplicates from the input. No request was sent")


def check_source_keys(spec: JobSpec) -> None:
    """Duplicate keys of a job whose input is one Delta source, read with delta-rs (no Spark)."""
    if not spec.incremental or spec.input_sql is not None or spec.driving_view not in spec.sources:
        return
    from deltalake.exceptions import DeltaError

    from ai_query import storage

    path = spec.sources[spec.driving_view]
    try:
        table = storage.delta_table(path)
        if any(k not in table.schema().to_arrow().names for k in spec.key):
            return  # open_job names the missing key column with the input's columns
        keys = table.to_pyarrow_table(columns=list(spec.key))
    except (DeltaError, OSError, ValueError):
        return  # not readable here (another format, a remote store): open_job reports it with Spark's words
    message = duplicate_keys_message(spec, keys, f"{spec.driving_view!r} ({path})")
    if message:
        raise ConfigError(message)


def check_budget_pricing(spec: JobSpec, registry: EndpointRegistry, endpoints: set[str]) -> None:
    """``options.max_cost_usd`` needs a price for every endpoint the job calls."""
    if spec.max_cost_usd is None:
        return
    for endpoint in sorted(endpoints):
        if registry.get(endpoint).entity.pricing is None:
            raise ConfigError(
                f"options.max_cost_usd needs prices, but endpoint {endpoint!r} has no pricing: add "
                "\"pricing\": {\"input_usd_per_million_tokens\": ..., \"output_usd_per_million_tokens\": ...} to its served "
                "entity, or use options.max_tokens"
            )


def job_priced(spec: JobSpec) -> bool:
    """Whether every endpoint the job calls has pricing: its cost is then known, 0 USD when nothing was paid
    (a run with no pending rows, rows that all failed), never "unknown"."""
    from ._job_input import job_registry

    try:
        registry, endpoints = job_registry(spec), job_endpoints(spec)
        return bool(endpoints) and all(registry.get(name).entity.pricing is not None for name in endpoints)
    except AIQueryError:  # an endpoint the registry does not know: the preflight says so; here the cost is unknown
        return False


def use_storage_options(spec: JobSpec) -> None:
    """Resolve every secret of the job's ``[storage_options]`` (an unset one stops the job before any
    request, object storage included) and install the options for this process."""
    if not spec.storage_options:
        return
    where = spec.source_file or "the job spec"
    for prefix, name, ref in secret_references(spec.storage_options):
        try:
            resolve_secret(ref)
        except SecretNotFoundError as exc:
            key = f"storage_options.{name}" if not prefix else f"storage_options.\"{prefix}\".{name}"
            paths = f"the paths under {prefix}" if prefix else "every object storage path of the job"
            raise SecretNotFoundError(f"{where}: {key} (object storage credentials for {paths}) needs its secret: {exc}. "
                                      "Nothing was read, written or sent") from None
    install(spec.storage_entries())


def preflight_job(spec: JobSpec, *, probe: bool = True) -> None:
    """Check ``spec`` before anything is sent; see the module docstring."""
    from ._job_input import job_registry

    use_storage_options(spec)
    check_job_paths(spec)
    registry, endpoints = job_registry(spec), job_endpoints(spec)
    preflight_endpoints(registry, endpoints, probe=False)
    check_budget_pricing(spec, registry, endpoints)
    check_source_keys(spec)
    if probe:
        preflight_endpoints(registry, endpoints, probe=True)


__all__ = ["check_budget_pricing", "check_job_paths", "check_source_keys", "duplicate_keys_message", "job_endpoints", "job_priced", "preflight_job",
           "use_storage_options"]
