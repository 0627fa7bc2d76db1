"""Secrets scrubbed from text that came from outside, before it becomes an error, a row or a log line.

Providers echo the key they were given ("Incorrect API key provided: sk-..."; some put the whole
request, headers included, in a 400 or 500 body). That text becomes our error message, and an
error message travels everywhere: a row's ``errorMessage`` and ``aiq_error``, the usage and payload
tables, the exception a ``spark.sql`` caller gets, Spark's logs, a job's stderr, the server's log
and its HTTP error answers. Scrubbing each of those places would miss the next one, so the text
is scrubbed where it enters: where a provider's answer is classified into an error
(``backends/_http_common.py``, before the detail is cut to length, so that no half key survives
the cut) and, as a net under every other path, in ``AIQueryError`` itself, whose message is
scrubbed when the error is made.

Two nets, both applied by ``redact``:

- **known values**: every secret resolved in this process (``resolve_secret``) and every
  credential header value sent (``Authorization``, ``x-api-key``, ``api-key``; the endpoint client
  notes them as it sends). A provider can echo only what it was sent, and what was sent was noted
  first, so an echo of any key, whatever its shape, is caught. Values shorter than
  ``MIN_SECRET_LENGTH`` are not noted: scrubbing ``"abc"`` out of every message would shred them.
- **key shapes**: OpenAI and Anthropic (``sk-...``), Databricks (``dapi...``), AWS access key ids
  (``AKIA...``), Hugging Face (``hf_...``), Google (``AIza...``), GitHub, Slack, Groq, xAI,
  Replicate, JWTs, ``Bearer <token>``, and ``api_key=...``-style assignments: keys this process
  never saw (another process's, a key a gateway added).

Every match becomes ``[REDACTED]``; the rest of the message stays, so an error still says what
happened ("HTTP 401 ...: Incorrect API key provided: [REDACTED]").
"""

from __future__ import annotations

import json
import re
import threading
from typing import Mapping
from urllib.parse import quote

REDACTED = "[REDACTED]"
MIN_SECRET_LENGTH = 6
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "x-api-key", "api-key", "x-goog-api-key"})
"""Request headers whose values are credentials (names lower-cased)."""

_KEEP = r"(?!\[REDACTED\]|\{\{\s*secrets/)"  # already scrubbed, or a secret reference (a name, not a value)
_SHAPES: tuple[tuple[tuple[str, ...], re.Pattern[str], str], ...] = (
    # (lower-case substrings one of which the text must hold, the shape, its replacement): the
    # substring test costs a fraction of a regex scan, and most messages hold none of them
    (("bearer",), re.compile(r"(?i)\b(bearer\s+)" + _KEEP + r"(?=\S*\d)[A-Za-z0-9._~+/\-]{8,}=*"), r"\1" + REDACTED),
    (("sk-",), re.compile(r"\bsk-(?:ant-|proj-|svcacct-|admin-)?[A-Za-z0-9_\-*]{16,}"), REDACTED),  # OpenAI, Anthropic
    (("dapi", "dose", "dkea"), re.compile(r"\b(?:dapi|dose|dkea)[0-9a-f]{32}(?:-\d+)?\b"), REDACTED),  # Databricks
    (("akia", "asia", "abia", "acca"), re.compile(r"\b(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}\b"), REDACTED),  # AWS key ids
    (("hf_",), re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"), REDACTED),  # Hugging Face
    (("aiza",), re.compile(r"\bAIza[0-9A-Za-z_\-]{35}\b"), REDACTED),  # Google API keys
    (("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
     re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{40,})\b"), REDACTED),  # GitHub
    (("xox",), re.compile(r"\bxox[abposr]-[A-Za-z0-9\-]{10,}"), REDACTED),  # Slack
    (("gsk_", "xai-", "r8_", "pplx-"), re.compile(r"\b(?:gsk_|xai-|r8_|pplx-)[A-Za-z0-9]{30,}\b"), REDACTED),  # Groq, xAI, ...
    (("eyj",), re.compile(r"\beyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}"), REDACTED),  # JWTs
    # name = value / "name": "value" for credential-like names (``openai_api_key=...``, ``"password": "..."``)
    (("key", "token", "secret", "password", "authorization"),
     re.compile(r"(?i)(?<![A-Za-z0-9])((?:x-)?api[-_]?key|access[-_]?token|client[-_]?secret|secret[-_]?(?:access[-_]?)?key"
                r"|password|authorization)(\"?\s*[:=]\s*\"?)" + _KEEP + r"(?!bearer\b)([^\s\"',;&}]{6,})"), r"\1\2" + REDACTED),
)

_lock = threading.Lock()
_known: set[str] = set()
_known_pattern: re.Pattern[str] | None = None


def remember_secret(value: str | None) -> None:
    """Note a secret value of this process, so that ``redact`` scrubs it (and its JSON- and
    URL-escaped forms, as a provider may echo it inside a JSON string or a URL)."""
    global _known_pattern
    if not value or len(value) < MIN_SECRET_LENGTH or value in _known:
        return
    forms = {value, json.dumps(value)[1:-1], quote(value, safe="")}
    with _lock:
        _known.update(f for f in forms if len(f) >= MIN_SECRET_LENGTH)
        # longest first: a key that contains another is scrubbed whole
        _known_pattern = re.compile("|".join(re.escape(v) for v in sorted(_known, key=len, reverse=True)))


def remember_headers(headers: Mapping[str, str]) -> None:
    """Note the credential header values of a request about to be sent (``Bearer`` tokens without the scheme)."""
    for name, value in headers.items():
        if name.lower() in CREDENTIAL_HEADERS and value:
            scheme, _, token = value.partition(" ")
            remember_secret(token.strip() if token.strip() and scheme.lower() in ("bearer", "basic", "token") else value)


def redact(text: str) -> str:
    """``text`` with every known secret value and every well-known key shape replaced by ``[REDACTED]``."""
    pattern = _known_pattern
    if pattern is not None:
        text = pattern.sub(REDACTED, text)
    lower = text.lower()
    for triggers, shape, replacement in _SHAPES:
        if any(t in lower for t in triggers):
            text = shape.sub(replacement, text)
    return text
