"""``responseFormat`` of ``ai_query``: a JSON schema or a ``STRUCT<...>`` type, checked on the driver.

A backend refuses a malformed schema on every row, after the tasks started; the parts it would
refuse are checked here, before anything is sent, and named with the fix.
"""

from __future__ import annotations

import json
from typing import Any

from ai_query import ArgumentError

from ._conditions import argument_error
from ._types import parse_return_type, struct_to_json_schema


def response_format(text: Any, call_name: str) -> tuple[str | None, Any]:
    """(OpenAI response_format JSON, the Spark struct type it implies or None)."""
    if text is None:
        return None, None
    if not isinstance(text, str) or not text.strip():
        raise argument_error("AI_FUNCTION_UNSUPPORTED_RESPONSE_FORMAT", f"{call_name}: responseFormat must be a string literal: a JSON schema or a STRUCT<...> type")
    stripped = text.strip()
    if stripped.startswith(("{", "[")):
        try:
            schema = json.loads(stripped)
        except ValueError as exc:
            raise argument_error("AI_FUNCTION_UNSUPPORTED_RESPONSE_FORMAT", f"{call_name}: responseFormat is not valid JSON ({exc}); give a JSON schema or a STRUCT<...> type") from None
        if not isinstance(schema, dict):
            raise argument_error("AI_FUNCTION_UNSUPPORTED_RESPONSE_FORMAT", 
                f"{call_name}: responseFormat must be a JSON object (a JSON schema such as "
                f"'{{\"type\": \"object\", \"properties\": {{...}}}}') or a STRUCT<...> type, got a JSON {type(schema).__name__}"
            )
        if schema.get("type") == "json_schema" and "json_schema" in schema:
            fmt = schema
            inner = schema["json_schema"].get("schema") if isinstance(schema["json_schema"], dict) else None
            if inner is not None:
                _check_json_schema(inner, call_name, "$")
        elif schema.get("type") == "json_object":
            fmt = schema
        else:
            _check_json_schema(schema, call_name, "$")
            fmt = {"type": "json_schema", "json_schema": {"name": "response", "schema": schema, "strict": True}}
        return json.dumps(fmt, sort_keys=True), None
    try:
        struct = parse_return_type(stripped)
    except ArgumentError as exc:
        reason = str(exc.args[0]).split(" is not a valid Spark SQL type ", 1)[-1]
        raise argument_error("AI_FUNCTION_UNSUPPORTED_RESPONSE_FORMAT", f"{call_name}: responseFormat {stripped!r} is not a valid STRUCT<...> type {reason}") from None
    from pyspark.sql.types import StructType

    if not isinstance(struct, StructType):
        raise argument_error("AI_FUNCTION_UNSUPPORTED_RESPONSE_FORMAT", f"{call_name}: responseFormat {stripped!r} must be a STRUCT<...> type or a JSON schema")
    fmt = {"type": "json_schema", "json_schema": {"name": "response", "schema": struct_to_json_schema(struct), "strict": True}}
    return json.dumps(fmt, sort_keys=True), struct


_JSON_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


def _check_json_schema(schema: Any, call_name: str, where: str) -> None:
    """The parts of a JSON schema a backend would refuse, checked before any task runs."""
    if not isinstance(schema, dict):
        raise argument_error("AI_FUNCTION_UNSUPPORTED_RESPONSE_FORMAT", f"{call_name}: responseFormat's JSON schema at {where} must be an object, got {json.dumps(schema)}")
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    for k in kinds:
        if k not in _JSON_TYPES:
            raise argument_error("AI_FUNCTION_UNSUPPORTED_RESPONSE_FORMAT", 
                f"{call_name}: responseFormat's JSON schema has type {k!r} at {where}; JSON schema types are {', '.join(_JSON_TYPES)}"
            )
    props = schema.get("properties")
    if props is not None:
        if not isinstance(props, dict):
            raise argument_error("AI_FUNCTION_UNSUPPORTED_RESPONSE_FORMAT", f"{call_name}: responseFormat's JSON schema 'properties' at {where} must be an object of schemas")
        for name, sub in props.items():
            _check_json_schema(sub, call_name, f"{where}.properties.{name}")
    if "items" in schema:
        _check_json_schema(schema["items"], call_name, f"{where}.items")
    required = schema.get("required")
    if required is not None and (not isinstance(required, list) or not all(isinstance(r, str) for r in required)):
        raise argument_error("AI_FUNCTION_UNSUPPORTED_RESPONSE_FORMAT", f"{call_name}: responseFormat's JSON schema 'required' at {where} must be a list of property names")
