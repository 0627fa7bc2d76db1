"""Custom-model contracts from real MLflow signatures, records typed by them, scoring bodies read."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest

from ai_query import ArgumentError, ModelParameters
from ai_query.backends import ModelContract, check_params
from ai_query.backends._custom import json_record, typed_record
from ai_query.serving._scoring import is_scoring, parse_scoring


def contract(inputs, outputs=None, params=()):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema

    signature = ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs) if outputs else None,
                               params=ParamSchema([ParamSpec(n, "double", 0.5) for n in params]) if params else None)
    return ModelContract.of(type("Meta", (), {"signature": signature})())


def test_the_output_signature_becomes_a_spark_type():
    from mlflow.types.schema import Array, ColSpec, Map, Object, Property

    inputs = [ColSpec("string", "text")]
    assert contract(inputs, [ColSpec("double")]).output_ddl == "DOUBLE"
    assert contract(inputs, [ColSpec("string", "label"), ColSpec("long", "n")]).output_ddl == "STRUCT<`label`: STRING, `n`: BIGINT>"
    nested = [ColSpec(Array(Object([Property("tag", "string"), Property("p", "float")])), "tags")]
    assert contract(inputs, nested).output_ddl == "ARRAY<STRUCT<`p`: FLOAT, `tag`: STRING>>"  # MLflow sorts properties
    assert contract(inputs, [ColSpec(Map("integer"), "counts")]).output_ddl == "MAP<STRING, INT>"
    assert contract(inputs).output_ddl is None


def test_which_signatures_take_records():
    from mlflow.types.schema import ColSpec

    assert contract([ColSpec("datetime", "timestamp"), ColSpec("string", "text")]).takes_records
    assert contract([ColSpec("string", "text")]).takes_records
    assert not contract([ColSpec("string", "prompt")]).takes_records


def test_a_record_is_typed_by_the_signature_and_matched_case_insensitively():
    from mlflow.types.schema import ColSpec

    c = contract([ColSpec("datetime", "timestamp"), ColSpec("double", "score"), ColSpec("long", "n"), ColSpec("string", "text")])
    when = dt.datetime(2026, 3, 1, 9, 30, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    record = typed_record({"Timestamp": when, "score": Decimal("0.5"), "n": Decimal("3"), "text": 12, "extra": Decimal("1.5")}, c)
    assert record == {"timestamp": dt.datetime(2026, 3, 1, 7, 30), "score": 0.5, "n": 3, "text": "12", "extra": 1.5}
    assert type(record["score"]) is float and type(record["n"]) is int and record["timestamp"].tzinfo is None
    assert json_record({"t": when, "d": Decimal("0.25")}) == {"t": "2026-03-01T09:30:00+02:00", "d": 0.25}


def test_undeclared_params_are_refused_naming_the_declared_ones():
    check_params({"threshold": 1}, ("threshold",), "'m'")
    check_params({"max_tokens": 5}, (), "'m'", llm_names=("max_tokens",))  # an llm/v1 default: dropped, not refused
    with pytest.raises(ArgumentError, match="takes no parameter 'treshold': it declares threshold"):
        check_params({"treshold": 1}, ("threshold",), "'m'")
    with pytest.raises(ArgumentError, match="its signature declares no params"):
        check_params({"temperature": 0.5}, (), "'m'")


def test_custom_parameters_keep_their_own_names_and_llm_ones_are_still_checked():
    assert ModelParameters.from_mapping({"threshold": Decimal("0.3")}, custom=True).as_dict() == {"threshold": 0.3}
    with pytest.raises(ArgumentError, match="unknown parameter 'threshold'"):
        ModelParameters.from_mapping({"threshold": 0.3})
    with pytest.raises(ArgumentError, match="temperature must be between"):
        ModelParameters.from_mapping({"temperature": 9.0}, custom=True)


@pytest.mark.parametrize("body, records", [
    ({"dataframe_records": [{"a": 1}, {"a": 2}]}, ({"a": 1}, {"a": 2})),
    ({"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2], [3, 4]]}}, ({"a": 1, "b": 2}, {"a": 3, "b": 4})),
    ({"inputs": {"a": [1, 3], "b": [2, 4]}}, ({"a": 1, "b": 2}, {"a": 3, "b": 4})),
    ({"inputs": ["x", "y"]}, ("x", "y")),
    ({"instances": [{"a": 1}]}, ({"a": 1},)),
])
def test_each_scoring_format_becomes_records(body, records):
    assert is_scoring(body)
    assert parse_scoring({**body, "params": {"k": 1}}).records == records


@pytest.mark.parametrize("body, message", [
    ({"dataframe_records": [1, 2]}, "must be a list of objects"),
    ({"inputs": {"a": [1, 2], "b": [1]}}, "same number of values"),
    ({"instances": []}, "holds no records"),
    ({"instances": [1], "params": [1]}, "'params' must be an object"),
    ({"instances": [1], "temperature": 1}, "unknown field(s) 'temperature'"),
])
def test_malformed_scoring_bodies_name_the_problem(body, message):
    with pytest.raises(ArgumentError) as info:
        parse_scoring(body)
    assert message in str(info.value)
