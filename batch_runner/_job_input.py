"""What a job reads and what it still has to do: endpoints, sources, the input view, pending keys.

A job's input is a view (one source, or ``input.sql`` over several); its output is a Delta table
keyed by ``key``. A key is done when the output holds it (with ``retry_failed``: holds it with
status ``ok``); the pending keys are the input's keys minus the done ones, computed in Arrow on the
driver from the key columns only. ``request_query`` gives the request text of each row (the job's
query with its model call replaced by the call's request) for usage character counts and the plan.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

import spark_udfs
from ai_query import ConfigError, EndpointRegistry
from ai_query import storage

from ._runner import explain_error
from ._spec import JobSpec

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

_INPUT_ALIAS = "__aiq_input"


# --------------------------------------------------------------------------------------------
# the session: endpoints, sources, the input view


def job_registry(spec: JobSpec) -> EndpointRegistry:
    """The job's endpoints, with ``options.max_concurrency`` applied to their client configs."""
    registry = EndpointRegistry.default(spec.endpoints)
    caps = spec.max_concurrency
    if caps is None:
        return registry
    per_endpoint = caps if isinstance(caps, dict) else {ep.name: caps for ep in registry}
    unknown = sorted(set(per_endpoint) - set(registry.names()))
    if unknown:
        registry.get(unknown[0])  # raises, naming the known endpoints
    changed = []
    for name, cap in per_endpoint.items():
        ep = registry.get(name)
        client = ep.client_config.replace(max_concurrency=cap, initial_concurrency=min(cap, ep.client_config.initial_concurrency))
        changed.append(ep.replace(client_config=client))
    return registry.with_endpoints(changed)


def open_job(spec: JobSpec, spark: "SparkSession") -> "DataFrame":
    """Register ``ai_query`` with the job's endpoints and the source views; return the input rows."""
    _check_workers_see_storage_options(spec, spark)
    spark_udfs.register(spark, job_registry(spec))
    frames = {}
    for view, path in spec.sources.items():
        try:
            frames[view] = spark_udfs.read_delta(spark, path)
        except Exception as exc:
            raise ConfigError(f"cannot read source {view!r} from {path}: {explain_error(exc)}; check [sources] in the job spec") from exc
        frames[view].createOrReplaceTempView(view)
    if spec.input_sql is not None:
        try:
            frames[spec.driving_view] = spark.sql(spec.input_sql)
        except Exception as exc:
            raise ConfigError(f"input.sql fails: {explain_error(exc)}; fix the SELECT in [input]") from exc
        frames[spec.driving_view].createOrReplaceTempView(spec.driving_view)
    # the input under a name of its own, its plan not naming the driving view: a run points that
    # view at each chunk's rows, and replacing a view uncaches every cached plan that names it
    # (the run's kept pending rows, ``pending_rows``)
    input_df = frames[spec.driving_view] if spec.driving_view in frames else spark.table(spec.driving_view)
    input_df.createOrReplaceTempView(_INPUT_ALIAS)
    missing = [k for k in spec.key if k not in input_df.columns]
    if missing:
        raise ConfigError(
            f"key column(s) {', '.join(missing)} are not in the input view {spec.driving_view!r} "
            f"({', '.join(input_df.columns)}); fix key = [...] or [input]"
        )
    if spec.prompt is not None:
        from ._spec import template_parts

        absent = [c for kind, c in template_parts(spec.prompt["template"]) if kind == "column" and c not in input_df.columns]
        if absent:
            raise ConfigError(f"prompt.template uses column(s) {', '.join(absent)}, which {spec.driving_view!r} lacks; "
                              f"it has {', '.join(input_df.columns)}")
    return spark.table(_INPUT_ALIAS)


