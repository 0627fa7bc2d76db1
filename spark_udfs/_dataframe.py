"""``ai_query`` in DataFrame expressions: ``df.selectExpr(...)`` and ``F.expr(...)`` get the SQL rewrite.

A UDF's result type is fixed at registration, so an ``ai_query`` call with ``returnType`` or
``failOnError => false`` must be pointed at a typed variant before Spark parses it. ``spark.sql``
is wrapped per session; expressions have no per-session hook, so ``register`` wraps, once per
process, the ``selectExpr`` of the session's DataFrame class and ``pyspark.sql.functions.expr``.
The wrappers do nothing for a session ``register`` never saw, nor for text that names no AI
function. An expression reaching Spark some other way (``df.filter("...")``, ``expr`` imported
by name before ``register``) reaches the plain STRING UDF, which refuses ``returnType``,
``responseFormat`` and ``failOnError => false`` with a message naming ``spark_udfs.ai_query(...)``
instead of answering free text.
"""

from __future__ import annotations

import builtins
import functools
import re
from typing import Any, Callable

_AI_CALL = re.compile(r"\bai_[a-z_]+\s*\(", re.I)
_hooked: set[Any] = set()


def install(df_class: type, is_registered: Callable[[Any], bool], rewrite_expression: Callable[[Any, str], str],
            rename: Callable[[Any], Any]) -> None:
    """Wrap ``df_class.selectExpr`` and ``pyspark.sql.functions.expr`` (once each)."""
    if df_class not in _hooked:
        _hooked.add(df_class)
        original_select_expr = df_class.selectExpr

        @functools.wraps(original_select_expr)
        def selectExpr(self: Any, *expr: Any) -> Any:  # noqa: N802 - pyspark's name
            texts = list(expr[0]) if len(expr) == 1 and isinstance(expr[0], list) else list(expr)
            spark = self.sparkSession
            if not is_registered(spark) or not any(isinstance(t, str) and _AI_CALL.search(t) for t in texts):
                return original_select_expr(self, *expr)
            rewritten = [rewrite_expression(spark, t) if isinstance(t, str) and _AI_CALL.search(t) else t for t in texts]
            return rename(original_select_expr(self, *rewritten))

        df_class.selectExpr = selectExpr  # type: ignore[attr-defined]

    from pyspark.sql import functions as F
    from pyspark.sql.functions import builtin

    if "expr" not in _hooked:
        _hooked.add("expr")
        original_expr = builtin.expr

        @functools.wraps(original_expr)
        def expr(str: str) -> Any:  # noqa: A002 - pyspark's argument name
            from pyspark.sql import SparkSession

            spark = SparkSession.getActiveSession()
            if spark is None or not is_registered(spark) or not isinstance(str, builtins.str) or not _AI_CALL.search(str):
                return original_expr(str)
            rewritten = rewrite_expression(spark, str)
            column = original_expr(rewritten)
            # one whole call: the column is named as written (an inner alias would be dropped anyway)
            return column.alias(" ".join(str.split())) if rewritten != str and _whole_call(str) else column

        F.expr = builtin.expr = expr  # type: ignore[assignment]


def _whole_call(text: str) -> bool:
    from ._rewrite import find_calls

    stripped = text.strip()
    calls = find_calls(stripped, {m.group(0).rstrip("( \t\n").lower() for m in _AI_CALL.finditer(stripped)})
    return bool(calls) and calls[0].start == 0 and calls[0].end == len(stripped)
