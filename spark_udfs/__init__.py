"""The Spark face of ai-query: ``ai_query`` as a Spark SQL function, and Delta I/O.

    import spark_udfs
    spark_udfs.register(spark)          # ai_query + the Delta data source
    spark.sql(\"\"\"SELECT ai_query('local-chat', CONCAT('Summarize: ', review),
                                   failOnError => false,
                                   modelParameters => named_struct('max_tokens', 64, 'temperature', 0.0)) AS r
                 FROM reviews\"\"\")

``ai_query``'s result type depends on its arguments, while a UDF's is fixed at registration, so
``register`` wraps this session's ``spark.sql`` to rewrite each call into a variant registered
for its type (STRING, ``STRUCT<response, errorMessage>`` for ``failOnError => false``,
``ARRAY<FLOAT>`` for an embeddings endpoint, any ``returnType``). The same rewrite is available
explicitly as ``spark_udfs.sql(spark, query)``; without it, the registered ``ai_query`` returns
STRING. Arguments are checked on the driver before any task runs.

On a Spark Connect session (no SparkContext, no JVM on the client) the same functions register
through Connect's ``spark.udf`` / ``spark.dataSource``, and the rewrite wraps the client's
``spark.sql``. What needs the driver falls back: no quota broker unless ``AIQ_DRIVER_HOST`` names
an address of the client the executors reach (each task then keeps its ``1/workers`` share of
every quota and of ``max_concurrency``), ``files`` types are checked by the UDF rather than the
analyzer, and incremental jobs (a Spark local property) need a classic session.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Mapping

from ai_query import get_logger
from ai_query import ArgumentError, EndpointRegistry, ModelParameters
from ai_query._files import files_unsupported_reason
from ai_query._preflight import check_credentials
from ai_query.backends import check_params, entity_kind, model_contract, prepare
from ai_query.limits.quota import QuotaBroker

from ._argtypes import check_files_types
from ._conditions import CONDITIONS, AIFunctionException, argument_error, condition_of, raises_conditions
from ._response_format import response_format as _response_format
from ._dataframe import install as install_expression_hooks
from ._live_progress import LiveProgress, in_notebook
from ._delta import DeltaReadError, DeltaWriteError, delta_txn_version, read_delta, register_delta, write_delta
from ._rewrite import _without_comments, bind_arguments, find_calls, has_positional_marker, replace_calls, replace_names, rewrite_legacy_calls
from ._session import build_session, default_parallelism, is_connect, services_host, worker_environment
from ._types import AUDIT_COLUMNS, default_value_type, parse_return_type
from ._parse_document import ai_parse_document, register_parse_document
from ._tasks import TASKS, build_task_udf, configured_endpoints, extract_struct_type, language_name, sentiment_task
from ._tasks_v2 import is_v2, labels_of, options_of, v2_task
from ._udf import SIGNATURE, UDFSpec, build_udf

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession
    from pyspark.sql.types import DataType, StructType
    from pyspark.sql._typing import ColumnOrName

log = get_logger("spark_udfs")

__all__ = [
    "AIFunctionException",
    "AUDIT_COLUMNS",
    "CONDITIONS",
    "ai_parse_document",
    "ai_query",
    "DeltaReadError",
    "DeltaWriteError",
    "build_session",
    "condition_of",
    "delta_txn_version",
    "is_connect",
    "prepare_endpoints",
    "read_delta",
    "register",
    "register_delta",
    "rewrite",
    "services_host",
    "set_progress_address",
    "sql",
    "worker_environment",
    "write_delta",
]


@dataclass
class _SessionState:
    registry: EndpointRegistry
    original_sql: Any
    variants: dict[Any, str] = field(default_factory=dict)
    progress_address: tuple[str, int] | None = None
    prepared: set[str] = field(default_factory=set)
    quota_broker: QuotaBroker | None = None
    quota_share: float = 1.0
    task_endpoints: dict[str, str] = field(default_factory=dict)
    live_progress: Any = None
    """The session's ``LiveProgress`` once a query asked for progress (``sql(..., progress=True)``)."""


