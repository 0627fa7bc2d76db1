"""Custom models: a request that is a record of input features, typed by the model's signature.

Databricks feeds a custom model (an MLflow pyfunc behind a serving endpoint) one record per row:
``ai_query('fraud', named_struct('timestamp', ts, 'sender', s, 'text', t))`` reaches the model as
a one-row DataFrame with the columns ``timestamp, sender, text`` (``dataframe_records`` on the
wire). A struct request arrives here as a ``dict``; this module turns it into what the model
takes, using the MLflow signature when there is one:

- ``ModelContract.of(model_metadata)``: the signature's input columns and their MLflow types,
  the params it declares, and its output as a Spark DDL type (the result type ``ai_query``
  defaults to, read on the driver from the MLmodel file, without loading the model);
- ``typed_record``: a struct's fields coerced to the declared column types (a SQL ``0.5`` is a
  ``Decimal``, a model's ``double`` wants a float; a ``TIMESTAMP`` becomes a naive UTC pandas
  timestamp, MLflow's ``datetime``), fields matched case-insensitively;
- ``json_record``: the same record as JSON for ``dataframe_records`` over HTTP;
- ``check_params``: parameters the signature does not declare are refused with the model's
  declared names, on the driver when they are literals (``rewrite``) and per row otherwise.

The parameter check covers names ``modelParameters`` gives; the ``llm/v1`` parameters a chat
endpoint may add by default (``max_tokens``) are dropped for a model that does not declare them,
as before, so a default cannot make a custom model unusable.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Iterable, Mapping

from .._errors import ArgumentError

_SCALAR_DDL = {"string": "STRING", "integer": "INT", "long": "BIGINT", "float": "FLOAT", "double": "DOUBLE",
               "boolean": "BOOLEAN", "datetime": "TIMESTAMP", "binary": "BINARY"}


def _type_name(mlflow_type: Any) -> str:
    """``DataType.double`` -> ``"double"``; an Array/Object/Map/AnyType keeps its class name."""
    name = getattr(mlflow_type, "name", None)
    if isinstance(name, str) and name in _SCALAR_DDL:
        return name
    return type(mlflow_type).__name__.lower()


def _ddl(mlflow_type: Any) -> str:
    """The Spark DDL of an MLflow column type (``Array(Object(...))`` -> ``ARRAY<STRUCT<...>>``)."""
    kind = _type_name(mlflow_type)
    if kind in _SCALAR_DDL:
        return _SCALAR_DDL[kind]
    if kind == "array":
        return f"ARRAY<{_ddl(mlflow_type.dtype)}>"
    if kind == "object":
        return "STRUCT<" + ", ".join(f"`{p.name}`: {_ddl(p.dtype)}" for p in mlflow_type.properties) + ">"
    if kind == "map":
        return f"MAP<STRING, {_ddl(mlflow_type.value_type)}>"
    return "STRING"  # AnyType and what MLflow adds later: the JSON text


def _tensor_ddl(spec: Any) -> str:
    dtype = getattr(spec, "type", None)
    kind = getattr(dtype, "kind", "")
    element = {"f": "DOUBLE" if getattr(dtype, "itemsize", 8) == 8 else "FLOAT", "i": "BIGINT", "u": "BIGINT",
               "b": "BOOLEAN"}.get(kind, "STRING")
    shape = tuple(getattr(spec, "shape", ()) or ())
    return element if len(shape) <= 1 else f"ARRAY<{element}>"


@dataclass(frozen=True)
class ModelContract:
    """What a model's MLflow signature promises: input columns, declared params, output type."""

    inputs: tuple[tuple[str, str], ...] = ()
    """Named input columns and their MLflow type names, in signature order."""
    params: tuple[str, ...] = ()
    """The parameter names the signature declares (``predict(..., params=...)``)."""
    output_ddl: str | None = None
    """The signature's output as a Spark type (one column: its type; several: a STRUCT)."""

    @classmethod
    def of(cls, metadata: Any) -> "ModelContract":
        """The contract of an MLflow model's metadata (``model.metadata`` or ``get_model_info(uri)``)."""
        signature = getattr(metadata, "signature", None)
        if signature is None:
            return cls()
        inputs: list[tuple[str, str]] = []
        schema = getattr(signature, "inputs", None)
        if schema is not None and not schema.is_tensor_spec():
            inputs = [(c.name, _type_name(c.type)) for c in schema.inputs if isinstance(c.name, str)]
        declared = getattr(signature, "params", None)
        params = tuple(p.name for p in declared.params) if declared is not None else ()
        return cls(tuple(inputs), params, _output_ddl(getattr(signature, "outputs", None)))

    @property
    def takes_records(self) -> bool:
        """Its inputs are named features (not the chat schema's ``messages``, not a lone ``prompt``)."""
        names = [name for name, _ in self.inputs]
        return bool(names) and "messages" not in names and names != ["prompt"]


