"""The SQL examples of the Databricks ``ai_query`` and AI-function documentation, run on the embedded models.

Each query is the documented one with only the endpoint name changed (``local-chat``,
``local-embed``) and, where the example reads a table, a temp view of the same name and columns in
its place. Two more changes keep the file fast on a shared 2-core CPU: an example that sets no
``modelParameters`` gets ``max_tokens`` (and ``temperature`` 0.0, so the answer repeats), marked
``# + max_tokens`` where it is added; and ``CREATE OR REPLACE TABLE ... AS`` becomes ``DROP TABLE IF
EXISTS`` + ``CREATE TABLE ... AS``, since Spark's built-in catalog cannot replace a table. Each test asserts the documented result shape and type; where the embedded 135M model
can be expected to get it right (an obvious sentiment, identical strings, an obvious label), the
value too. The page each example comes from is quoted above it.

Our own docs are checked the same way: every ```python block in README.md and docs/pages/*.md
preceded by ``<!-- runnable -->`` runs, the blocks of one file in order in one namespace (a later
block uses the ``spark`` an earlier one built).
"""

from __future__ import annotations

import json
import os
import pathlib
import re

import pytest

import spark_udfs
from ai_query import EndpointRegistry
from ai_query.testing import ProviderSimulator

pytestmark = pytest.mark.integration



@pytest.fixture(scope="module")
def sim():
    with ProviderSimulator(api_key="sk-sim") as simulator:
        yield simulator


@pytest.fixture(scope="module")
def dspark(spark, sim):
    """The built-in registry (``local-chat``: vLLM on CPU, started once; ``local-embed``), plus the
    structured-output examples' own endpoint name, ``llama-3-1-70b``, served by the simulator: the
    135M model cannot fill their four-field schema within a test's time, the simulator answers a
    canned JSON (a ``[[reply:...]]`` directive in the abstract) and the test checks how it is typed."""
    os.environ["AIQ_SECRET_SIM_KEY"] = "sk-sim"
    spark_udfs.register(spark, EndpointRegistry.builtin().with_endpoints(EndpointRegistry.from_data({
        "name": "llama-3-1-70b",
        "config": {"served_entities": [{"name": "sim", "external_model": {
            "name": "sim-model", "provider": "openai", "task": "llm/v1/chat",
            "openai_config": {"openai_api_key": "{{secrets/sim/key}}", "openai_api_base": sim.base_url}}}]},
    })))
    spark.createDataFrame(
        [("Describe Apache Spark in one sentence.",), ("Describe Delta Lake in one sentence.",)], "text STRING"
    ).createOrReplaceTempView("messages")
    yield spark
    spark_udfs.register(spark)
    for view in ("messages", "research_papers", "t", "products", "customers", "questions", "news_summaries",
                 "my_input_table", "your_table"):
        spark.catalog.dropTempView(view)
    spark.sql("DROP TABLE IF EXISTS my_output_table")


def type_of(df, column: str | None = None) -> str:
    field = df.schema[column] if column else df.schema.fields[0]
    return field.dataType.simpleString()


# -- ai_query ----------------------------------------------------------------------------------

# https://docs.databricks.com/en/sql/language-manual/functions/ai_query.html ("Examples": query a foundation model)
def test_ai_query_chat_returns_string(dspark):
    df = dspark.sql("""
        SELECT ai_query(
            'local-chat',
            'Describe Databricks SQL in 30 words.',
            modelParameters => named_struct('max_tokens', 48, 'temperature', 0.0)  -- + max_tokens
          ) AS summary
    """)
    assert type_of(df, "summary") == "string"
    [row] = df.collect()
    assert isinstance(row.summary, str) and row.summary.strip()


# https://docs.databricks.com/en/sql/language-manual/functions/ai_query.html ("Examples": modelParameters)
def test_ai_query_model_parameters(dspark):
    df = dspark.sql("""
        SELECT ai_query(
            'local-chat',
            'Describe Databricks SQL in 30 words.',
            modelParameters => named_struct('max_tokens', 100,'temperature', 0.7)
          ) AS summary
    """)
    assert type_of(df, "summary") == "string"
    [row] = df.collect()
    assert row.summary.strip() and len(row.summary.split()) <= 100  # at most max_tokens tokens, each >= 0 words


# https://docs.databricks.com/en/sql/language-manual/functions/ai_query.html ("Examples": an embedding model)
def test_ai_query_embeddings_return_array_of_float(dspark):
    dspark.createDataFrame([("Apache Spark",), ("Delta Lake",)], "text STRING").createOrReplaceTempView("your_table")
    df = dspark.sql("""
        SELECT text, ai_query(
            endpoint => 'local-embed',
            request => text,
            returnType => 'ARRAY<FLOAT>'
          ) AS embedding
        FROM your_table
    """)
    assert type_of(df, "embedding") == "array<float>"
    rows = df.collect()
    assert len(rows) == 2 and all(len(r.embedding) == 384 for r in rows)  # all-MiniLM-L6-v2
    assert rows[0].embedding != rows[1].embedding