_STATES: dict[int, _SessionState] = {}
_DEFAULT_SPEC_TYPE = '"string"'


def _state(spark: "SparkSession") -> _SessionState:
    state = _STATES.get(id(spark))
    if state is None:
        raise ArgumentError("spark_udfs.register(spark) has not been called for this session; call it once after building the session")
    return state


@raises_conditions
def register(
    spark: "SparkSession",
    endpoints: EndpointRegistry | str | os.PathLike[str] | None = None,
    *,
    rewrite_sql: bool = True,
    task_endpoints: Mapping[str, str] | None = None,
) -> EndpointRegistry:
    """Register ``ai_query`` and the Delta data source on ``spark``; return the endpoint registry.

    ``endpoints`` is a registry or an endpoints JSON file added to the built-ins (and to the file
    named by ``AIQ_ENDPOINTS``). With ``rewrite_sql`` (the default) this session's ``spark.sql``
    rewrites ``ai_query`` calls into typed variants and validates their arguments first.
    The task functions (``ai_classify``, ``ai_summarize``, ...) are registered too, each calling
    its default endpoint unless ``task_endpoints`` names another (``{"ai_classify": "my-llm"}``);
    ``ai_parse_document``'s entry names the vision endpoint for images and scanned pages.
    """
    if isinstance(endpoints, EndpointRegistry):
        registry = endpoints
    else:
        registry = EndpointRegistry.default(endpoints)
    if is_connect(spark):
        _check_connect_mode()
    state = _STATES.get(id(spark))
    original = state.original_sql if state is not None else spark.sql
    if state is not None and state.quota_broker is not None:
        state.quota_broker.close()
    state = _STATES[id(spark)] = _SessionState(registry, original)
    # Quotas (requests/min, tokens/min, provisioned tokens/s) hold for the whole job: tasks lease
    # them from a broker on the driver; each worker's fallback share assumes every slot is busy.
    # The broker also splits each endpoint's max_concurrency among the workers sending to it now.
    # A Spark Connect client is no driver: without AIQ_DRIVER_HOST it starts no broker, and every
    # task keeps its static share (see _session.services_host).
    host = services_host(spark)
    state.quota_broker = QuotaBroker(list(registry), host=host) if host is not None else None
    state.quota_share = 1.0 / default_parallelism(spark)
    register_delta(spark)
    default = UDFSpec(
        _DEFAULT_SPEC_TYPE,
        quota_broker=state.quota_broker.address if state.quota_broker is not None else None,
        quota_share=state.quota_share,
    )
    spark.udf.register("ai_query", build_udf(default, registry))
    task_endpoints = dict(task_endpoints or {})
    register_parse_document(spark, original, registry, task_endpoints.pop("ai_parse_document", None),
                            default.quota_broker, state.quota_share)
    try:
        state.task_endpoints = configured_endpoints(task_endpoints)
    except ValueError as exc:
        raise ArgumentError(str(exc)) from None
    for name, endpoint in state.task_endpoints.items():
        if endpoint not in registry:
            if task_endpoints and name in task_endpoints:
                registry.get(endpoint)  # raises, listing the known endpoints
            continue  # a default endpoint that is not configured: the function fails when used
        task = sentiment_task(registry.get(endpoint).entity.model_name) if name == "ai_analyze_sentiment" else TASKS[name]
        spark.udf.register(name, build_task_udf(task, endpoint, registry, default.quota_broker, state.quota_share, None))
    if rewrite_sql:
        install_expression_hooks(type(spark.range(0)), lambda s: id(s) in _STATES, rewrite_expression, named_as_written)

        def sql_with_ai_query(sqlQuery: str, args: Any = None, **kwargs: Any) -> "DataFrame":  # noqa: N803
            return named_as_written(original(rewrite(spark, sqlQuery), args, **kwargs))

        sql_with_ai_query.__doc__ = original.__doc__
        spark.sql = sql_with_ai_query  # type: ignore[method-assign]
    elif spark.sql is not original:
        spark.sql = original  # type: ignore[method-assign]
    return registry


