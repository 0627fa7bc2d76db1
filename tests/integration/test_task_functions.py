"""The AI task functions from SQL on the embedded local models: one example each, and an easy labelled set."""

from __future__ import annotations

import json
import pathlib

import pytest

import spark_udfs
from ai_query import ArgumentError, UnknownEndpointError

pytestmark = pytest.mark.integration
DATA = json.loads((pathlib.Path(__file__).parents[1] / "data" / "labelled.json").read_text())


@pytest.fixture(scope="module")
def tspark(spark):
    spark_udfs.register(spark)
    return spark


def sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def test_analyze_sentiment_beats_chance(tspark):
    values = ", ".join(f"({i}, {sql_string(t)}, '{label}')" for i, (t, label) in enumerate(DATA["sentiment"]))
    rows = tspark.sql(f"SELECT label, ai_analyze_sentiment(text) AS s FROM VALUES {values} AS t(id, text, label)").collect()
    assert all(r.s in ("positive", "negative", "neutral", "mixed") for r in rows)
    accuracy = sum(r.s == r.label for r in rows) / len(rows)
    assert accuracy >= 0.75, [(r.label, r.s) for r in rows]


def test_classify_beats_chance(tspark):
    labels = DATA["topics"]["labels"]
    values = ", ".join(f"({sql_string(t)}, '{label}')" for t, label in DATA["topics"]["items"])
    array = "array(" + ", ".join(f"'{x}'" for x in labels) + ")"
    rows = tspark.sql(f"SELECT label, ai_classify(text, {array}) AS c FROM VALUES {values} AS t(text, label)").collect()
    assert all(r.c in labels for r in rows)
    accuracy = sum(r.c == r.label for r in rows) / len(rows)
    assert accuracy >= 0.5, [(r.label, r.c) for r in rows]  # chance is 0.25


def test_similarity_ranks_paraphrases_above_unrelated_text(tspark):
    values = ", ".join(f"({sql_string(a)}, {sql_string(b)}, {sql_string(c)})" for a, b, c in DATA["similarity"])
    rows = tspark.sql(f"""
        SELECT ai_similarity(a, b) AS close, ai_similarity(a, c) AS far FROM VALUES {values} AS t(a, b, c)
    """).collect()
    assert all(0.0 <= r.close <= 1.0 and 0.0 <= r.far <= 1.0 for r in rows)
    assert sum(r.close > r.far for r in rows) == len(rows)


def test_one_sql_example_per_generative_function(tspark):
    row = tspark.sql("""
        SELECT ai_extract('John Doe lives in New York and works for Acme Corp.', array('person', 'location', 'organization')) AS e,
               ai_fix_grammar('This sentence have some mistake in it.') AS g,
               ai_gen('Write a one-line greeting.') AS gen,
               ai_mask('John Doe lives in New York. His email is john@example.com.', array('person', 'email')) AS m,
               ai_summarize('The quick brown fox jumps over the lazy dog. The dog did not react at all. The fox ran off into the forest.', 10) AS s,
               ai_translate('Hello, how are you?', 'Spanish') AS tr
    """).collect()[0]
    assert set(row.e.asDict()) == {"person", "location", "organization"}
    assert row.e.person and "john" in row.e.person.lower()
    assert row.g and row.gen and row.m and row.tr
    assert 0 < len(row.s.split()) <= 10


def test_task_function_arguments_are_checked_on_the_driver(tspark):
    with pytest.raises(ArgumentError, match="labels must be a non-empty array"):
        tspark.sql("SELECT ai_classify('x', array())")
    with pytest.raises(ArgumentError, match="literal array"):
        tspark.sql("SELECT ai_extract('x', labels) FROM VALUES (array('a')) AS t(labels)")
    with pytest.raises(ArgumentError, match="max_words"):
        tspark.sql("SELECT ai_summarize('x', -3)")
    with pytest.raises(UnknownEndpointError):
        spark_udfs.register(tspark, task_endpoints={"ai_classify": "nope"})
    spark_udfs.register(tspark)