# https://docs.databricks.com/en/sql/language-manual/functions/ai_query.html ("Examples": failOnError => false
# returns a struct of the response and the row's error message)
def test_ai_query_fail_on_error_false_returns_struct(dspark):
    df = dspark.sql("""
        SELECT ai_query(
            'local-chat',
            'Describe Databricks SQL in 30 words.',
            failOnError => false,
            modelParameters => named_struct('max_tokens', 48, 'temperature', 0.0)  -- + max_tokens
          ) AS summary
    """)
    assert type_of(df, "summary") == "struct<response:string,errorMessage:string>"
    [row] = df.collect()
    assert row.summary.errorMessage is None and row.summary.response.strip()


PAPER = {"title": "Spark: Cluster Computing with Working Sets", "authors": ["Matei Zaharia", "Ion Stoica"],
         "abstract": "A framework for iterative jobs.", "keywords": ["clusters", "fault tolerance"]}
RESEARCH_PAPERS = [(
    "[[reply:" + json.dumps({"research_paper_extraction": PAPER}) + "]] We present Spark, a framework for iterative jobs.",
), (
    "[[reply:" + json.dumps(PAPER) + "]] We present Spark, a framework for iterative jobs.",
)]


# https://docs.databricks.com/en/sql/language-manual/functions/ai_query.html ("Examples": responseFormat as a
# STRUCT DDL). Verbatim, endpoint name included (served by the simulator, see ``dspark``).
def test_ai_query_response_format_struct_ddl(dspark):
    dspark.createDataFrame(RESEARCH_PAPERS[:1], "abstract STRING").createOrReplaceTempView("research_papers")
    df = dspark.sql("""
        SELECT ai_query(
            "llama-3-1-70b",
            "Extract research paper details from the following abstract: " || abstract,
            responseFormat => 'STRUCT<research_paper_extraction:STRUCT<title:STRING, authors:ARRAY<STRING>, abstract:STRING, keywords:ARRAY<STRING>>>'
          )
        FROM research_papers;
    """.rstrip().rstrip(";"))
    assert type_of(df) == ("struct<research_paper_extraction:struct<title:string,authors:array<string>,"
                           "abstract:string,keywords:array<string>>>")
    [row] = df.collect()
    assert row[0].research_paper_extraction.asDict() == PAPER


# https://docs.databricks.com/en/sql/language-manual/functions/ai_query.html ("Examples": responseFormat as a
# JSON schema). Verbatim, endpoint name included. Without a returnType the answer is the JSON text (STRING).
def test_ai_query_response_format_json_schema(dspark):
    dspark.createDataFrame(RESEARCH_PAPERS[1:], "abstract STRING").createOrReplaceTempView("research_papers")
    df = dspark.sql("""
        SELECT ai_query(
            "llama-3-1-70b",
            "Extract research paper details from the following abstract: " || abstract,
            responseFormat => '{
              "type": "json_schema",
              "json_schema":
                {
                 "name": "research_paper_extraction",
                 "schema":
                   {
                    "type": "object",
                    "properties":
                     {
                      "title": { "type": "string" },
                      "authors": {"type": "array", "items": {"type": "string" } },
                      "abstract": { "type": "string" },
                      "keywords": {"type": "array", "items": {"type": "string" } }
                     }
                   },
                 "strict": true
                }
            }'
          )
        FROM research_papers;
    """.rstrip().rstrip(";"))
    assert type_of(df) == "string"
    [row] = df.collect()
    assert json.loads(row[0]) == PAPER


# Acceptance item of issue 4: typed structs from the embedded model.
def test_ai_query_response_format_struct_on_the_embedded_model(dspark):
    dspark.createDataFrame(
        [("What is the capital of France, and which country is it in?",), ("Which city is the capital of Japan?",)], "q STRING"
    ).createOrReplaceTempView("t")
    df = dspark.sql("SELECT ai_query('local-chat', q, responseFormat => 'STRUCT<city: STRING, country: STRING>') FROM t")
    assert type_of(df) == "struct<city:string,country:string>"
    rows = df.collect()
    assert len(rows) == 2
    assert all(isinstance(r[0].city, str) and isinstance(r[0].country, str) for r in rows)
    assert any("paris" in (r[0].city or "").lower() for r in rows)


