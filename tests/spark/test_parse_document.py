"""``ai_parse_document``: files read with ``binaryFile``, parsed to VARIANT in Databricks' 2.0 shape.

Text PDFs are read locally (pypdf); the image and the scanned page reach a vision endpoint on the
provider simulator (real HTTP), whose echo names the bytes it received (media type, size, sha256).
"""

from __future__ import annotations

import os

import pytest

import spark_udfs
from ai_query import EndpointRegistry
from ai_query.testing import ProviderSimulator
from tests.pdfgen import pdf
from tests.spark.test_files import png, tag

REPORT = pdf([
    [(72, 720, 24, "Quarterly Report"), (72, 680, 12, "Revenue grew by ten percent."), (72, 666, 12, "Costs stayed flat."),
     (72, 620, 16, "Outlook"), (72, 600, 12, "We expect growth."), (300, 30, 10, "1")],
    [(72, 720, 12, "Second page text.")],
    [],  # no text layer: a scan
])
PHOTO = png(6, 4, 3)
JUNK = os.urandom(64).replace(b"%", b"x")  # never a PDF or image signature
ELEMENTS = "ARRAY<STRUCT<id INT, type STRING, content STRING, bbox ARRAY<STRUCT<coord ARRAY<INT>, page_id INT>>>>"
ERRORS = "ARRAY<STRUCT<error_message STRING, page_id INT>>"


@pytest.fixture(scope="module")
def sims():
    """A vision provider that answers, and one that answers every request with a 500."""
    with ProviderSimulator(api_key="sk-sim") as ok, ProviderSimulator(api_key="sk-sim", error_rates={"500": 1.0}) as failing:
        yield ok, failing


@pytest.fixture(scope="module")
def docs(spark, sims, tmp_path_factory):
    sim, failing_sim = sims
    def endpoint(name, server, attempts):
        cfg = {"openai_config": {"openai_api_key_plaintext": "sk-sim", "openai_api_base": server.base_url}}
        return {"name": name, "config": {"served_entities": [{"name": "m", "external_model": {
            "name": "vision-model", "provider": "openai", "task": "llm/v1/chat", **cfg}}]}, "client_config": {"max_attempts": attempts}}

    registry = EndpointRegistry.builtin().with_endpoints(EndpointRegistry.from_data([
        endpoint("vision", sim, 2), endpoint("vision-down", failing_sim, 1)]))
    spark_udfs.register(spark, registry)
    folder = tmp_path_factory.mktemp("docs")
    for name, data in (("report.pdf", REPORT), ("photo.png", PHOTO), ("junk.bin", JUNK)):
        (folder / name).write_bytes(data)
    spark.read.format("binaryFile").load(str(folder)).createOrReplaceTempView("docs")
    yield spark, registry


def parsed(spark, options: str = "map('version', '2.0', 'imageEndpoint', 'vision')") -> dict[str, dict]:
    rows = spark.sql(f"""
        WITH p AS (SELECT path, ai_parse_document(content, {options}) AS parsed FROM docs)
        SELECT path, typeof(parsed) AS t,
               variant_get(parsed, '$.document.elements', '{ELEMENTS}') AS elements,
               variant_get(parsed, '$.error_status', '{ERRORS}') AS errors,
               size(variant_get(parsed, '$.document.pages', 'ARRAY<VARIANT>')) AS pages,
               parsed:metadata.version::string AS version, parsed:metadata.file_metadata.file_size::long AS file_size
        FROM p""").collect()
    return {os.path.basename(r.path): r.asDict(recursive=True) for r in rows}


def test_a_text_pdf_is_read_locally_into_typed_elements(docs):
    spark, _ = docs
    got = parsed(spark)["report.pdf"]
    assert got["t"] == "variant" and got["version"] == "2.0" and got["file_size"] == len(REPORT) and got["pages"] == 3
    text = [(e["type"], e["content"], e["bbox"][0]["page_id"]) for e in got["elements"] if e["bbox"]]
    assert text == [
        ("title", "Quarterly Report", 0),
        ("text", "Revenue grew by ten percent.\nCosts stayed flat.", 0),
        ("section_header", "Outlook", 0),
        ("text", "We expect growth.", 0),
        ("page_number", "1", 0),
        ("text", "Second page text.", 1),
    ]
    assert [e["id"] for e in got["elements"]] == list(range(len(got["elements"])))
    title = got["elements"][0]["bbox"][0]["coord"]  # top-left origin, points: the title sits above the body text
    body = got["elements"][1]["bbox"][0]["coord"]
    assert title[0] == 72 and title[1] < title[3] <= body[1] < body[3]
    assert got["errors"] == []


