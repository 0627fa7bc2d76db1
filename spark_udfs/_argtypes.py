"""Argument types of ``ai_query`` calls, read from Spark's analyzed plan on the driver.

The SQL rewrite sees argument texts; a column's type is only known once Spark resolves the
query. A ``files`` argument of the wrong type (a STRING column) would make every row an error
after the tasks started, so the rewritten statement is analyzed (not run: a CTAS or an INSERT is
analyzed like a query) and the type of each ``files`` argument checked before ``spark.sql``
runs anything. A statement Spark cannot parse fails here with Spark's own error; a part left
unresolved (a ``?`` or ``:name`` marker bound later) is not checked here: the UDF then refuses a
wrong ``files`` type on the whole column before its first request (``_udf.start_batch``).
A Spark Connect client has no analyzer to call (and its ``spark.sql`` runs a CTAS at once), so
there the UDF's own check is the only one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from ._conditions import argument_error

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

FILES_TYPES = ("binary", "array<binary>", "void", "array<void>")
"""``files``: BINARY, ARRAY<BINARY> (or a NULL literal)."""


def _seq(scala_seq: Any) -> list[Any]:
    return [scala_seq.apply(k) for k in range(scala_seq.size())]


def _udf_calls(expr: Any, out: list[Any]) -> None:
    if expr.getClass().getSimpleName() == "PythonUDF":
        out.append(expr)
    for child in _seq(expr.children()):
        _udf_calls(child, out)


def _plan_udf_calls(node: Any, out: list[Any]) -> None:
    """Every Python UDF call under ``node``: a plan (its expressions, children and, for a CTAS or
    an INSERT, the query it holds as an inner child) or an expression."""
    if not node.getClass().getName().startswith("org.apache.spark.sql.catalyst.expressions."):
        for expr in _seq(node.expressions()):
            _udf_calls(expr, out)
        for child in [*_seq(node.children()), *_seq(node.innerChildren())]:
            _plan_udf_calls(child, out)
    else:
        _udf_calls(node, out)


def check_files_types(spark: "SparkSession", query: str, files_position: Mapping[str, int]) -> None:
    """Refuse a ``files`` argument that is not BINARY / ARRAY<BINARY> in ``query`` (already rewritten).

    ``files_position``: for each ``ai_query`` UDF name of the statement, where ``files`` sits
    when passed by position.
    """
    from ._session import is_connect

    if is_connect(spark):
        return  # no JVM here: the UDF refuses a wrong files type before its first request
    state = spark._jsparkSession.sessionState()  # type: ignore[attr-defined]
    # A statement Spark cannot parse raises Spark's own error here (pyspark converts it), as spark.sql would.
    plan = state.analyzer().execute(state.sqlParser().parsePlan(query))
    calls: list[Any] = []
    _plan_udf_calls(plan, calls)
    for call in calls:
        name = call.name()
        if name not in files_position:
            continue
        for position, arg in enumerate(_seq(call.children())):
            named = arg.getClass().getSimpleName() == "NamedArgumentExpression"
            if (arg.key() != "files") if named else position != files_position[name]:
                continue
            kind = (arg.value() if named else arg).dataType().simpleString()
            if kind not in FILES_TYPES:
                raise argument_error("AI_QUERY_FILES_DATATYPE_MISMATCH", 
                    f"ai_query: files => takes a BINARY or ARRAY<BINARY> column (image or PDF bytes), got {kind.upper()}; "
                    "nothing was sent. Read the files with spark.read.format('binaryFile') and pass its content column, "
                    "or unbase64(col) for base64 text"
                )
