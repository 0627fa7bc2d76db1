"""Files in a request (``ai_query(..., files => content)``): images and PDFs as content parts.

A row's files (a BINARY value, or an ARRAY<BINARY>) join its text in one user message of
OpenAI-style content parts, the form OpenAI-compatible and serving endpoints take:

- images (PNG, JPEG, GIF, WEBP): ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``
- PDFs: ``{"type": "file", "file": {"filename": "file-1.pdf", "file_data": "data:application/pdf;base64,..."}}``

The Anthropic adapter turns them into ``image`` / ``document`` blocks. The media type comes from
the bytes themselves (their magic numbers); anything else is a row error naming what was found.
Which endpoints take files at all is :func:`files_unsupported_reason`, checked on the driver.
"""

from __future__ import annotations

import base64
from typing import Any, Mapping, Sequence

from ._errors import UnsupportedFileError

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"%PDF-", "application/pdf"),
)
SUPPORTED = ("image/png", "image/jpeg", "image/gif", "image/webp", "application/pdf")


def media_type(data: bytes) -> str:
    """The media type of ``data`` from its first bytes; raises ``UnsupportedFileError`` otherwise."""
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return kind
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    head = data[:8].hex(" ") if data else "no bytes at all"
    raise UnsupportedFileError(
        f"a file of {len(data)} bytes starting {head} is not one of {', '.join(SUPPORTED)}; "
        "files => takes images (PNG, JPEG, GIF, WEBP) and PDFs"
    )


def data_uri(data: bytes, kind: str) -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode('ascii')}"


def parse_data_uri(uri: str) -> tuple[str, bytes]:
    """``(media type, bytes)`` of a ``data:<type>;base64,<data>`` URI; ``ValueError`` if it is not one."""
    if not uri.startswith("data:") or ";base64," not in uri:
        raise ValueError("not a base64 data URI")
    head, _, payload = uri[5:].partition(";base64,")
    return head, base64.b64decode(payload, validate=True)


def as_file_list(files: Any) -> list[bytes]:
    """A row's ``files`` value (NULL, BINARY, or ARRAY<BINARY>) as a list of byte strings."""
    if files is None:
        return []
    if isinstance(files, (bytes, bytearray, memoryview)):
        return [bytes(files)]
    if isinstance(files, (list, tuple)):
        out = []
        for i, f in enumerate(files):
            if not isinstance(f, (bytes, bytearray, memoryview)):
                raise UnsupportedFileError(f"files[{i}] is {type(f).__name__}, not BINARY")
            out.append(bytes(f))
        return out
    raise UnsupportedFileError(f"files must be BINARY or ARRAY<BINARY>, got {type(files).__name__}")


def with_files(request: Any, files: Sequence[bytes]) -> Any:
    """The request with ``files`` attached: one user message of content parts (text first)."""
    if not files:
        return request
    parts: list[dict[str, Any]] = []
    if request is not None and request != "":
        parts.append({"type": "text", "text": str(request)})
    for i, data in enumerate(files):
        kind = media_type(data)
        if kind == "application/pdf":
            parts.append({"type": "file", "file": {"filename": f"file-{i + 1}.pdf", "file_data": data_uri(data, kind)}})
        else:
            parts.append({"type": "image_url", "image_url": {"url": data_uri(data, kind)}})
    return [{"role": "user", "content": parts}]


def text_of_content(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping) and p.get("type") == "text")
    return "" if content is None else str(content)


def anthropic_content(content: Any) -> Any:
    """OpenAI-style content parts as Anthropic Messages blocks (``image`` / ``document`` with base64 sources)."""
    if not isinstance(content, list):
        return content
    blocks: list[Any] = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "image_url":
            media, data = parse_data_uri(part["image_url"]["url"])
            blocks.append({"type": "image", "source": {"type": "base64", "media_type": media,
                                                       "data": base64.b64encode(data).decode("ascii")}})
        elif kind == "file":
            media, data = parse_data_uri(part["file"]["file_data"])
            blocks.append({"type": "document", "source": {"type": "base64", "media_type": media,
                                                          "data": base64.b64encode(data).decode("ascii")}})
        else:
            blocks.append(part)
    return blocks


def files_unsupported_reason(config: Any) -> str | None:
    """Why endpoint ``config`` cannot take ``files =>`` (None if it can)."""
    task = config.task
    if task != "llm/v1/chat":
        return f"endpoint {config.name!r} serves {task}; files => needs a chat endpoint (llm/v1/chat) whose model reads images or PDFs"
    for entity in config.served_entities:
        if entity.local_model is not None:
            return (f"endpoint {config.name!r} serves the local model {entity.local_model.model!r}, which reads text only; "
                    "files => needs a vision model behind an external_model (openai, anthropic, databricks-model-serving)")
        if entity.is_mlflow:
            return (f"endpoint {config.name!r} serves an MLflow pyfunc model, which takes text rows; "
                    "files => needs a chat endpoint behind an external_model")
    return None


__all__ = ["SUPPORTED", "UnsupportedFileError", "anthropic_content", "as_file_list", "data_uri", "files_unsupported_reason",
           "media_type", "parse_data_uri", "text_of_content", "with_files"]