def test_the_scanned_page_and_the_image_go_to_the_vision_endpoint(docs):
    spark, _ = docs
    got = parsed(spark)
    scan = [e for e in got["report.pdf"]["elements"] if not e["bbox"]]
    assert len(scan) == 1 and scan[0]["type"] == "text" and "[application/pdf " in scan[0]["content"]
    photo = got["photo.png"]
    assert photo["pages"] == 1 and photo["errors"] == []
    assert [e["type"] for e in photo["elements"]] == ["text"]
    assert photo["elements"][0]["content"].startswith("echo: Transcribe this document page as Markdown")
    assert photo["elements"][0]["content"].endswith(tag("image/png", PHOTO))  # the simulator received these very bytes


def test_a_file_it_cannot_read_is_that_rows_error(docs):
    spark, _ = docs
    got = parsed(spark)
    junk = got["junk.bin"]
    assert junk["elements"] == [] and junk["pages"] == 0 and len(junk["errors"]) == 1
    assert junk["errors"][0]["page_id"] is None
    assert f"cannot read a file of 64 bytes starting {JUNK[:8].hex(' ')}" in junk["errors"][0]["error_message"]
    assert got["report.pdf"]["errors"] == [] and got["photo.png"]["errors"] == []  # the other rows are fine


def test_without_a_vision_endpoint_images_are_page_errors_and_text_still_parses(docs):
    spark, _ = docs
    got = parsed(spark, "map('version', '2.0')")
    assert got["photo.png"]["elements"] == []
    assert [(e["page_id"], "no vision endpoint is configured" in e["error_message"]) for e in got["photo.png"]["errors"]] == [(0, True)]
    assert [e["page_id"] for e in got["report.pdf"]["errors"]] == [2]
    assert [e["content"] for e in got["report.pdf"]["elements"]][0] == "Quarterly Report"


def test_a_failed_vision_call_is_that_pages_error(docs, sims):
    spark, _ = docs
    failing_sim = sims[1]
    got = parsed(spark, "map('imageEndpoint', 'vision-down')")
    for name, page in (("photo.png", 0), ("report.pdf", 2)):
        [error] = got[name]["errors"]
        assert error["page_id"] == page and error["error_message"].startswith(f"page {page}: the vision endpoint 'vision-down' failed")
    assert [e["content"] for e in got["report.pdf"]["elements"]][-1] == "Second page text."  # the text pages still parse
    assert failing_sim.snapshot()["requests"] >= 2


def test_the_registry_default_vision_endpoint_the_one_argument_form_and_the_dataframe_api(docs):
    spark, registry = docs
    spark_udfs.register(spark, registry, task_endpoints={"ai_parse_document": "vision"})
    try:
        one_arg = spark.sql("SELECT ai_parse_document(content):document.elements[0].content::string AS c FROM docs "
                            "WHERE path LIKE '%photo.png'").collect()[0].c
        assert one_arg.endswith(tag("image/png", PHOTO))
        df = spark.table("docs").where("path LIKE '%report.pdf'")
        row = df.select(spark_udfs.ai_parse_document("content", {"version": "2.0"}).alias("p")) \
            .selectExpr("typeof(p) AS t", "p:document.elements[0].type::string AS k").collect()[0]
        assert (row.t, row.k) == ("variant", "title")
        via_expr = df.selectExpr("ai_parse_document(content => content):document.elements[5].content::string AS c").collect()[0].c
        assert via_expr == "Second page text."
    finally:
        spark_udfs.register(spark, registry)


@pytest.mark.parametrize("options, message", [
    ("map('version', '1.5')", "version '1.5' is not supported; use map('version', '2.0')"),
    ("map('imageOutputPath', '/Volumes/x')", "option 'imageOutputPath' is not supported"),
    ("map('colour', 'red')", "unknown option(s) 'colour'"),
    ("map('imageEndpoint', 'local-embed')", "imageEndpoint 'local-embed' cannot read images"),
])
def test_bad_options_fail_the_query_naming_the_option(docs, options, message):
    spark, _ = docs
    with pytest.raises(Exception, match=message.replace("(", r"\(").replace(")", r"\)")):
        spark.sql(f"SELECT ai_parse_document(content, {options}) FROM docs").collect()
