"""The v2 forms of ``ai_classify`` and ``ai_extract``: labels as JSON, an options map, VARIANT results.

Databricks' second version of these functions takes its labels as an array, a JSON array string,
or a JSON object string (``{"label": "what it means"}`` for ai_classify; field descriptions or a
JSON schema for ai_extract) and an options ``MAP<STRING, STRING>`` (``version``, ``instructions``,
``multilabel``), and answers a ``VARIANT`` ``{"response": ..., "error_message": ...}``: a row that
fails is that row's ``error_message``, not the query's failure. The UDF returns the VARIANT's JSON
text and the rewrite wraps the call in ``parse_json(...)`` (an Arrow UDF cannot return VARIANT).

The v1 forms (labels as ``ARRAY<STRING>``, no options: STRING / STRUCT results) stay; a call is v2
when it gives options (unless ``version`` is ``'1.0'``) or gives its labels as a JSON string.
The answer is constrained by a JSON schema (``response_format``) where the backend supports it;
the reading below also takes a free-text answer naming the labels.
"""

from __future__ import annotations

import json
from typing import Any

from ._tasks import CHAT_PARAMS, TaskFunction

VERSIONS = ("1.0", "2.0")
OPTIONS = {"ai_classify": ("version", "instructions", "multilabel"), "ai_extract": ("version", "instructions")}


def options_of(name: str, options: Any) -> dict[str, str]:
    """The options map (Arrow gives a MAP as a list of pairs) checked; ``ValueError`` names the fix."""
    if options is None:
        return {}
    pairs = options.items() if isinstance(options, dict) else options
    out: dict[str, str] = {}
    for key, value in pairs:
        if key not in OPTIONS[name]:
            raise ValueError(f"unknown option {key!r}; the options of {name} are {', '.join(OPTIONS[name])}")
        out[key] = "" if value is None else str(value)
    if out.get("version", "2.0") not in VERSIONS:
        raise ValueError(f"option version must be one of {', '.join(VERSIONS)}, got {out['version']!r}")
    if out.get("multilabel", "false").lower() not in ("true", "false"):
        raise ValueError(f"option multilabel must be 'true' or 'false', got {out['multilabel']!r}")
    return out


def labels_of(name: str, labels: Any) -> dict[str, Any]:
    """Labels (or fields) with their descriptions (``None`` if none) from an array, a JSON array
    string or a JSON object string; for ai_extract a JSON schema gives its properties."""
    value = labels
    if isinstance(labels, str):
        try:
            value = json.loads(labels)
        except ValueError as exc:
            raise ValueError("labels must be a non-empty array of strings, e.g. array('a', 'b'), a JSON array "
                             f"""'["a", "b"]' or a JSON object '{{"a": "what a means"}}'; got {labels[:80]!r}, which is not JSON ({exc})""") from None
    if isinstance(value, dict) and name == "ai_extract" and value.get("type") == "object" and isinstance(value.get("properties"), dict):
        value = value["properties"]
    if isinstance(value, list) and value and all(isinstance(x, str) and x for x in value):
        out: dict[str, Any] = {x: None for x in value}
    elif isinstance(value, dict) and value and all(isinstance(k, str) and k for k in value):
        out = dict(value)
    else:
        raise ValueError(f"labels must be a non-empty array of names or a JSON object of names with descriptions, got {str(labels)[:80]!r}")
    if name == "ai_classify" and not 2 <= len(out) <= 20:
        raise ValueError(f"ai_classify takes 2 to 20 labels (at least 2 to choose between), got {len(out)}")
    return out


def is_v2(labels: Any, options: Any) -> bool:
    """Whether literal arguments ask for the v2 form (see the module docstring)."""
    if options is not None and options is not NotImplemented:
        return dict(options).get("version", "2.0") == "2.0"
    return isinstance(labels, str)


