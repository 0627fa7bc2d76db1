"""AI task functions (``ai_classify``, ``ai_summarize``, ...) built on the same client path as ``ai_query``.

Each function turns its arguments into a prompt (and, where the answer is a choice, a JSON
schema for constrained decoding), sends it to its endpoint through the process's shared client,
and reads the answer back into a Spark type. The default endpoint of each function is
configurable: ``spark_udfs.register(spark, task_endpoints={"ai_classify": "my-endpoint"})``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import pyarrow as pa

from ai_query import EndpointRegistry, shared_client

from ._conditions import AIQueryRowException
from ._udf import decode_column, start_task_rows

SENTIMENTS = ["positive", "negative", "neutral", "mixed"]
CHAT_PARAMS = {"temperature": 0.0}


def _choice_format(labels: list[str]) -> dict[str, Any]:
    schema = {"type": "object", "properties": {"label": {"type": "string", "enum": labels}}, "required": ["label"],
              "additionalProperties": False}
    return {"type": "json_schema", "json_schema": {"name": "choice", "schema": schema, "strict": True}}


def _pick_label(text: str, labels: list[str]) -> str:
    """The chosen label from a constrained JSON answer, or the first label named in free text."""
    try:
        value = json.loads(text)
        if isinstance(value, dict):
            value = value.get("label", value.get("sentiment"))
        if isinstance(value, str) and value in labels:
            return value
    except ValueError:
        pass
    lowered = text.lower()
    hits = sorted((lowered.find(label.lower()), label) for label in labels if label.lower() in lowered)
    if hits:
        return hits[0][1]
    raise ValueError(f"the answer names none of the labels {labels}: {text[:80]!r}")


def _extract_format(labels: list[str]) -> dict[str, Any]:
    schema = {"type": "object", "properties": {label: {"type": ["string", "null"]} for label in labels},
              "required": labels, "additionalProperties": False}
    return {"type": "json_schema", "json_schema": {"name": "extraction", "schema": schema, "strict": True}}


def _clean(text: str) -> str:
    return text.strip().strip('"').strip()


@dataclass(frozen=True)
class TaskFunction:
    """One AI function: SQL name, argument names, default endpoint, prompt and answer handling."""

    name: str
    args: tuple[str, ...]
    """SQL argument names after the first (content) argument, with their defaults below."""
    defaults: tuple[Any, ...]
    default_endpoint: str
    return_type: str
    prompt: Callable[..., tuple[str, dict[str, Any] | None, dict[str, Any]]] | None
    """(prompt, response_format, model parameters) for one row's arguments."""
    read: Callable[..., Any] | None
    """The typed value from the answer text and the row's arguments."""
    errors_as_data: bool = False
    """A row that fails is that row's value (``_tasks_v2.error_value``), not the query's failure."""


POLARITY = ["positive", "negative"]


def _sentiment(content: str):
    # A four-way question (with neutral and mixed) is beyond small models: the embedded 135M
    # model then picks whichever label comes last. The two-way question it answers reliably
    # (12/12 on the labelled set in tests/data); text with no words is neutral.
    return (f"Is the sentiment of this text positive or negative?\n\nText: {content}",
            _choice_format(POLARITY), {**CHAT_PARAMS, "max_tokens": 24})


def _read_sentiment(text: str, content: str) -> str:
    return "neutral" if not content.strip() else _pick_label(text, SENTIMENTS)


SMALL_MODELS = ("smollm2-135m-instruct", "tiny-llama")
"""Embedded models that answer only the two-way sentiment question reliably."""


def _sentiment_four_way(content: str):
    return (f"What is the sentiment of this text: positive, negative, neutral, or mixed (both positive and negative)?\n\n"
            f"Text: {content}", _choice_format(SENTIMENTS), {**CHAT_PARAMS, "max_tokens": 24})


def sentiment_task(model_name: str | None) -> TaskFunction:
    """``ai_analyze_sentiment`` with Databricks' four labels, or the two-way question for the embedded small models."""
    if model_name in SMALL_MODELS:
        return TASKS["ai_analyze_sentiment"]
    return TaskFunction("ai_analyze_sentiment", (), (), "local-chat", "STRING", _sentiment_four_way, _read_sentiment)


