"""``ai_parse_document``: documents as Databricks' VARIANT shape (version 2.0), engine-free.

Databricks documents the result of ``ai_parse_document(content [, options])`` as::

    {"document": {"pages": [{"id", "image_uri"}],
                  "elements": [{"id", "type", "content", "bbox": [{"coord", "page_id"}], "description"}]},
     "error_status": [{"error_message", "page_id"}],
     "metadata": {"id", "version", "file_metadata": {"file_path", "file_name", "file_size", "file_modification_time"}}}

How each kind of input gets there:

- **PDF pages with a text layer** are read locally with ``pypdf`` (no model call): the text runs
  and their positions become lines, lines become blocks at vertical gaps or font-size changes, and
  a block's font size against the document's body size makes it a ``title`` / ``section_header``
  (a lone number at the top or bottom edge is a ``page_number``); the rest is ``text``. ``bbox``
  coordinates are PDF points from the page's top-left corner ``[x0, y0, x1, y1]``, the right edge
  estimated at half an em per character (a PDF's text layer gives where a run starts, not where it
  ends, without the font's metrics).
- **Images** (PNG, JPEG, GIF, WEBP) and **pages without a text layer** (scans) go to a vision chat
  endpoint: the image as an ``image_url`` data URI, a scanned page as a one-page PDF ``file`` part
  (the ``files =>`` content parts of :mod:`ai_query._files`). The answer, asked for as Markdown,
  becomes elements: ``#`` headings, ``|`` tables, paragraphs as ``text``. A vision answer carries
  no positions, so those elements have an empty ``bbox``.
- **Anything else** (random bytes, DOCX, a broken PDF) is that row's ``error_status`` entry with
  an empty document, never a failed query; so is a page whose vision call failed, and an image
  when no vision endpoint is configured.

The byte sniffing and the vision request are here; sending it is the caller's (the Spark UDF
sends a batch's pages through the shared client's pipeline).
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from ._errors import ArgumentError, UnsupportedFileError
from ._files import media_type, with_files

VERSIONS = ("2.0",)
OPTIONS = ("version", "imageEndpoint", "descriptionElementTypes")
VISION_PROMPT = ("Transcribe this document page as Markdown: '#' for the title and headings, '|' rows for tables, "
                 "paragraphs separated by a blank line. Reply with the Markdown only.")
VISION_PARAMS: dict[str, Any] = {"temperature": 0.0, "max_tokens": 2048}


@dataclass(frozen=True)
class ParseOptions:
    """The options map of one call, checked (``map('version', '2.0', 'imageEndpoint', 'my-vision')``)."""

    version: str = "2.0"
    image_endpoint: str | None = None
    describe_figures: bool = True

    @classmethod
    def from_map(cls, options: Mapping[str, Any] | list[tuple[str, Any]] | None, default_endpoint: str | None) -> "ParseOptions":
        items = dict(options or {})
        unknown = sorted(set(items) - set(OPTIONS))
        if "imageOutputPath" in unknown:
            raise ArgumentError("ai_parse_document: option 'imageOutputPath' is not supported (pages are not rendered to images "
                                "here); remove it from the options map")
        if unknown:
            raise ArgumentError(f"ai_parse_document: unknown option(s) {', '.join(map(repr, unknown))}; "
                                f"the options are {', '.join(OPTIONS)}")
        version = items.get("version") or "2.0"
        if version not in VERSIONS:
            raise ArgumentError(f"ai_parse_document: version {version!r} is not supported; use map('version', '2.0')")
        kinds = (items.get("descriptionElementTypes") if items.get("descriptionElementTypes") is not None else "*").strip()
        if kinds not in ("", "*", "figure"):
            raise ArgumentError(f"ai_parse_document: descriptionElementTypes {kinds!r} must be '', '*' or 'figure' "
                                "(version 2.0 describes figures only)")
        return cls(version, items.get("imageEndpoint") or default_endpoint, kinds != "")


@dataclass
class Element:
    type: str
    content: str
    page_id: int
    coord: list[int] | None = None
    description: str | None = None
    size: float = 0.0
    """The font size of a text-layer block (a title is picked once every page is read)."""


@dataclass
class ParsedDocument:
    """One row's document being built: pages, elements, per-page errors, and pages left for a vision endpoint."""

    data: bytes
    options: ParseOptions
    pages: int = 0
    elements: list[Element] = field(default_factory=list)
    errors: list[tuple[str, int | None]] = field(default_factory=list)
    vision: dict[int, Any] = field(default_factory=dict)
    """page id -> the chat request (one user message with the image or the one-page PDF) to send."""

    def add_vision_answer(self, page_id: int, text: str) -> None:
        self.elements.extend(markdown_elements(text, page_id))

    def result(self) -> dict[str, Any]:
        order = sorted(range(len(self.elements)), key=lambda i: (self.elements[i].page_id, i))
        elements = []
        for new_id, i in enumerate(order):
            e = self.elements[i]
            elements.append({"id": new_id, "type": e.type, "content": e.content,
                             "bbox": [] if e.coord is None else [{"coord": e.coord, "page_id": e.page_id}],
                             "description": e.description})
        return {
            "document": {"pages": [{"id": p, "image_uri": None} for p in range(self.pages)], "elements": elements},
            "error_status": [{"error_message": m, "page_id": p} for m, p in sorted(self.errors, key=lambda e: (e[1] is None, e[1] or 0))],
            "metadata": {"id": hashlib.sha256(self.data).hexdigest()[:32], "version": self.options.version,
                         "file_metadata": {"file_path": None, "file_name": None, "file_size": len(self.data),
                                           "file_modification_time": None}},
        }