def _check_workers_see_storage_options(spec: JobSpec, spark: "SparkSession") -> None:
    """``[storage_options]`` reach Spark's Python workers through ``AIQ_STORAGE_OPTIONS`` in the environment
    their JVM started with (``ai_query._storage_options``): a session started before the job's options
    were installed would read and write the tables without them."""
    entries = spec.storage_entries()
    if not entries:
        return
    from ai_query._storage_options import ENV

    for seen in spark_udfs.worker_environment(spark, ENV):
        have = json.loads(seen) if seen else {}
        if any(have.get(prefix) != options for prefix, options in entries.items()):
            raise ConfigError(
                f"job {spec.name!r} has [storage_options], which reach Spark's Python workers through {ENV}, but this Spark "
                f"session was started without them; run the job with `ai-query run`, or call "
                f"batch_runner.use_storage_options(spec) before the session is built (or set spark.executorEnv.{ENV})")


# --------------------------------------------------------------------------------------------
# what is done, what is pending


def _output_exists(spec: JobSpec) -> bool:
    return storage.is_delta_table(spec.output_path)


def key_states(spec: JobSpec) -> pa.Table:
    """One row per key in the output: its key columns and ``ok`` (any row of the key succeeded)."""
    names = list(spec.key)
    if not _output_exists(spec):
        return pa.table({**{k: pa.array([], pa.string()) for k in names}, "ok": pa.array([], pa.bool_())})
    table = storage.delta_table(spec.output_path).to_pyarrow_table(columns=[*names, "aiq_status"])
    table = table.append_column("is_ok", pc.equal(table.column("aiq_status"), "ok"))
    grouped = table.group_by(names).aggregate([("is_ok", "max")])
    return grouped.rename_columns([*names, "ok"]).select([*names, "ok"])


def with_committed(states: pa.Table, committed: list[pa.Table], names: list[str]) -> pa.Table:
    """``states`` (:func:`key_states` of the output when a run started) with the rows the run
    committed since (each a table of the key columns and ``aiq_status``): what :func:`key_states`
    reads from the output at the run's end, without reading it (a run is its job's one writer, and
    a key's row is either new or replaces a failed one, so ``ok`` is the maximum of the two)."""
    parts = [t.select(names).append_column("ok", pc.equal(t.column("aiq_status"), "ok")) for t in committed if t.num_rows]
    if not parts:
        return states
    added = pa.concat_tables(parts, promote_options="permissive")
    if states.num_rows:
        added = added.cast(states.schema)
        added = pa.concat_tables([states, added])
    grouped = added.group_by(names).aggregate([("ok", "max")])
    return grouped.rename_columns([*names, "ok"]).select([*names, "ok"])


def pending_keys(spark: "SparkSession", spec: JobSpec, input_df: "DataFrame", *, retry_failed: bool = False,
                 limit: int | None = None, unique: bool = True, states: pa.Table | None = None) -> pa.Table:
    """The keys still to do, ordered, at most ``limit``.

    ``unique``: a key with several input rows is a ``ConfigError`` (before any request is sent);
    ``job_status`` passes ``False`` and counts such a key once. ``states``: the output's
    :func:`key_states`, when the caller read them already.

    Only the key columns travel to the driver, where the anti-join and the sort run in Arrow:
    a Spark shuffle costs more than the keys of millions of rows.
    """
    from ._preflight import duplicate_keys_message

    names = list(spec.key)
    keys = input_df.select(*names).toArrow()
    repeated = duplicate_keys_message(spec, keys, repr(spec.driving_view)) if unique else None
    if repeated:
        raise ConfigError(repeated)
    if not unique:
        keys = keys.group_by(names).aggregate([])  # distinct
    states = key_states(spec) if states is None else states
    done = states.filter(states.column("ok")) if retry_failed else states
    if done.num_rows:
        done = done.select(names).cast(keys.schema)
        keys = keys.join(done, keys=names, join_type="left anti")
    keys = keys.sort_by([(n, "ascending") for n in names])
    if limit is not None:
        keys = keys.slice(0, limit)
    return keys.combine_chunks()