def _classify(content: str, labels: list[str], options: Any = None):
    if not labels:
        raise ValueError("labels must be a non-empty ARRAY<STRING>")
    return (f"Classify the text into exactly one of these labels: {', '.join(labels)}.\n\nText: {content}",
            _choice_format(labels), {**CHAT_PARAMS, "max_tokens": 48})


def _extract(content: str, labels: list[str], options: Any = None):
    if not labels:
        raise ValueError("labels must be a non-empty ARRAY<STRING>")
    return (f"Extract these items from the text: {', '.join(labels)}. Use null for an item the text does not mention.\n\n"
            f"Text: {content}", _extract_format(labels), {**CHAT_PARAMS, "max_tokens": 64 + 32 * len(labels)})


def _read_extract(text: str, content: str, labels: list[str], options: Any = None) -> str:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {text[:80]!r}")
    return json.dumps({label: (None if value.get(label) in (None, "") else str(value.get(label))) for label in labels})


def _summarize(content: str, max_words: int | None):
    words = 50 if max_words is None else int(max_words)
    if words < 0:
        raise ValueError(f"max_words must be >= 0, got {words}")
    limit = f" in at most {words} words" if words else ""
    return (f"Summarize the text{limit}. Reply with the summary only.\n\nText: {content}", None,
            {**CHAT_PARAMS, "max_tokens": (2 * words + 16) if words else 512})


def _read_summary(text: str, content: str, max_words: int | None) -> str:
    words = _clean(text).split()
    limit = 50 if max_words is None else int(max_words)
    return " ".join(words[:limit]) if limit else " ".join(words)


LANGUAGES = {
    "ar": "Arabic", "bg": "Bulgarian", "bn": "Bengali", "ca": "Catalan", "cs": "Czech", "da": "Danish", "de": "German",
    "el": "Greek", "en": "English", "es": "Spanish", "et": "Estonian", "fa": "Persian", "fi": "Finnish", "fr": "French",
    "he": "Hebrew", "hi": "Hindi", "hr": "Croatian", "hu": "Hungarian", "id": "Indonesian", "it": "Italian", "ja": "Japanese",
    "ko": "Korean", "lt": "Lithuanian", "lv": "Latvian", "ms": "Malay", "nl": "Dutch", "no": "Norwegian", "pl": "Polish",
    "pt": "Portuguese", "ro": "Romanian", "ru": "Russian", "sk": "Slovak", "sl": "Slovenian", "sr": "Serbian", "sv": "Swedish",
    "sw": "Swahili", "ta": "Tamil", "th": "Thai", "tl": "Tagalog", "tr": "Turkish", "uk": "Ukrainian", "ur": "Urdu",
    "vi": "Vietnamese", "zh": "Chinese", "cn": "Chinese",  # 'cn' as Databricks' own examples write it
}
_LANGUAGE_NAMES = {name.lower(): name for name in LANGUAGES.values()}


def language_name(to_lang: Any) -> str:
    """The language ``to_lang`` names (an ISO 639-1 code or an English name); ``ValueError`` lists the others."""
    text = str(to_lang or "").strip().lower()
    name = LANGUAGES.get(text.split("-")[0].split("_")[0]) if text else None
    name = name or _LANGUAGE_NAMES.get(text)
    if name is None:
        raise ValueError(f"to_lang must name a language, e.g. 'es' or 'Spanish', got {to_lang!r}; "
                         f"the languages are {', '.join(sorted(k for k in LANGUAGES if k != 'cn'))} (or their English names)")
    return name


def _translate(content: str, to_lang: str):
    return (f"Translate the text to {language_name(to_lang)}. Reply with the translation only.\n\nText: {content}", None,
            {**CHAT_PARAMS, "max_tokens": 512})