def _listed(labels: dict[str, Any]) -> str:
    return "\n".join(f"- {k}" + (f": {v}" if isinstance(v, str) and v else "") for k, v in labels.items())


def _field_schema(spec: Any) -> dict[str, Any]:
    """A field's JSON schema: given as one, or a description (a nullable string)."""
    if isinstance(spec, dict) and "type" in spec:
        return spec
    return {"type": ["string", "null"]}


def classify_v2(content: Any, labels: Any, options: Any = None):
    chosen = labels_of("ai_classify", labels)
    opts = options_of("ai_classify", options)
    multi = opts.get("multilabel", "false").lower() == "true"
    names = list(chosen)
    items: dict[str, Any] = {"type": "string", "enum": names}
    schema = {"type": "object", "properties": {"labels": {"type": "array", "items": items, **({} if multi else {"maxItems": 1})}},
              "required": ["labels"], "additionalProperties": False}
    ask = "every label that applies" if multi else "exactly one label"
    instructions = f"{opts['instructions']}\n\n" if opts.get("instructions") else ""
    prompt = (f"{instructions}Classify the text: answer {ask} from this list, as JSON {{\"labels\": [...]}}.\n"
              f"{_listed(chosen)}\n\nText: {content}")
    fmt = {"type": "json_schema", "json_schema": {"name": "classification", "schema": schema, "strict": True}}
    return prompt, fmt, {**CHAT_PARAMS, "max_tokens": 32 + 16 * (len(names) if multi else 1)}


def read_classify_v2(text: str, content: Any, labels: Any, options: Any = None) -> str:
    names = list(labels_of("ai_classify", labels))
    multi = options_of("ai_classify", options).get("multilabel", "false").lower() == "true"
    picked: list[str] = []
    try:
        value = json.loads(text)
        value = value.get("labels", value.get("label")) if isinstance(value, dict) else value
        value = [value] if isinstance(value, str) else value
        if isinstance(value, list):
            picked = [v for v in value if isinstance(v, str) and v in names]
    except ValueError:
        lowered = text.lower()
        picked = [n for _, n in sorted((lowered.find(n.lower()), n) for n in names if n.lower() in lowered)]
    if not picked:
        raise ValueError(f"the answer names none of the labels {names}: {text[:80]!r}")
    picked = list(dict.fromkeys(picked))  # each label once, in the answer's order
    return json.dumps({"response": picked if multi else picked[:1], "error_message": None})


def extract_v2(content: Any, labels: Any, options: Any = None):
    fields = labels_of("ai_extract", labels)
    opts = options_of("ai_extract", options)
    schema = {"type": "object", "properties": {k: _field_schema(v) for k, v in fields.items()}, "required": list(fields),
              "additionalProperties": False}
    described = {k: (v.get("description") if isinstance(v, dict) else v) for k, v in fields.items()}
    instructions = f"{opts['instructions']}\n\n" if opts.get("instructions") else ""
    prompt = (f"{instructions}Extract these fields from the text as one JSON object; use null for a field the text does not give.\n"
              f"{_listed(described)}\n\nText: {content}")
    fmt = {"type": "json_schema", "json_schema": {"name": "extraction", "schema": schema, "strict": True}}
    return prompt, fmt, {**CHAT_PARAMS, "max_tokens": 64 + 48 * len(fields)}


def read_extract_v2(text: str, content: Any, labels: Any, options: Any = None) -> str:
    fields = labels_of("ai_extract", labels)
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {text[:80]!r}")
    return json.dumps({"response": {k: value.get(k) for k in fields}, "error_message": None})


def v2_task(name: str) -> TaskFunction:
    """The v2 task function of ``ai_classify`` / ``ai_extract`` (row errors as data)."""
    prompt, read = (classify_v2, read_classify_v2) if name == "ai_classify" else (extract_v2, read_extract_v2)
    return TaskFunction(name, ("labels", "options"), (None, None), "local-chat", "STRING", prompt, read, errors_as_data=True)