# https://learn.microsoft.com/zh-cn/azure/databricks/machine-learning/foundation-models/fmapi-batch-inference
# ("Use ai_query and SQL"): CREATE TABLE ... AS with CONCAT(prompt, column) and modelParameters
# (the ${...} placeholders filled in; the input table is a temp view).
def test_batch_inference_create_table_as(dspark):
    dspark.createDataFrame([("I loved this film",), ("The food was cold and bland",)], "review STRING") \
        .createOrReplaceTempView("my_input_table")
    dspark.sql("DROP TABLE IF EXISTS my_output_table")
    dspark.sql("""
        CREATE TABLE my_output_table AS (
          SELECT
              review,
              AI_QUERY(
                "local-chat",
                CONCAT("Is this review positive or negative? Answer in one word: ", review),
                modelParameters => named_struct('max_tokens', 8,'temperature', 0.0)
              ) as response
            FROM my_input_table
            LIMIT 2
        )
    """)
    out = dspark.table("my_output_table")
    assert type_of(out, "response") == "string"
    rows = out.collect()
    assert len(rows) == 2 and all(r.response and r.response.strip() for r in rows)


# https://learn.microsoft.com/zh-cn/azure/databricks/machine-learning/foundation-models/fmapi-batch-inference
# ("Use ai_query and PySpark"): the same through selectExpr on a DataFrame.
def test_batch_inference_pyspark_select_expr(dspark):
    df = dspark.createDataFrame([("Paris",), ("Tokyo",)], "city STRING")
    prompt, column = "Name the country of this city: ", "city"
    out = df.selectExpr(
        f"ai_query('local-chat', CONCAT('{prompt}', {column}), "
        "modelParameters => named_struct('max_tokens', 8,'temperature', 0.0)) as country"
    )
    assert type_of(out, "country") == "string"
    assert [bool(r.country) for r in out.collect()] == [True, True]


# -- task functions ----------------------------------------------------------------------------

# https://learn.microsoft.com/de-DE/azure/databricks/sql/language-manual/functions/ai_analyze_sentiment
def test_ai_analyze_sentiment(dspark):
    happy = dspark.sql("SELECT ai_analyze_sentiment('I am happy')")
    sad = dspark.sql("SELECT ai_analyze_sentiment('I am sad')")
    assert type_of(happy) == "string"
    assert happy.collect()[0][0] == "positive"
    assert sad.collect()[0][0] == "negative"


# https://video2.skills-academy.com/en-us/azure/databricks/sql/language-manual/functions/ai_classify
def test_ai_classify(dspark):
    df = dspark.sql("""SELECT ai_classify("My password is leaked.", ARRAY("urgent", "not urgent"))""")
    assert type_of(df) == "string"
    assert df.collect()[0][0] in ("urgent", "not urgent")
    dspark.createDataFrame(
        [("A pair of running shoes with a cushioned sole",), ("A wooden dining table for six",), ("A cotton t-shirt",)],
        "description STRING",
    ).createOrReplaceTempView("products")
    rows = dspark.sql("""
        SELECT
          description,
          ai_classify(description, ARRAY('clothing', 'shoes', 'accessories', 'furniture')) AS category
        FROM
          products
        LIMIT 10
    """).collect()
    assert len(rows) == 3 and all(r.category in ("clothing", "shoes", "accessories", "furniture") for r in rows)


# https://docs.microsoft.com/en-us/azure/databricks/sql/language-manual/functions/ai_extract
def test_ai_extract(dspark):
    df = dspark.sql("""
        SELECT ai_extract(
            'John Doe lives in New York and works for Acme Corp.',
            array('person', 'location', 'organization')
          )
    """)
    assert type_of(df) == "struct<person:string,location:string,organization:string>"
    value = df.collect()[0][0]
    assert "john" in (value.person or "").lower()
    df = dspark.sql("""
        SELECT ai_extract(
            'Send an email to jane.doe@example.com about the meeting at 10am.',
            array('email', 'time')
          )
    """)
    assert type_of(df) == "struct<email:string,time:string>"
    assert set(df.collect()[0][0].asDict()) == {"email", "time"}


# https://learn.microsoft.com/nl-nl/azure/databricks/sql/language-manual/functions/ai_fix_grammar
def test_ai_fix_grammar(dspark):
    df = dspark.sql("""
        SELECT ai_fix_grammar('This sentence have some mistake') AS a,
               ai_fix_grammar('She dont know what to did.') AS b,
               ai_fix_grammar('He go to school every days.') AS c
    """)
    assert [f.dataType.simpleString() for f in df.schema.fields] == ["string"] * 3
    row = df.collect()[0]
    assert all(isinstance(v, str) and v.strip() for v in row)