def _mask(content: str, labels: list[str]):
    if not labels:
        raise ValueError("labels must be a non-empty ARRAY<STRING>")
    return (f"Rewrite the text with every {', '.join(labels)} replaced by [MASKED]. Reply with the rewritten text only.\n\n"
            f"Text: {content}", None, {**CHAT_PARAMS, "max_tokens": 512})


TASKS: dict[str, TaskFunction] = {
    "ai_analyze_sentiment": TaskFunction("ai_analyze_sentiment", (), (), "local-chat", "STRING", _sentiment, _read_sentiment),
    # options (v1: version '1.0' only; the v2 forms are in _tasks_v2)
    "ai_classify": TaskFunction("ai_classify", ("labels", "options"), (None, None), "local-chat", "STRING", _classify,
                                lambda text, content, labels, options=None: _pick_label(text, labels)),
    "ai_extract": TaskFunction("ai_extract", ("labels", "options"), (None, None), "local-chat", "STRING", _extract, _read_extract),
    "ai_fix_grammar": TaskFunction("ai_fix_grammar", (), (), "local-chat", "STRING",
                                   lambda c: (f"Correct the grammar and spelling of the text. Reply with the corrected text only.\n\nText: {c}",
                                              None, {**CHAT_PARAMS, "max_tokens": 512}),
                                   lambda text, content: _clean(text)),
    "ai_gen": TaskFunction("ai_gen", (), (), "local-chat", "STRING",
                           lambda c: (c, None, {**CHAT_PARAMS, "max_tokens": 512}), lambda text, content: text),
    "ai_mask": TaskFunction("ai_mask", ("labels",), (None,), "local-chat", "STRING", _mask, lambda text, content, labels: _clean(text)),
    "ai_summarize": TaskFunction("ai_summarize", ("max_words",), (None,), "local-chat", "STRING", _summarize, _read_summary),
    "ai_translate": TaskFunction("ai_translate", ("to_lang",), (None,), "local-chat", "STRING", _translate,
                                 lambda text, content, to_lang: _clean(text)),
    "ai_similarity": TaskFunction("ai_similarity", ("expr2",), (None,), "local-embed", "FLOAT", None, None),
}


def error_value(message: str) -> str:
    """A v2 task function's failed row: ``{"response": null, "error_message": ...}`` as JSON text."""
    return json.dumps({"response": None, "error_message": message})


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    norm = math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
    return 0.0 if norm == 0 else dot / norm


def evaluate_task(
    task: TaskFunction, endpoint: str, registry: EndpointRegistry, columns: list[list[Any]],
    quota_broker: tuple[str, int] | None, quota_share: float, progress_address: tuple[str, int] | None,
) -> list[Any]:
    """One Arrow batch of a task function; a failing row fails the query naming the function and row."""
    client = shared_client(registry, quota_broker, quota_share)
    n = len(columns[0])
    if task.name == "ai_similarity":
        a, b = columns[0], columns[1]
        texts = [t for pair in zip(a, b) for t in pair]
        results = start_task_rows(client, progress_address, [endpoint] * len(texts), texts, [None] * len(texts), [None] * len(texts)).wait()
        out: list[Any] = []
        for i in range(n):
            ra, rb = results[2 * i], results[2 * i + 1]
            if a[i] is None or b[i] is None:
                out.append(None)
                continue
            for r in (ra, rb):
                if not r.ok:
                    raise AIQueryRowException(f"ai_similarity via {endpoint!r} failed for row {i} of the batch: {r.error}")
            out.append(max(0.0, min(1.0, _cosine(ra.value, rb.value))))
        return out

    prompts, formats, params, skip = [], [], [], []
    for i in range(n):
        args = [col[i] for col in columns]
        if args[0] is None:
            skip.append(True)
            prompts.append(None), formats.append(None), params.append(None)
            continue
        try:
            prompt, fmt, p = task.prompt(*args)  # type: ignore[misc]
        except (ValueError, TypeError) as exc:
            if task.errors_as_data:
                skip.append(f"bad arguments: {exc}")
                prompts.append(None), formats.append(None), params.append(None)
                continue
            raise AIQueryRowException(f"{task.name}: bad arguments in row {i} of the batch: {exc}", "AI_QUERY_INVALID_ARGUMENT") from None
        skip.append(False)
        prompts.append(prompt), formats.append(fmt), params.append(p)
    endpoints = [None if s else endpoint for s in skip]  # a row not asked is not sent
    results = start_task_rows(client, progress_address, endpoints, prompts, params, formats).wait()
    out = []
    for i, result in enumerate(results):
        if skip[i]:
            out.append(error_value(skip[i]) if isinstance(skip[i], str) else None)
            continue
        if not result.ok:
            if task.errors_as_data:
                out.append(error_value(str(result.error)))
                continue
            raise AIQueryRowException(f"{task.name} via {endpoint!r} failed for row {i} of the batch: {result.error}")
        try:
            out.append(task.read(result.value, *[col[i] for col in columns]))  # type: ignore[misc]
        except (ValueError, TypeError) as exc:
            if task.errors_as_data:
                out.append(error_value(f"could not read the answer: {exc}"))
                continue
            raise AIQueryRowException(f"{task.name} via {endpoint!r}: could not read the answer for row {i}: {exc}",
                                      "AI_FUNCTION_HTTP_PARSE_CAST_ERROR") from None
    return out