def _check_connect_mode() -> None:
    """pyspark builds UDFs and columns for the mode this process is in (``is_remote()``)."""
    from pyspark.sql.utils import is_remote

    if not is_remote():
        raise ArgumentError(
            "spark_udfs.register: this is a Spark Connect session but pyspark is in classic mode in this process "
            "(SPARK_CONNECT_MODE_ENABLED is unset), so the UDFs it builds would need a local SparkContext; build the "
            "session with pyspark.sql.SparkSession.builder.remote('sc://host:port').getOrCreate(), which switches the mode"
        )


def set_progress_address(spark: "SparkSession", address: tuple[str, int] | None) -> None:
    """Send live row counts from tasks to a ``ai_query.ProgressCollector`` at ``address``."""
    _state(spark).progress_address = address


def _variant_name(spec: UDFSpec) -> str:
    digest = hashlib.sha1(repr(spec).encode()).hexdigest()[:12]
    return f"ai_query__{digest}"


def prepare_endpoints(registry: EndpointRegistry, names: set[str], prepared: set[str] | None = None) -> None:
    """Start (or attach to) the local servers and pools behind ``names`` on the driver, before any task runs.

    Their secrets are resolved here first (``ai_query._preflight.check_credentials``).

    On a cluster this is the driver's node; each other node's first task attaches or starts its own.
    """
    for name in sorted(names):
        if prepared is not None and name in prepared:
            continue
        for served in registry.get(name).served_entities:  # an unset secret fails here, not on every executor
            check_credentials(name, served)
        entity = registry.get(name).entity
        log.info("preparing %s endpoint %r (model %s)", entity_kind(entity), name, entity.model_name)
        prepare(entity)
        if prepared is not None:
            prepared.add(name)


def rewrite_expression(spark: "SparkSession", text: str) -> str:
    """``rewrite`` for one expression (``selectExpr``, ``F.expr``): its calls pointed at typed variants."""
    prefix = "SELECT "
    return rewrite(spark, prefix + text, check_files=False)[len(prefix):]