# https://learn.microsoft.com/hi-in/azure/databricks/sql/language-manual/functions/ai_gen
def test_ai_gen(dspark):
    df = dspark.sql("SELECT ai_gen('Generate a concise, cheerful email title for a summer bike sale with 20% discount')")
    assert type_of(df) == "string" and df.collect()[0][0].strip()
    dspark.createDataFrame([("What is a cloud?",)], "question STRING").createOrReplaceTempView("questions")
    rows = dspark.sql("""
        SELECT
          question,
          ai_gen(
            'You are a teacher. Answer the students question in 50 words: ' || question
          ) AS answer
        FROM
          questions
    """).collect()
    assert len(rows) == 1 and rows[0].question == "What is a cloud?" and rows[0].answer.strip()


# https://learn.microsoft.com/en-gb/azure/databricks/sql/language-manual/functions/ai_mask
def test_ai_mask(dspark):
    df = dspark.sql("""
        SELECT ai_mask(
            'John Doe lives in New York. His email is john.doe@example.com.',
            array('person', 'email')
          )
    """)
    assert type_of(df) == "string" and df.collect()[0][0].strip()


# https://learn.microsoft.com./zh-tw/azure/databricks/sql/language-manual/functions/ai_similarity
def test_ai_similarity(dspark):
    df = dspark.sql("SELECT ai_similarity('Apache Spark', 'Apache Spark')")
    assert type_of(df) == "float"
    assert df.collect()[0][0] == pytest.approx(1.0, abs=1e-3)
    dspark.createDataFrame([("Databricks Inc.",), ("Acme Hardware",), ("Sunny Bakery",)], "company_name STRING") \
        .createOrReplaceTempView("customers")
    rows = dspark.sql("""
        SELECT
          company_name
        FROM
          customers
        ORDER BY ai_similarity(company_name, 'Databricks') DESC
        LIMIT 10
    """).collect()
    assert len(rows) == 3 and rows[0].company_name == "Databricks Inc."


# https://docs.databricks.com/en/sql/language-manual/functions/ai_summarize.html
def test_ai_summarize(dspark):
    df = dspark.sql("""
        SELECT ai_summarize(
            'Apache Spark is a unified analytics engine for large-scale data processing. ' ||
            'It provides high-level APIs in Java, Scala, Python and R, and an optimized ' ||
            'engine that supports general execution graphs. It also supports a rich set ' ||
            'of higher-level tools including Spark SQL for SQL and structured data ' ||
            'processing, pandas API on Spark for pandas workloads, MLlib for machine ' ||
            'learning, GraphX for graph processing, and Structured Streaming for incremental ' ||
            'computation and stream processing.',
            20
          )
    """)
    assert type_of(df) == "string"
    summary = df.collect()[0][0]
    assert 0 < len(summary.split()) <= 20


# https://docs.databricks.com/mlflow/model-example.html ("Perform batch LLM inference using AI Functions",
# "Batch LLM inference using task-specific AI Functions"): ai_translate over a table.
def test_ai_translate_batch_example(dspark):
    dspark.createDataFrame([("The writer published a new novel about the sea.",)], "writer_summary STRING") \
        .createOrReplaceTempView("news_summaries")
    df = dspark.sql("""
        SELECT
        writer_summary,
        ai_translate(writer_summary, "cn") as cn_translation
        from news_summaries
        limit 500
        ;
    """.rstrip().rstrip(";"))
    assert type_of(df, "cn_translation") == "string"
    rows = df.collect()
    assert len(rows) == 1 and rows[0].cn_translation.strip()


# -- our own README and docs pages: the blocks marked runnable ------------------------------------

ROOT = pathlib.Path(__file__).resolve().parents[2]
RUNNABLE = re.compile(r"<!-- runnable -->\n```python\n(.*?)\n```", re.S)


def runnable_blocks(path: pathlib.Path) -> list[str]:
    return RUNNABLE.findall(path.read_text())


DOC_FILES = [p for p in [ROOT / "README.md", *sorted((ROOT / "docs" / "pages").glob("*.md"))] if runnable_blocks(p)]


def test_the_readme_marks_its_examples_runnable():
    # the SQL, DataFrame and client examples; a marker lost in an edit would silently stop checking them
    assert len(runnable_blocks(ROOT / "README.md")) >= 3


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_runnable_doc_blocks(path, spark):
    namespace: dict = {"__name__": "__doc_example__"}
    try:
        for i, block in enumerate(runnable_blocks(path)):
            exec(compile(block, f"{path.name}[runnable block {i + 1}]", "exec"), namespace)
    finally:
        spark_udfs.register(spark)  # back to the built-in registry for the tests after
