"""``ai_query._documents`` without Spark: options, the bytes it refuses, vision answers as elements."""

from __future__ import annotations

import pytest

from ai_query import ArgumentError
from ai_query._documents import ParseOptions, markdown_elements, start_document
from tests.pdfgen import pdf
from tests.spark.test_files import png


def test_options_default_to_version_2_and_the_registry_endpoint():
    assert ParseOptions.from_map(None, "vision") == ParseOptions("2.0", "vision", True)
    assert ParseOptions.from_map({"imageEndpoint": "other", "descriptionElementTypes": ""}, "vision") == ParseOptions("2.0", "other", False)


@pytest.mark.parametrize("options, message", [
    ({"version": "1.0"}, "version '1.0' is not supported"),
    ({"descriptionElementTypes": "table"}, "must be '', '\\*' or 'figure'"),
    ({"imageOutputPath": "/tmp/x"}, "'imageOutputPath' is not supported"),
])
def test_bad_options_name_the_value(options, message):
    with pytest.raises(ArgumentError, match=message):
        ParseOptions.from_map(options, None)


def test_an_image_becomes_one_vision_request_carrying_its_bytes():
    image = png(3, 2, 1)
    doc = start_document(image, ParseOptions.from_map(None, "vision"))
    assert doc.pages == 1 and doc.errors == [] and list(doc.vision) == [0]
    [message] = doc.vision[0]
    parts = message["content"]
    assert parts[0]["type"] == "text" and parts[1]["type"] == "image_url"
    assert parts[1]["image_url"]["url"].startswith("data:image/png;base64,")


def test_a_broken_pdf_is_a_document_error_not_an_exception():
    doc = start_document(b"%PDF-1.4\nnot really a pdf", ParseOptions())
    result = doc.result()
    assert result["document"] == {"pages": [], "elements": []}
    assert len(result["error_status"]) == 1 and result["error_status"][0]["page_id"] is None
    assert "cannot read this PDF" in result["error_status"][0]["error_message"]


def test_pdf_elements_are_numbered_in_page_order_after_vision_answers_arrive():
    doc = start_document(pdf([[], [(72, 700, 12, "Typed text.")]]), ParseOptions.from_map(None, "vision"))
    assert list(doc.vision) == [0]
    doc.add_vision_answer(0, "# Scanned\n\nHandwritten note.")
    elements = doc.result()["document"]["elements"]
    assert [(e["id"], e["type"], e["content"]) for e in elements] == [
        (0, "title", "Scanned"), (1, "text", "Handwritten note."), (2, "text", "Typed text.")]
    assert elements[0]["bbox"] == [] and elements[2]["bbox"][0]["page_id"] == 1


def test_markdown_answers_become_headings_tables_and_paragraphs():
    text = "# Invoice\n\n## Items\n| a | b |\n|---|---|\n| 1 | 2 |\n\n| x | y |\n| 3 | 4 |\n\nThank you."
    assert [(e.type, e.content) for e in markdown_elements(text, 2)] == [
        ("title", "Invoice"), ("section_header", "Items"), ("table", "| a | b |\n|---|---|\n| 1 | 2 |"),
        ("table", "| x | y |\n| 3 | 4 |"), ("text", "Thank you.")]
