"""MLflow's scoring protocol for custom models: the request bodies ``mlflow models serve`` takes.

A custom model's endpoint (an MLflow pyfunc, Databricks' "custom model") is queried with one of::

    {"dataframe_records": [{"sender": "ann", "text": "hi"}, ...]}
    {"dataframe_split": {"columns": ["sender", "text"], "data": [["ann", "hi"], ...]}}
    {"inputs": {"sender": ["ann", ...], "text": ["hi", ...]}}     (columns, or a list of records / values)
    {"instances": [{"sender": "ann", "text": "hi"}, ...]}          (records, or a list of values)

each optionally with ``"params": {...}`` (the model's declared params). Every record becomes one
call through the endpoint exchange, the path of a Spark row (a struct request: the backend types
it by the model's signature and micro-batches the records into one ``predict``), and the answer
is ``{"predictions": [one output per record]}``, as MLflow's scoring server writes it for a model
that returns one output per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..batch.results import CallResult
from .._errors import ArgumentError

FORMATS = ("dataframe_records", "dataframe_split", "inputs", "instances")


@dataclass(frozen=True)
class ScoringRequest:
    """The records to score (a dict of input features each, or a plain value) and the params."""

    records: tuple[Any, ...]
    params: Mapping[str, Any]


def is_scoring(body: Any) -> bool:
    """The body uses MLflow's scoring protocol (one of ``FORMATS``)."""
    return isinstance(body, dict) and any(key in body for key in FORMATS)


def _columns_to_records(columns: Mapping[str, Any], field: str) -> list[dict[str, Any]]:
    lists = {k: v if isinstance(v, list) else [v] for k, v in columns.items()}
    lengths = {len(v) for v in lists.values()}
    if len(lengths) > 1:
        raise ArgumentError(f"{field!r}: every column must have the same number of values, got "
                            + ", ".join(f"{k}: {len(v)}" for k, v in lists.items()))
    n = lengths.pop() if lengths else 0
    return [{k: v[i] for k, v in lists.items()} for i in range(n)]


def parse_scoring(body: Mapping[str, Any]) -> ScoringRequest:
    """Read a scoring-protocol body; ``ArgumentError`` names what is wrong and the expected shape."""
    present = [key for key in FORMATS if key in body]
    if len(present) > 1:
        raise ArgumentError(f"the body has {', '.join(map(repr, present))}: send exactly one of {', '.join(FORMATS)}")
    field = present[0]
    unknown = sorted(set(body) - {field, "params"})
    if unknown:
        raise ArgumentError(f"unknown field(s) {', '.join(map(repr, unknown))}; a custom model takes {field!r} and 'params'")
    raw = body[field]
    records: list[Any]
    if field == "dataframe_records":
        if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
            raise ArgumentError("'dataframe_records' must be a list of objects, e.g. [{\"text\": \"hi\"}]")
        records = list(raw)
    elif field == "dataframe_split":
        if not isinstance(raw, dict) or not isinstance(raw.get("data"), list):
            raise ArgumentError("'dataframe_split' must be an object {\"columns\": [...], \"data\": [[...], ...]}")
        columns = raw.get("columns")
        rows = raw["data"]
        if not isinstance(columns, list) or not all(isinstance(r, list) and len(r) == len(columns) for r in rows):
            raise ArgumentError("'dataframe_split': 'columns' must be a list of names and each row of 'data' a list "
                                f"of as many values ({len(columns) if isinstance(columns, list) else 'no columns given'})")
        records = [dict(zip(columns, row)) for row in rows]
    elif isinstance(raw, dict):  # inputs / instances given by column
        records = _columns_to_records(raw, field)
    elif isinstance(raw, list):
        records = list(raw)
    else:
        records = [raw]
    if not records:
        raise ArgumentError(f"{field!r} holds no records: nothing to score")
    params = body.get("params") or {}
    if not isinstance(params, dict):
        raise ArgumentError("'params' must be an object of the model's declared params, e.g. {\"threshold\": 0.3}")
    return ScoringRequest(tuple(records), params)


def render_predictions(results: Sequence[CallResult]) -> dict[str, Any]:
    """``{"predictions": [...]}``, one output per record, in order (a one-column DataFrame's records
    as records, ``[{"column": value}]``, as MLflow's scoring server writes them)."""
    return {"predictions": [r.value if r.prediction is None else r.prediction for r in results]}


__all__ = ["FORMATS", "ScoringRequest", "is_scoring", "parse_scoring", "render_predictions"]
