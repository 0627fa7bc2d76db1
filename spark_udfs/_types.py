"""Result types: parse a ``returnType`` DDL once on the driver; convert responses on executors."""

from __future__ import annotations

import json
import re
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from pyspark.sql.types import (
    ArrayType,
    BinaryType,
    BooleanType,
    ByteType,
    DataType,
    DateType,
    DecimalType,
    DoubleType,
    FloatType,
    IntegerType,
    LongType,
    MapType,
    ShortType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from ._conditions import argument_error

AUDIT_FIELDS: list[StructField] = [
    StructField("aiq_endpoint", StringType()),
    StructField("aiq_model", StringType()),
    StructField("aiq_prompt_tokens", LongType()),
    StructField("aiq_completion_tokens", LongType()),
    StructField("aiq_total_tokens", LongType()),
    StructField("aiq_usage_estimated", BooleanType()),
    StructField("aiq_cost_usd", DoubleType()),
    StructField("aiq_latency_ms", DoubleType()),
    StructField("aiq_attempts", IntegerType()),
    StructField("aiq_status", StringType()),
    StructField("aiq_error", StringType()),
    StructField("aiq_request_id", StringType()),
    StructField("aiq_completed_at", TimestampType()),
    StructField("aiq_deduplicated", BooleanType()),
    StructField("aiq_status_code", IntegerType()),
    StructField("aiq_batch_id", StringType()),
]
AUDIT_COLUMNS: list[str] = [f.name for f in AUDIT_FIELDS]


def parse_return_type(ddl: str) -> DataType:
    """Parse a DDL type (``'STRING'``, ``'ARRAY<FLOAT>'``, ``'STRUCT<a: INT>'``) or raise naming it."""
    from pyspark.sql.types import _parse_datatype_string

    if not isinstance(ddl, str) or not ddl.strip():
        raise argument_error("AI_FUNCTION_UNSUPPORTED_RETURN_TYPE", f"returnType must be a non-empty DDL type string like 'STRING' or 'STRUCT<a: INT>', got {ddl!r}")
    try:
        return _parse_datatype_string(ddl)
    except Exception as exc:  # pyspark raises its own ParseException family
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise argument_error("AI_FUNCTION_UNSUPPORTED_RETURN_TYPE", 
            f"returnType {ddl!r} is not a valid Spark SQL type ({first}); use e.g. 'STRING', 'FLOAT', "
            "'ARRAY<FLOAT>' or 'STRUCT<label: STRING, score: DOUBLE>'"
        ) from None


def arrow_type(dt: DataType) -> Any:
    """The Arrow type Spark uses for ``dt`` (timestamps as UTC instants), on every supported pyspark."""
    from pyspark.sql.pandas.types import to_arrow_type

    return _utc(to_arrow_type, dt)


def arrow_schema(schema: StructType) -> Any:
    """The Arrow schema Spark uses for ``schema`` (timestamps as UTC instants), on every supported pyspark."""
    from pyspark.sql.pandas.types import to_arrow_schema

    return _utc(to_arrow_schema, schema)


def _utc(convert_fn: Any, dt: DataType) -> Any:
    # pyspark 4.2 takes timezone="UTC"; 4.1 took timestamp_utc (True by default: the same types).
    import inspect

    if "timezone" in inspect.signature(convert_fn).parameters:
        return convert_fn(dt, timezone="UTC")
    return convert_fn(dt)


def result_type(value_type: DataType, *, with_error: bool, audit: bool) -> DataType:
    """The UDF's return type for a value type: plain, with ``errorMessage``, or with audit columns."""
    if audit:
        return StructType([StructField("response", value_type), *AUDIT_FIELDS])
    if with_error:
        return StructType([StructField("response", value_type), StructField("errorMessage", StringType())])
    return value_type


_FENCE = re.compile(r"^\s*```(?:json|JSON)?\s*(.*?)\s*```\s*$", re.S)


def _load_json(text: str) -> Any:
    m = _FENCE.match(text)
    return json.loads(m.group(1) if m else text)


def convert(value: Any, dt: DataType) -> Any:
    """The model's answer as a Python value of Spark type ``dt``; ``ValueError`` says why not."""
    if value is None:
        return None
    if isinstance(dt, StringType):
        return value if isinstance(value, str) else json.dumps(value)
    if isinstance(dt, (FloatType, DoubleType)):
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        return float(value.strip()) if isinstance(value, str) else float(value)
    if isinstance(dt, (IntegerType, LongType, ShortType, ByteType)):
        if isinstance(value, str):
            value = value.strip()
            try:
                return int(value)
            except ValueError:
                f = float(value)
        else:
            f = float(value)
        if not f.is_integer():
            raise ValueError(f"expected an integer, got {value!r}")
        return int(f)
    if isinstance(dt, BooleanType):
        if isinstance(value, bool):
            return value
        text = str(value).strip().strip(".").lower()
        if text in ("true", "yes", "1"):
            return True
        if text in ("false", "no", "0"):
            return False
        raise ValueError(f"expected a boolean, got {value!r:.80}")
    if isinstance(dt, DecimalType):
        return Decimal(str(value).strip())
    if isinstance(dt, DateType):
        return value if isinstance(value, date) else date.fromisoformat(str(value).strip())
    if isinstance(dt, TimestampType):
        return value if isinstance(value, datetime) else datetime.fromisoformat(str(value).strip())
    if isinstance(dt, BinaryType):
        return value if isinstance(value, bytes) else str(value).encode()
    if isinstance(dt, (ArrayType, StructType, MapType)) and isinstance(value, str):
        try:
            value = _load_json(value)
        except ValueError as exc:
            raise ValueError(f"the response is not JSON ({exc}): {value[:120]!r}") from None
    if isinstance(dt, ArrayType):
        if not isinstance(value, list):
            raise ValueError(f"expected a JSON array, got {type(value).__name__}")
        return [convert(v, dt.elementType) for v in value]
    if isinstance(dt, MapType):
        if not isinstance(value, dict):
            raise ValueError(f"expected a JSON object, got {type(value).__name__}")
        return [(convert(k, dt.keyType), convert(v, dt.valueType)) for k, v in value.items()]
    if isinstance(dt, StructType):
        if not isinstance(value, dict):
            raise ValueError(f"expected a JSON object, got {type(value).__name__}")
        lowered = {str(k).lower(): v for k, v in value.items()}
        return {f.name: convert(value.get(f.name, lowered.get(f.name.lower())), f.dataType) for f in dt.fields}
    raise ValueError(f"unsupported return type {dt.simpleString()}")


def default_value_type(task: str) -> DataType:
    """What ``ai_query`` returns for an endpoint's task when no ``returnType`` is given."""
    return ArrayType(FloatType()) if task == "llm/v1/embeddings" else StringType()


def struct_to_json_schema(dt: DataType) -> dict[str, Any]:
    """A JSON schema for a Spark type, for constrained decoding (``responseFormat => 'STRUCT<...>'``)."""
    if isinstance(dt, StructType):
        return {
            "type": "object",
            "properties": {f.name: struct_to_json_schema(f.dataType) for f in dt.fields},
            "required": [f.name for f in dt.fields],
            "additionalProperties": False,
        }
    if isinstance(dt, ArrayType):
        return {"type": "array", "items": struct_to_json_schema(dt.elementType)}
    if isinstance(dt, MapType):
        return {"type": "object", "additionalProperties": struct_to_json_schema(dt.valueType)}
    if isinstance(dt, BooleanType):
        return {"type": "boolean"}
    if isinstance(dt, (IntegerType, LongType, ShortType, ByteType)):
        return {"type": "integer"}
    if isinstance(dt, (FloatType, DoubleType, DecimalType)):
        return {"type": "number"}
    return {"type": "string"}