@raises_conditions
def rewrite(spark: "SparkSession", query: str, *, audit: bool = False, check_files: bool = True) -> str:
    """Validate every ``ai_query`` call in ``query`` and point it at a UDF of the right type.

    With ``audit`` every call returns ``STRUCT<response, aiq_endpoint, ..., aiq_batch_id>`` (the
    fields: ``AUDIT_COLUMNS``) and row errors are data (the batch runner uses this).
    """
    state = _state(spark)
    query = rewrite_legacy_calls(query, {"ai_query"}, SIGNATURE)
    calls = find_calls(query, {"ai_query", *TASKS})
    if not calls:
        return query
    if _PERSISTENT_FUNCTION.match(_without_comments(query)):
        raise argument_error("AI_QUERY_TEMPORARY_FUNCTION_REQUIRED", 
            f"CREATE FUNCTION ... RETURN {calls[0].name}(...) cannot be stored in the catalog: {calls[0].name} is a function of "
            "this Spark session (Spark refuses it with INVALID_TEMP_OBJ_REFERENCE); use CREATE TEMPORARY FUNCTION "
            "(same body) in each session, after spark_udfs.register(spark)"
        )
    replacements: dict[int, str] = {}
    wrappers: dict[int, str] = {}  # call start -> the function its variant's result goes through
    used: set[str] = set()
    # A statement with one ai_query call gets the pipelined (iterator) variant, its arguments
    # written by position. Spark runs each iterator UDF of a statement in its own Python worker,
    # so with several calls the plain variants keep them in one worker, sharing its answers.
    pipelined = len(calls) == 1
    whole: dict[int, str] = {}  # the pipelined call, rewritten whole
    files_position: dict[str, int] = {}  # UDF name -> where a positional files argument sits
    for call in calls:
        if call.name.lower() != "ai_query":
            name, wrapper = _rewrite_task_call(spark, state, call)
            used.add(state.task_endpoints[call.name.lower()])
            if name is not None:
                replacements[call.start] = name
            if wrapper is not None:
                wrappers[call.start] = wrapper
            continue
        bound = bind_arguments(call, SIGNATURE, required=2)
        label = f"ai_query({bound['endpoint'].text}, ...)"
        endpoint = bound["endpoint"].literal
        task = None
        if endpoint is None or (endpoint is not NotImplemented and not isinstance(endpoint, str)):
            raise ArgumentError(f"{label}: the endpoint must be a string, got {bound['endpoint'].text}; "
                                "name a registry endpoint, e.g. ai_query('my-endpoint', prompt)")
        if isinstance(endpoint, str):
            config = state.registry.get(endpoint)
            task = config.task
            used.add(endpoint)
            if "files" in bound and (why := files_unsupported_reason(config)) is not None:
                raise ArgumentError(f"{label}: {why}")
        return_type = bound["returnType"].literal if "returnType" in bound else None
        if return_type is NotImplemented:
            raise argument_error("AI_FUNCTION_UNSUPPORTED_RETURN_TYPE",
                                 f"{label}: returnType must be a string literal like 'STRING', got {bound['returnType'].text}")
        fail_on_error = bound["failOnError"].literal if "failOnError" in bound else True
        if not isinstance(fail_on_error, bool):
            raise ArgumentError(f"{label}: failOnError must be true or false, got {bound['failOnError'].text}")
        params = bound["modelParameters"].literal if "modelParameters" in bound else None
        if params is not NotImplemented and params is not None and not isinstance(params, dict):
            raise argument_error("AI_FUNCTION_INVALID_MODEL_PARAMETERS",
                                 f"{label}: modelParameters must be named_struct('max_tokens', 64, ...), got {bound['modelParameters'].text}")
        spec = _spec_for(state, label, task, return_type, fail_on_error, params if isinstance(params, dict) else None,
                         bound["responseFormat"].literal if "responseFormat" in bound else None, audit,
                         config=config if isinstance(endpoint, str) else None)
        # returnType and responseFormat are literals already read into the spec: not passed
        layout = tuple(a for a in SIGNATURE if a in bound and a not in ("returnType", "responseFormat"))
        positions = [next(i for i, arg in enumerate(call.args) if arg is bound[a]) for a in layout]
        # Spark binds ``?`` markers by their place in the text: never move one to another argument.
        moves_marker = positions != sorted(positions) and any(has_positional_marker(bound[a].text) for a in layout)
        if pipelined and not moves_marker:
            name, _ = _variant(spark, state, replace(spec, arguments=layout))
            whole[call.start] = f"{name}({', '.join(bound[a].text for a in layout)})"
            if "files" in bound:
                files_position[name] = layout.index("files")
            continue
        if spec == replace(UDFSpec(_DEFAULT_SPEC_TYPE), quota_broker=spec.quota_broker, quota_share=spec.quota_share):
            name = "ai_query"
        else:
            name, _ = _variant(spark, state, spec)
            replacements[call.start] = name
        if "files" in bound:
            files_position[name] = SIGNATURE.index("files")
    rewritten = replace_calls(query, whole, calls) if whole else replace_names(query, replacements, calls, wrappers)
    if files_position and check_files:  # a column's type is known only once Spark resolves it: before anything runs
        check_files_types(spark, rewritten, files_position)
    prepare_endpoints(state.registry, used, state.prepared)
    return rewritten


def _spec_for(
    state: _SessionState, label: str, task: str | None, return_type: Any, fail_on_error: bool,
    params: Mapping[str, Any] | None, response_format: Any, audit: bool, *, config: Any = None,
) -> UDFSpec:
    """The UDF variant a call needs, its arguments checked (the SQL and DataFrame paths share this).

    ``config``: the endpoint's; for a custom model its signature checks the parameters and gives
    the default result type (see ``_custom_model``)."""
    try:
        return_type, custom = _custom_model(label, config, return_type, params, response_format)
        if params is not None:
            ModelParameters.from_mapping(params, custom=custom)
    except ArgumentError as exc:  # the core's checks of the parameters: Databricks' condition for them
        raise argument_error("AI_FUNCTION_INVALID_MODEL_PARAMETERS", str(exc.args[0])) from None
    fmt_json, fmt_struct = _response_format(response_format, label) if response_format is not None else (None, None)
    if fmt_json is not None and task == "llm/v1/embeddings":
        raise argument_error("AI_FUNCTION_UNSUPPORTED_RESPONSE_FORMAT", f"{label}: responseFormat applies to chat and completions endpoints, not embeddings")
    if return_type is not None:
        value_type = return_type if hasattr(return_type, "jsonValue") else parse_return_type(return_type)
    elif fmt_struct is not None:
        value_type = fmt_struct
    else:
        value_type = default_value_type(task or "llm/v1/chat")
    return UDFSpec(
        value_type.json(),
        with_error=(fail_on_error is False) and not audit,
        audit=audit,
        response_format_json=fmt_json,
        progress_address=state.progress_address,
        quota_broker=state.quota_broker.address if state.quota_broker is not None else None,
        quota_share=state.quota_share,
    )