def rows_of_keys(spark: "SparkSession", input_df: "DataFrame", keys: pa.Table, names: list[str]) -> "DataFrame":
    """The input rows whose key is in ``keys``, with the input's columns in their order.

    The rows are also filtered by the range of the first key column in ``keys`` (integer and
    string keys): a superset the join then narrows, which lets a scan skip what lies outside it
    (a Delta or Parquet source's files and row groups by their statistics, the cached batches of
    :func:`pending_rows` by theirs).
    """
    from pyspark.sql.functions import broadcast, col

    bounded = input_df
    first = keys.column(names[0])
    if keys.num_rows and (pa.types.is_integer(first.type) or pa.types.is_string(first.type)
                          or pa.types.is_large_string(first.type)):
        bounds = pc.min_max(first).as_py()
        if bounds["min"] is not None:
            bounded = input_df.where(col(f"`{names[0]}`").between(bounds["min"], bounds["max"]))
    joined = bounded.join(broadcast(spark.createDataFrame(keys)), on=names, how="left_semi")
    return joined.select(*[f"`{c}`" for c in input_df.columns])


def pending_rows(spark: "SparkSession", input_df: "DataFrame", keys: pa.Table, names: list[str]) -> "DataFrame":
    """The input rows of a run's pending ``keys``, read from the sources once and kept by Spark
    (memory, spilling to the executors' disks) for the run's chunks; unpersist it after the run.

    A chunk takes its rows with :func:`rows_of_keys`. Over the sources themselves every chunk read
    every source file again: a run's source reads grew with chunks x source size (on an object
    store a LIST, GETs of the log and of every file per chunk; a daily run of 10,000 new rows over
    a 100-million-row source read all of it twenty times). Kept, the sources are read once, and
    only the pending rows are kept; sorted by key within each partition, so that a chunk's key
    range skips the cached batches outside it. The run also reads one snapshot of its sources.
    """
    from pyspark import StorageLevel

    joined = input_df.join(spark.createDataFrame(keys), on=names, how="left_semi")  # Spark picks the join: keys may be millions
    kept = joined.select(*[f"`{c}`" for c in input_df.columns]).sortWithinPartitions(*[f"`{n}`" for n in names])
    return kept.persist(StorageLevel.MEMORY_AND_DISK)


# --------------------------------------------------------------------------------------------
# the request text of each row (for usage character counts and the plan)


def request_query(spark: "SparkSession", spec: JobSpec) -> tuple[str, list[tuple[str, str | None]]]:
    """The job's query with its model call replaced by the call's request, and the calls' endpoints.

    Returns (SQL, [(column alias unknown: the SQL keeps the alias), endpoint or None]) where the
    SQL's result has the same columns as the job's output, the answer column holding the request.
    """
    from spark_udfs._rewrite import bind_arguments, find_calls
    from spark_udfs._tasks import TASKS
    from spark_udfs._udf import SIGNATURE

    state_task_endpoints = spark_udfs._state(spark).task_endpoints  # noqa: SLF001 - same project
    calls = [c for c in find_calls(spec.query, {"ai_query", *TASKS})]
    if not calls:
        raise ConfigError("the job query has no ai_query(...) call in its SELECT list; add one, e.g. ai_query('local-chat', text) AS answer")
    outer = [c for c in calls if not any(o is not c and o.start <= c.start and c.end <= o.end for o in calls)]
    sql = spec.query
    endpoints: list[tuple[str, str | None]] = []
    for call in sorted(outer, key=lambda c: c.start, reverse=True):
        if call.name.lower() == "ai_query":
            bound = bind_arguments(call, SIGNATURE, required=2)
            endpoint = bound["endpoint"].literal
            request = bound["request"].text
            endpoints.append((call.name, endpoint if isinstance(endpoint, str) else None))
        else:
            request = call.args[0].text
            endpoints.append((call.name, state_task_endpoints.get(call.name.lower())))
        sql = sql[:call.start] + f"CAST(({request}) AS STRING)" + sql[call.end:]
    return sql, endpoints


__all__ = ["job_registry", "key_states", "open_job", "pending_keys", "pending_rows", "request_query", "rows_of_keys", "with_committed"]