def start_document(data: bytes, options: ParseOptions) -> ParsedDocument:
    """Read what can be read locally; pages that need a model are left in ``.vision``."""
    doc = ParsedDocument(bytes(data), options)
    try:
        kind = media_type(doc.data)
    except UnsupportedFileError:
        head = doc.data[:8].hex(" ") if doc.data else "no bytes at all"
        doc.errors.append((f"ai_parse_document cannot read a file of {len(doc.data)} bytes starting {head}: it reads PDF, "
                           "PNG, JPEG, GIF and WEBP (DOC/DOCX/PPT/PPTX: convert them to PDF first)", None))
        return doc
    if kind == "application/pdf":
        _read_pdf(doc)
    else:
        doc.pages = 1
        _need_vision(doc, 0, doc.data)
    return doc


def _need_vision(doc: ParsedDocument, page_id: int, data: bytes) -> None:
    if doc.options.image_endpoint is None:
        doc.errors.append(("this page has no text layer (an image or a scan) and no vision endpoint is configured: pass "
                           "map('imageEndpoint', '<chat endpoint>') or register(spark, task_endpoints={'ai_parse_document': ...})",
                           page_id))
        return
    doc.vision[page_id] = with_files(VISION_PROMPT, [data])


def _read_pdf(doc: ParsedDocument) -> None:
    try:
        from pypdf import PdfReader, PdfWriter
        from pypdf.errors import PyPdfError
    except ImportError as exc:
        raise ImportError("ai_parse_document reads PDFs with pypdf: pip install 'spark-ai-query[spark]'") from exc
    try:
        reader = PdfReader(io.BytesIO(doc.data))
        pages = list(reader.pages)
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError) as exc:
        doc.errors.append((f"ai_parse_document cannot read this PDF of {len(doc.data)} bytes: {exc}", None))
        return
    doc.pages = len(pages)
    runs_by_page: list[list[_Run]] = []
    for page_id, page in enumerate(pages):
        try:
            runs_by_page.append(_text_runs(page))
        except (PyPdfError, ValueError, KeyError, TypeError, AttributeError) as exc:
            runs_by_page.append([])
            doc.errors.append((f"page {page_id}: its text could not be read: {exc}", page_id))
    body = _body_size([r for runs in runs_by_page for r in runs])
    for page_id, (page, runs) in enumerate(zip(pages, runs_by_page)):
        if runs:
            doc.elements.extend(_blocks(runs, float(page.mediabox.height), page_id, body))
        elif not any(p == page_id for _, p in doc.errors):  # no text layer: a scan
            writer = PdfWriter()
            writer.add_page(page)
            out = io.BytesIO()
            writer.write(out)
            _need_vision(doc, page_id, out.getvalue())
    if doc.elements and body:  # the largest heading of the first page, well above the body size, is the title
        top = max(e.size for e in doc.elements)
        for e in doc.elements:
            if e.type == "section_header" and e.page_id == 0 and e.size == top and top >= 1.6 * body:
                e.type = "title"
                break