def _custom_model(label: str, config: Any, return_type: Any, params: Mapping[str, Any] | None,
                  response_format: Any) -> tuple[Any, bool]:
    """(return type, custom params allowed) for a call to ``config``'s endpoint.

    An MLflow model whose signature names input features is a custom model, as Databricks has
    them: literal ``modelParameters`` must be declared params of its signature (refused here,
    naming the declared ones), and without ``returnType`` / ``responseFormat`` the result takes
    the signature's output type instead of STRING.
    """
    if config is None:
        return return_type, False
    custom = any(e.may_be_custom for e in config.served_entities)
    contract = model_contract(config.entity)
    if contract is None or not contract.takes_records or config.task == "llm/v1/embeddings":
        return return_type, custom
    if params:
        check_params(params, contract.params, repr(config.entity.model_name))
    if return_type is None and response_format is None and contract.output_ddl is not None:
        return_type = contract.output_ddl
    return return_type, custom


def _variant(spark: "SparkSession", state: _SessionState, spec: UDFSpec) -> tuple[str, Any]:
    """(registered name, UDF object) of the variant for ``spec``, registering it once."""
    entry = state.variants.get(spec)
    if entry is None:
        name = _variant_name(spec)
        fn = build_udf(spec, state.registry)
        spark.udf.register(name, fn)
        entry = state.variants[spec] = (name, fn)
    return entry


@raises_conditions
def ai_query(
    endpoint: str,
    request: "ColumnOrName",
    *,
    returnType: "str | DataType | None" = None,  # noqa: N803 - the SQL argument names
    failOnError: bool = True,  # noqa: N803
    modelParameters: Mapping[str, Any] | None = None,  # noqa: N803
    responseFormat: "str | StructType | Mapping[str, Any] | type | None" = None,  # noqa: N803
    files: "ColumnOrName | None" = None,
    audit: bool = False,
) -> "Column":
    """``ai_query`` as a DataFrame column, with the SQL function's arguments::

        from spark_udfs import ai_query
        df.select("id", ai_query("local-chat", "prompt", modelParameters={"max_tokens": 32}).alias("answer"))

    ``returnType`` is a DDL string or a ``DataType``; ``responseFormat`` a JSON schema (text or
    dict), a ``StructType`` / ``STRUCT<...>`` string, or a Pydantic model class.
    ``audit=True`` returns ``STRUCT<response, aiq_endpoint, ..., aiq_batch_id>`` (the fields:
    ``AUDIT_COLUMNS``; see ``batch_runner.flatten_audit``). Checked on the driver, like the SQL form.
    """
    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F

    # The active session is per thread; in a thread that never built one, the process's session.
    spark = SparkSession.getActiveSession() or SparkSession._instantiatedSession
    if spark is None:
        raise ArgumentError("ai_query(...) as a column needs a SparkSession: build one and call spark_udfs.register(spark) first")
    state = _state(spark)
    label = f"ai_query({endpoint!r}, ...)"
    if not isinstance(endpoint, str):
        raise ArgumentError(f"{label}: the endpoint must be a string naming a registry endpoint")
    config = state.registry.get(endpoint)
    task = config.task
    if files is not None and (why := files_unsupported_reason(config)) is not None:
        raise ArgumentError(f"{label}: {why}")
    if not isinstance(failOnError, bool):
        raise argument_error("AI_QUERY_INVALID_ARGUMENT", f"{label}: failOnError must be True or False, got {failOnError!r}")
    spec = _spec_for(state, label, task, returnType, failOnError, modelParameters, _response_format_text(responseFormat, label), audit,
                     config=config)
    column = F.col(request) if isinstance(request, str) else request
    args: dict[str, Any] = {"endpoint": F.lit(endpoint), "request": column}
    if not failOnError:
        args["failOnError"] = F.lit(False)
    if modelParameters:
        args["modelParameters"] = F.struct(*[F.lit(v).alias(k) for k, v in modelParameters.items()])
    if files is not None:
        args["files"] = F.col(files) if isinstance(files, str) else files
    # the pipelined variant (arguments by position): see ``rewrite``
    _, fn = _variant(spark, state, replace(spec, arguments=tuple(args)))
    prepare_endpoints(state.registry, {endpoint}, state.prepared)
    return fn(*args.values())


