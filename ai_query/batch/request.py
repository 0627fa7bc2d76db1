"""[2 plan] A request's identity, computed once per row and shared by every stage that needs it.

Two things identify a request, for two different questions:

* ``RequestKey`` answers "would the endpoint give this row the same answer as that one?": the
  endpoint, the request, the model parameters and the response format, each as canonical JSON.
  Dedup (rows of a batch, and the stage's answer cache) compares keys; the response journal
  files an answer under ``key.digest``. A key is a tuple of strings, so comparing and hashing it
  costs no encoding; the digest (a hash over the same strings) is only computed for a journal.
* ``prompt_text_of`` answers "what text will the model read?": prefix ordering sorts by it, the
  traffic split hashes it (``traffic_point``), the vllm_pool router matches prefixes on it.

The traffic split stays on the prompt text rather than the key: the split must put a row on the
same served entity in batch and online and on a retried task, which both do, but hashing the
key would also move every row of an existing split to another entity after an upgrade (a resumed
job would mix two entities' answers for one prompt), and a prompt asked with other parameters
(an A/B of ``temperature``) would no longer meet the same entity.

``row_fault`` answers "may this row be sent at all?": a NULL, blank, non-UTF-8 or over-long
prompt is that row's error, decided before any request (the exchange asks it for every row).

The digest is the same hash the journal used before it moved here, so journals written by an
earlier version replay (a test pins it).
"""

from __future__ import annotations

import hashlib
import json
from json.encoder import encode_basestring_ascii
from typing import Any, Mapping, NamedTuple

from .._files import text_of_content


def canonical_json(value: Any) -> str:
    """``value`` as JSON with sorted keys (anything not JSON as its ``str``): equal values, equal text."""
    if isinstance(value, str):  # what json.dumps makes of a string, without building an encoder
        return encode_basestring_ascii(value)
    return json.dumps(value, sort_keys=True, default=str)


class RequestKey(NamedTuple):
    """Everything that decides a request's answer, as canonical JSON (see ``request_key``)."""

    endpoint: str
    params: str
    response_format: str
    request: str

    @property
    def digest(self) -> str:
        """The key as 32 hex digits: what the response journal files an answer under."""
        text = f"[{canonical_json(self.endpoint)}, {self.request}, {self.params}, {self.response_format}]"
        return hashlib.sha256(text.encode()).hexdigest()[:32]


def request_key(endpoint: str, request: Any, params: Any = None, response_format: Any = None) -> RequestKey:
    """The identity of one request (``plan.group_rows`` builds keys from JSON it encodes once per group)."""
    return RequestKey(endpoint, canonical_json(params), canonical_json(response_format), canonical_json(request))


def prompt_text_of(value: Any) -> str:
    """The text a model reads from a request: the string, or the chat messages' contents joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # chat messages (content: a string or content parts)
        return "".join(text_of_content(m.get("content", "")) for m in value if isinstance(m, Mapping))
    return str(value)


def row_fault(value: Any, max_prompt_chars: int | None = None) -> str | None:
    """Why a row's request must not be sent (that row's error), or ``None`` to send it.

    A NULL, an empty or blank prompt, text that is not valid UTF-8 (lone surrogates, as left by
    ``surrogateescape`` decoding) and a prompt over ``max_prompt_chars`` are faults of the row,
    not of the query: the row fails without a request (an endpoint would bill or refuse it), the
    other rows go on.
    """
    if value is None:
        return "the request is NULL: nothing to send"
    if isinstance(value, str):
        if not value.strip():
            return (f"the request is {'an empty string' if not value else 'only whitespace'} ({value[:20]!r}): nothing to send; "
                    "filter such rows out (WHERE trim(col) <> '') or give them a prompt")
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                try:
                    raw = value.encode("utf-8", "surrogateescape")  # the bytes a surrogateescape decode kept
                except UnicodeEncodeError:
                    raw = value.encode("utf-8", "surrogatepass")
                return invalid_utf8_message(raw, exc.start)
    elif isinstance(value, list) and not value:
        return "the request is an empty list of messages: nothing to send; give at least one message"
    if max_prompt_chars is not None:
        chars = len(prompt_text_of(value))
        if chars > max_prompt_chars:
            return (f"the prompt has {chars} characters, over this endpoint's max_prompt_chars ({max_prompt_chars}): "
                    "not sent; shorten the prompt (e.g. left(col, N)) or raise client_config.max_prompt_chars")
    return None


def invalid_utf8_message(data: bytes, offset: int) -> str:
    """A row error for text whose bytes are not UTF-8, naming the bad byte and the SQL fix."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = exc.start
    return (f"the request is not valid UTF-8: byte 0x{data[offset]:02X} at offset {offset} of {data[:40]!r}; "
            "not sent; repair the column with make_valid_utf8(col) or skip such rows (WHERE is_valid_utf8(col))")


def traffic_point(prompt_text: str, total_weight: int) -> int:
    """Where a prompt falls in a traffic split of ``total_weight``: a hash, not a random draw, so
    the same row goes to the same served entity in batch, online and on a retried task."""
    return int.from_bytes(hashlib.blake2b(prompt_text.encode(), digest_size=8).digest(), "big") % total_weight


__all__ = ["RequestKey", "canonical_json", "invalid_utf8_message", "prompt_text_of", "request_key", "row_fault", "traffic_point"]