def _output_ddl(schema: Any) -> str | None:
    if schema is None or not schema.inputs:
        return None
    if schema.is_tensor_spec():
        return _tensor_ddl(schema.inputs[0]) if len(schema.inputs) == 1 else None
    columns = schema.inputs
    if len(columns) == 1:
        return _ddl(columns[0].type)
    if not all(isinstance(c.name, str) for c in columns):
        return None
    return "STRUCT<" + ", ".join(f"`{c.name}`: {_ddl(c.type)}" for c in columns) + ">"


def check_params(names: Iterable[str], declared: Iterable[str], model: str, *, llm_names: Iterable[str] = ()) -> None:
    """Refuse parameters the model's signature does not declare (``llm_names`` pass: they are dropped)."""
    allowed = set(declared)
    unknown = sorted(n for n in names if n not in allowed and n not in set(llm_names))
    if not unknown:
        return
    if allowed:
        hint = f"it declares {', '.join(sorted(allowed))}; pass only those"
    else:
        hint = ("its signature declares no params; remove modelParameters, or log the model with a signature that has "
                "params (mlflow.models.infer_signature(..., params={...}))")
    raise ArgumentError(f"modelParameters: model {model} takes no parameter {', '.join(map(repr, unknown))}: {hint}")


def _plain(value: Any) -> Any:
    """A struct's value as plain Python (Decimals as floats), recursively."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() and value.as_tuple().exponent >= 0 else float(value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _coerce(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind in ("double", "float"):
        return float(value)
    if kind in ("long", "integer"):
        return int(value)
    if kind == "boolean":
        return bool(value)
    if kind == "string":
        return value if isinstance(value, str) else json.dumps(_plain(value), default=str) if isinstance(value, (Mapping, list)) else str(value)
    if kind == "datetime":
        import pandas as pd

        stamp = pd.Timestamp(value)
        return stamp.tz_convert("UTC").tz_localize(None) if stamp.tzinfo is not None else stamp
    return _plain(value)


def typed_record(value: Mapping[str, Any], contract: ModelContract) -> dict[str, Any]:
    """A struct request as one record of the model's input features, typed by its signature.

    Fields the signature does not name are kept (MLflow ignores extra columns); a declared column
    the struct lacks is left out, and MLflow names it (``Model is missing inputs [...]``).
    """
    lowered = {str(k).lower(): k for k in value}
    out: dict[str, Any] = {}
    for name, kind in contract.inputs:
        key = name if name in value else lowered.get(name.lower())
        if key is not None:
            out[name] = _coerce(value[key], kind)
    for key, item in value.items():
        if key not in out and str(key).lower() not in {n.lower() for n, _ in contract.inputs}:
            out[key] = _plain(item)
    return out


def json_value(value: Any) -> Any:
    """A value as JSON-native Python (timestamps as ISO text, numpy and Decimals as numbers)."""
    if isinstance(value, Decimal):
        return _plain(value)
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    if isinstance(value, bytes):
        import base64

        return base64.b64encode(value).decode("ascii")
    if hasattr(value, "isoformat") and hasattr(value, "to_pydatetime"):  # pandas Timestamp
        return value.isoformat()
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return json_value(value.tolist())
    if isinstance(value, float) and value != value:  # NaN: MLflow's scoring server writes null too
        return None
    return value


def json_record(value: Mapping[str, Any]) -> dict[str, Any]:
    """A struct request as one ``dataframe_records`` record (JSON; the server types it by its signature)."""
    return {str(k): json_value(v) for k, v in value.items()}


__all__ = ["ModelContract", "check_params", "json_record", "json_value", "typed_record"]