def _task_variant(spark: "SparkSession", state: _SessionState, task: Any, key: Any, endpoint: str, return_type: Any = None) -> str:
    """The registered name of a task function variant (a v2 form, an ai_extract STRUCT), registered once."""
    name = state.variants.get(key)
    if name is None:
        name = f"{task.name}__{hashlib.sha1(repr(key).encode()).hexdigest()[:12]}"
        broker = state.quota_broker.address if state.quota_broker is not None else None
        spark.udf.register(name, build_task_udf(task, endpoint, state.registry, broker, state.quota_share,
                                                state.progress_address, return_type=return_type))
        state.variants[key] = name
    return name


def _response_format_text(fmt: Any, label: str) -> str | None:
    """``responseFormat`` as the SQL form takes it: a StructType as its DDL, a dict or a Pydantic
    model class as its JSON schema."""
    if fmt is None or isinstance(fmt, str):
        return fmt
    if isinstance(fmt, Mapping):
        return json.dumps(dict(fmt))
    if hasattr(fmt, "simpleString") and hasattr(fmt, "fields"):  # a StructType
        return fmt.simpleString()
    if isinstance(fmt, type) and hasattr(fmt, "model_json_schema"):  # a Pydantic model
        return json.dumps(fmt.model_json_schema())
    raise argument_error("AI_FUNCTION_UNSUPPORTED_RESPONSE_FORMAT", f"{label}: responseFormat must be a JSON schema (str or dict), a StructType or a Pydantic model class, "
                        f"got {type(fmt).__name__}")


