"""``ai_parse_document(content [, options])`` in Spark: a SQL function returning VARIANT.

A Python UDF cannot return VARIANT from Arrow, and a temporary SQL function can: the Arrow UDF
``ai_parse_document__json`` returns each document as JSON, and ``register`` defines
``ai_parse_document`` as ``parse_json`` over it. Being a SQL function (not a rewrite of
``spark.sql`` text) it works the same in ``spark.sql``, ``selectExpr``, ``F.expr`` and named
arguments, with no change to the ``ai_query`` rewrite.

The reading itself is engine-free (:mod:`ai_query._documents`); this module sends one Arrow
batch's image and scanned pages to the vision endpoint through the shared client's pipeline
(dedup, retries, quotas, the task's journal), all pages of the batch at once.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Mapping

import pyarrow as pa

from ai_query import ArgumentError, EndpointRegistry, shared_client
from ai_query._documents import VISION_PARAMS, ParsedDocument, ParseOptions, start_document
from ai_query._files import files_unsupported_reason

from ._conditions import argument_error
from ._udf import start_task_rows

if TYPE_CHECKING:
    from pyspark.sql import Column, SparkSession
    from pyspark.sql._typing import ColumnOrName

JSON_UDF = "ai_parse_document__json"
FUNCTION = "ai_parse_document"


def _options_of(value: Any, default_endpoint: str | None, registry: EndpointRegistry,
                seen: dict[tuple[tuple[str, Any], ...], ParseOptions]) -> ParseOptions:
    key = tuple(sorted(value or []))
    options = seen.get(key)
    if options is None:
        try:
            options = ParseOptions.from_map(dict(key), default_endpoint)
        except ArgumentError as exc:  # the query's fault, raised in the worker: with its condition
            raise argument_error("AI_QUERY_INVALID_ARGUMENT", str(exc.args[0])) from None
        if options.image_endpoint is not None:
            config = registry.get(options.image_endpoint)  # an unknown name fails the query, listing the known ones
            if (why := files_unsupported_reason(config)) is not None:
                raise argument_error("AI_QUERY_INVALID_ARGUMENT", f"ai_parse_document: imageEndpoint {options.image_endpoint!r} cannot read images: {why}")
        seen[key] = options
    return options


def parse_batch(contents: list[bytes | None], options: list[Any], registry: EndpointRegistry, default_endpoint: str | None,
                quota_broker: tuple[str, int] | None, quota_share: float,
                progress_address: tuple[str, int] | None) -> list[str | None]:
    """One Arrow batch: each row's document as Databricks' JSON shape (NULL content: NULL)."""
    seen: dict[tuple[tuple[str, Any], ...], ParseOptions] = {}
    docs: list[ParsedDocument | None] = []
    for content, opts in zip(contents, options):
        docs.append(None if content is None else start_document(content, _options_of(opts, default_endpoint, registry, seen)))
    pending = [(doc, page_id, request) for doc in docs if doc is not None for page_id, request in sorted(doc.vision.items())]
    if pending:
        client = shared_client(registry, quota_broker, quota_share)
        endpoints = [doc.options.image_endpoint for doc, _, _ in pending]
        results = start_task_rows(client, progress_address, endpoints, [r for _, _, r in pending],
                                  [dict(VISION_PARAMS)] * len(pending), [None] * len(pending)).wait()
        for (doc, page_id, _), endpoint, result in zip(pending, endpoints, results):
            if result.ok:
                doc.add_vision_answer(page_id, str(result.value))
            else:
                doc.errors.append((f"page {page_id}: the vision endpoint {endpoint!r} failed: {result.error}", page_id))
    return [None if doc is None else json.dumps(doc.result(), ensure_ascii=False) for doc in docs]


def build_parse_udf(registry: EndpointRegistry, default_endpoint: str | None, quota_broker: tuple[str, int] | None,
                    quota_share: float, progress_address: tuple[str, int] | None = None):
    from pyspark.sql.functions import arrow_udf
    from pyspark.sql.types import StringType

    def ai_parse_document__json(content: pa.Array, options: pa.Array = None) -> pa.Array:
        n = len(content)
        opts = options.to_pylist() if options is not None else [None] * n
        return pa.array(parse_batch(content.to_pylist(), opts, registry, default_endpoint, quota_broker, quota_share,
                                    progress_address), type=pa.string())

    return arrow_udf(ai_parse_document__json, returnType=StringType()).asNondeterministic()


def register_parse_document(spark: "SparkSession", sql: Any, registry: EndpointRegistry, default_endpoint: str | None,
                            quota_broker: tuple[str, int] | None, quota_share: float) -> None:
    """Register ``ai_parse_document`` (VARIANT) on ``spark``; ``sql`` is the session's unwrapped ``spark.sql``."""
    if default_endpoint is not None:
        config = registry.get(default_endpoint)
        if (why := files_unsupported_reason(config)) is not None:
            raise argument_error("AI_QUERY_INVALID_ARGUMENT", f"task_endpoints['ai_parse_document'] = {default_endpoint!r} cannot read images: {why}")
    spark.udf.register(JSON_UDF, build_parse_udf(registry, default_endpoint, quota_broker, quota_share))
    sql(f"CREATE OR REPLACE TEMPORARY FUNCTION {FUNCTION}(content BINARY, options MAP<STRING, STRING> DEFAULT map()) "
        f"RETURNS VARIANT RETURN parse_json({JSON_UDF}(content, options))")


def ai_parse_document(content: "ColumnOrName", options: Mapping[str, str] | None = None) -> "Column":
    """``ai_parse_document`` as a DataFrame column (VARIANT)::

        df.select(spark_udfs.ai_parse_document("content", {"version": "2.0"}).alias("parsed"))
    """
    from pyspark.sql import functions as F

    column = F.col(content) if isinstance(content, str) else content
    if not options:
        return F.call_function(FUNCTION, column)
    pairs = [F.lit(str(x)) for kv in options.items() for x in kv]
    return F.call_function(FUNCTION, column, F.create_map(*pairs))