@dataclass
class _Run:
    text: str
    x: float
    y: float
    size: float


def _text_runs(page: Any) -> list[_Run]:
    runs: list[_Run] = []

    def visit(text: str, cm: list[float], tm: list[float], font: Any, size: float) -> None:
        if not text.strip():
            return
        # the text matrix times the current transformation matrix: where the run starts on the page
        a, b, c, d, e, f = tm
        m0, m1, m2, m3, m4, m5 = cm
        x = e * m0 + f * m2 + m4
        y = e * m1 + f * m3 + m5
        scale = ((c * m0 + d * m2) ** 2 + (c * m1 + d * m3) ** 2) ** 0.5 or 1.0
        runs.append(_Run(text.replace("\n", " ").strip(), x, y, round(size * scale, 1)))

    page.extract_text(visitor_text=visit)
    return runs


def _body_size(runs: list[_Run]) -> float:
    weight: dict[float, int] = {}
    for r in runs:
        weight[r.size] = weight.get(r.size, 0) + len(r.text)
    return max(weight, key=lambda s: (weight[s], -s)) if weight else 0.0


def _blocks(runs: list[_Run], height: float, page_id: int, body: float) -> list[Element]:
    lines: list[list[_Run]] = []
    for run in sorted(runs, key=lambda r: (-r.y, r.x)):
        if lines and abs(lines[-1][0].y - run.y) < 0.5 * max(run.size, lines[-1][0].size):
            lines[-1].append(run)
        else:
            lines.append([run])
    blocks: list[list[list[_Run]]] = []
    for line in lines:
        size = max(r.size for r in line)
        if blocks:
            prev = blocks[-1][-1]
            prev_size = max(r.size for r in prev)
            if abs(size - prev_size) <= 0.1 * prev_size and prev[0].y - line[0].y <= 1.6 * max(size, prev_size):
                blocks[-1].append(line)
                continue
        blocks.append([line])
    out = []
    for block in blocks:
        size = max(r.size for line in block for r in line)
        text = "\n".join(" ".join(r.text for r in sorted(line, key=lambda r: r.x)) for line in block)
        x0 = min(r.x for line in block for r in line)
        x1 = max(r.x + 0.5 * r.size * len(r.text) for line in block for r in line)
        y_top = max(r.y + 0.8 * r.size for line in block for r in line)
        y_bottom = min(r.y - 0.2 * r.size for line in block for r in line)
        coord = [round(x0), round(height - y_top), round(x1), round(height - y_bottom)]
        if re.fullmatch(r"\d{1,4}", text.strip()) and (y_bottom < 0.08 * height or y_top > 0.92 * height):
            kind = "page_number"
        elif body and size >= 1.25 * body:
            kind = "section_header"
        else:
            kind = "text"
        out.append(Element(kind, text, page_id, coord, size=size))
    return out


def markdown_elements(text: str, page_id: int) -> list[Element]:
    """A vision answer (Markdown) as elements: ``#`` headings, ``|`` tables, paragraphs."""
    out: list[Element] = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = block.strip().splitlines()
        heading = re.match(r"(#{1,6})\s+(.*)", lines[0]) if lines else None
        if heading:  # a heading line, then what follows it in the same block
            out.append(Element("title" if len(heading.group(1)) == 1 else "section_header", heading.group(2).strip(), page_id))
            lines = lines[1:]
        if lines:
            kind = "table" if all(line.lstrip().startswith("|") for line in lines) else "text"
            out.append(Element(kind, "\n".join(lines).strip(), page_id))
    return out


__all__ = ["OPTIONS", "VERSIONS", "VISION_PARAMS", "Element", "ParseOptions", "ParsedDocument", "markdown_elements",
           "start_document"]