def _rewrite_task_call(spark: "SparkSession", state: _SessionState, call: Any) -> tuple[str | None, str | None]:
    """Check a task function call on the driver: (the variant to call or None, the function to wrap it in or None).

    ``ai_extract`` with literal labels gets a STRUCT variant; the v2 forms of ``ai_classify`` and
    ``ai_extract`` a variant whose JSON answer ``parse_json`` makes a VARIANT (``_tasks_v2``).
    """
    task = TASKS[call.name.lower()]
    first = "expr1" if task.name == "ai_similarity" else ("prompt" if task.name == "ai_gen" else "content")
    bound = bind_arguments(call, [first, *task.args], required=1 + (task.name in ("ai_classify", "ai_extract", "ai_mask",
                                                                                     "ai_similarity", "ai_translate")))
    endpoint = state.task_endpoints[task.name]
    state.registry.get(endpoint)  # an unknown endpoint fails here, naming the known ones
    if task.name in ("ai_classify", "ai_extract"):
        labels = bound["labels"].literal
        options = bound["options"].literal if "options" in bound else None
        if options is not None and options is not NotImplemented and not isinstance(options, list):
            raise ArgumentError(f"{task.name}: options must be a map, e.g. map('version', '2.0'), got {bound['options'].text}")
        try:
            opts = options_of(task.name, options) if isinstance(options, list) else {}
            if is_v2(labels, options) or options is NotImplemented:
                if labels is not NotImplemented:
                    labels_of(task.name, labels)
                return _task_variant(spark, state, v2_task(task.name), (task.name, "v2"), endpoint), "parse_json"
        except ValueError as exc:
            raise ArgumentError(f"{task.name}: {exc}") from None
        if opts.get("multilabel", "false").lower() == "true":
            raise ArgumentError(f"{task.name}: multilabel needs version 2.0 (its result is a VARIANT); drop 'version', '1.0' from the options")
    if "labels" in bound:
        labels = bound["labels"].literal
        if labels is not NotImplemented and (not isinstance(labels, list) or not labels
                                             or not all(isinstance(x, str) and x for x in labels)):
            raise ArgumentError(f"{task.name}: labels must be a non-empty array of strings, e.g. array('a', 'b'), got {bound['labels'].text}")
        if task.name == "ai_classify" and isinstance(labels, list) and not 2 <= len(labels) <= 20:
            raise ArgumentError(
                f"ai_classify: labels must hold 2 to 20 labels (at least 2 to choose between), got {len(labels)}: {bound['labels'].text}"
            )
        if task.name == "ai_extract":
            if labels is NotImplemented:
                raise ArgumentError("ai_extract: labels must be a literal array('name', 'place', ...) so the result type is known")
            struct = extract_struct_type(labels)
            return _task_variant(spark, state, task, ("ai_extract", struct.json()), endpoint, struct), None
    if "to_lang" in bound and isinstance(bound["to_lang"].literal, str):
        try:
            language_name(bound["to_lang"].literal)
        except ValueError as exc:
            raise argument_error("AI_QUERY_INVALID_ARGUMENT", f"ai_translate: {exc}") from None
    if "max_words" in bound:
        words = bound["max_words"].literal
        if words is not NotImplemented and (not isinstance(words, int) or isinstance(words, bool) or words < 0):
            raise argument_error("AI_FUNCTION_INVALID_MAX_WORDS",
                                 f"ai_summarize: max_words must be a non-negative integer, got {bound['max_words'].text}")
    return None, None


def sql(spark: "SparkSession", query: str, *, audit: bool = False, args: Any = None,
        progress: bool | None = None) -> "DataFrame":
    """``spark.sql`` with ``ai_query`` calls rewritten (see ``rewrite``).

    ``progress=True``: a live bar (rows done, failed, tokens, rows/s, concurrency; a widget in
    Jupyter) while the query's actions run, see ``_live_progress``. ``None`` (the default): on in
    a Jupyter kernel unless something else (a job's own display) collects the session's progress.
    ``False`` turns the session's live progress off.
    """
    state = _state(spark)
    if progress is False and state.live_progress is not None:
        state.live_progress.close()
        state.live_progress = state.progress_address = None
    if progress is None:
        progress = state.live_progress is None and state.progress_address is None and in_notebook()
    if progress and state.live_progress is None:
        # where the executors reach the driver's other services (a Connect client without
        # AIQ_DRIVER_HOST: the loopback, as a job's collector)
        state.live_progress = LiveProgress(services_host(spark) or "127.0.0.1")
        state.progress_address = state.live_progress.address
    return named_as_written(state.original_sql(rewrite(spark, query, audit=audit), args))


_PERSISTENT_FUNCTION = re.compile(r"^\s*CREATE\s+(OR\s+REPLACE\s+)?FUNCTION\b", re.I)
_PARSED_VARIANT = re.compile(r"^parse_json\((ai_classify|ai_extract)__[0-9a-f]{12}\((.*)\)\)$", re.S)
_VARIANT_IN_NAME = re.compile(r"\b(ai_query|ai_extract|ai_classify)__[0-9a-f]{12}\(")


def named_as_written(df: "DataFrame") -> "DataFrame":
    """``df`` with the typed variants' names in its unaliased column names read back as the
    function the user wrote (``ai_query(sim-chat, text)``, not ``ai_query__24963849780f(...)``)."""
    columns = df.columns
    renamed = [_VARIANT_IN_NAME.sub(r"\1(", _PARSED_VARIANT.sub(r"\1(\2)", c)) for c in columns]
    return df if renamed == columns else df.toDF(*renamed)