def build_task_udf(task: TaskFunction, endpoint: str, registry: EndpointRegistry, quota_broker: tuple[str, int] | None,
                   quota_share: float, progress_address: tuple[str, int] | None, return_type: Any = None):
    """An ``arrow_udf`` for ``task`` with its SQL argument names (so named arguments work)."""
    from pyspark.sql.functions import arrow_udf
    from pyspark.sql.types import FloatType, StringType

    rtype = return_type or (FloatType() if task.return_type == "FLOAT" else StringType())
    arrow_type = pa.float32() if task.return_type == "FLOAT" else pa.string()
    first = "expr1" if task.name == "ai_similarity" else ("prompt" if task.name == "ai_gen" else "content")

    def run(*arrays: pa.Array | None) -> pa.Array:
        n = len(arrays[0])  # type: ignore[arg-type]
        columns = []
        for name, a, d in zip((first, *task.args), arrays, (None, *task.defaults)):
            values, bad_text = decode_column(a) if a is not None else ([d] * n, {})
            for i, why in bad_text.items():  # a task function has no failOnError: the row fails the query
                raise AIQueryRowException(f"{task.name} failed for row {i} of the batch: its {name} argument: {why}",
                                          "AI_QUERY_INVALID_ARGUMENT")
            columns.append(values)
        values = evaluate_task(task, endpoint, registry, columns, quota_broker, quota_share, progress_address)
        if return_type is not None:  # ai_extract with literal labels: a typed struct
            from ._types import arrow_type as arrow_type_of, convert

            values = [None if v is None else convert(v, return_type) for v in values]
            return pa.array(values, type=arrow_type_of(return_type))
        return pa.array(values, type=arrow_type)

    # Spark reads the argument names (for named arguments) and the arrow type hints from the signature.
    params = ", ".join(f"{name}: pa.Array = None" for name in task.args)
    source = f"def {task.name}({first}: pa.Array{', ' + params if params else ''}) -> pa.Array:\n" \
             f"    return run({first}{''.join(', ' + n for n in task.args)})\n"
    namespace: dict[str, Any] = {"pa": pa, "run": run, "__name__": "spark_udfs_generated"}  # pickled by value
    exec(source, namespace)  # noqa: S102 - a generated signature, no user input
    return arrow_udf(namespace[task.name], returnType=rtype).asNondeterministic()


def extract_struct_type(labels: list[str]):
    from pyspark.sql.types import StringType, StructField, StructType

    return StructType([StructField(label, StringType()) for label in labels])


def configured_endpoints(overrides: Mapping[str, str] | None) -> dict[str, str]:
    out = {name: task.default_endpoint for name, task in TASKS.items()}
    for name, endpoint in (overrides or {}).items():
        if name not in TASKS:
            raise ValueError(f"task_endpoints: unknown function {name!r}; the functions are {', '.join(sorted(TASKS))}")
        out[name] = endpoint
    return out

