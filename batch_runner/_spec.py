"""Job specs: a TOML file that says what to read, what to ask, and where to write.

    name = "reviews-sentiment"
    endpoints = "endpoints.json"            # optional, added to the built-in endpoints
    key = ["review_id"]                     # optional: the columns that identify a row
    query = \"\"\"
    SELECT review_id, review,
           ai_query('local-chat', CONCAT('Sentiment of: ', review)) AS sentiment
    FROM reviews
    \"\"\"

    [sources]                               # temp views the query reads: name = Delta path
    reviews = "data/reviews"

    [input]                                 # optional: the rows to process, when not one source
    view = "reviews"                        # the view holding the key (default: the only source)
    sql = "SELECT ... FROM a JOIN b ..."    # optional: define `view` as SQL over the sources

    [output]
    path = "data/reviews_sentiment"         # a Delta table
    mode = "merge"                          # merge (by key) | append | overwrite
    usage_path = "data/endpoint_usage"      # default <path>.aiq/endpoint_usage
    inference_path = "data/payloads"        # optional payload table
    max_payload_bytes = 65536               # cut request/response payloads at this size

    [options]
    allowed_failure_rate = 0.0              # above it the run exits with code 3
    master = "local[2]"                     # Spark master (the CLI's --master wins)
    max_rows = 10000                        # at most this many rows per run
    chunk_rows = 500                        # rows per Delta commit
    max_concurrency = 16                    # per endpoint, or a table {endpoint = N}
    max_cost_usd = 5.0                      # stop the run once it has spent this much
    max_tokens = 2000000                    # ... or used this many tokens
    pilot_rows = 20                         # rows `plan` sends to measure real usage

    schedule = "0 2 * * *"                  # cron: minute hour day-of-month month day-of-week

    [storage_options]                       # optional: object storage options for every s3:// ... path
    AWS_ACCESS_KEY_ID = "{{secrets/s3/key_id}}"     # credentials: secret references only
    AWS_SECRET_ACCESS_KEY = "{{secrets/s3/secret}}"
    AWS_ENDPOINT_URL = "https://minio.internal:9000"
    [storage_options."s3://raw-bucket"]     # ... and over them, for the paths under a prefix
    AWS_ACCESS_KEY_ID = "{{secrets/raw/key_id}}"

    [batch_api]                             # optional: pending rows go as provider batches (half price)
    completion_window = "24h"               # the provider's window (OpenAI: 24h)
    deadline = "6h"                         # rows not answered by then (minus online time) go online

    [mlflow]                                # optional: each run's counters to an MLflow run
    experiment = "nightly-jobs"             # default: MLFLOW_EXPERIMENT_NAME, else MLflow's default
    run_id = "..."                          # log into this existing run instead of a new one

Instead of ``query``, a ``[prompt]`` table builds it from a template over the input's columns::

    [prompt]
    endpoint = "local-chat"
    template = "Sentiment of this review: {review}"   # {column}; {{ and }} for braces
    column = "sentiment"                               # the answer column (default "response")
    max_tokens = 8                                     # model parameters: max_tokens, temperature, ...

With ``key`` and mode ``merge`` or ``append`` a run is incremental: only rows whose key is not in
the output yet (and, with ``--retry-failed``, rows that failed) are sent, in chunks, each chunk
one Delta commit with an app-transaction id, so a killed run resumes where it stopped.
Relative paths are relative to the spec file. Errors name the key and the fix.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, get_args

from msgspec import Meta

from ai_query import ConfigError
from ai_query._storage_options import parse_section
from ai_query.config import ConfigStruct, building, duration_s

_VIEW = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_NAME_TEXT = "a short identifier (letters, digits, '_', '-', '.')"
Mode = Literal["overwrite", "append", "merge"]
MODES: tuple[str, ...] = get_args(Mode)
_OPTIONS = ("allowed_failure_rate", "chunk_rows", "master", "max_concurrency", "max_cost_usd", "max_rows", "max_tokens", "pilot_rows")
_MODEL_PARAMETERS = ("max_tokens", "temperature", "top_p", "top_k", "stop", "n", "presence_penalty", "frequency_penalty")
_WHOLE = Annotated[int, Meta(ge=1, description="a whole number >= 1")]
# where a field lives in the TOML file: messages name it as the user wrote it
_TOML_KEYS = {
    "output_path": "output.path", "output_mode": "output.mode", "usage_path": "output.usage_path",
    "inference_path": "output.inference_path", "max_payload_bytes": "output.max_payload_bytes",
    "state_dir": "output.state_dir", "input_view": "input.view", "input_sql": "input.sql",
    **{option: f"options.{option}" for option in _OPTIONS},
}


class JobSpec(ConfigStruct):
    """A batch job, checked when built (from a TOML file by ``load``, or directly)."""

    name: Annotated[str, Meta(pattern=_NAME.pattern, description=_NAME_TEXT)]
    query: str
    sources: dict[str, str]
    output_path: str
    output_mode: Mode = "overwrite"
    key: tuple[str, ...] = ()
    endpoints: str | None = None
    allowed_failure_rate: Annotated[float, Meta(ge=0, le=1, description="a number between 0 and 1")] = 0.0
    master: Annotated[str, Meta(description="a Spark master URL string")] | None = None
    source_file: str | None = None
    input_view: str | None = None
    input_sql: str | None = None
    usage_path: str | None = None
    inference_path: str | None = None
    max_payload_bytes: Annotated[int, Meta(ge=1, description="a whole number of bytes >= 1")] = 65536
    state_dir: str | None = None
    max_rows: _WHOLE | None = None
    chunk_rows: _WHOLE = 500
    max_concurrency: Annotated[
        dict[str, int] | int | None, Meta(description="a whole number >= 1 (every endpoint) or a table {endpoint = N}")
    ] = None
    max_cost_usd: Annotated[float, Meta(gt=0, description="a positive number of dollars, e.g. 5.0")] | None = None
    max_tokens: _WHOLE | None = None
    pilot_rows: Annotated[int, Meta(ge=0, description="a whole number >= 0")] = 20
    schedule: str | None = None
    prompt: dict[str, Any] | None = None
    batch_api: dict[str, Any] | None = None
    """``[batch_api]`` (see ``batch_api_options``): send pending rows as provider batches."""
    storage_options: dict[str, dict[str, str]] | None = None
    """``[storage_options]`` as ``{"": job-wide, "<uri prefix>": options}`` (see ``ai_query._storage_options``)."""
    mlflow: dict[str, str] | None = None
    """``[mlflow]`` (``experiment``, ``run_id``, ``tracking_uri``): push each run's counters to MLflow."""

    @classmethod
    def _field_path(cls, path: str, name: str) -> str:
        return f"{path}: {_TOML_KEYS.get(name, name)}"

    def _check(self, path: str) -> None:
        def fail(key: str, message: str) -> ConfigError:
            return ConfigError(f"{path}: {key} {message}")

        if not self.sources:
            raise fail("[sources]", "must name at least one Delta table the query reads, e.g. [sources] reviews = \"data/reviews\"")
        caps = self.max_concurrency
        if isinstance(caps, int) and caps < 1:
            raise fail("options.max_concurrency", f"must be a whole number >= 1 (every endpoint) or a table {{endpoint = N}}, got {caps!r}")
        for ep, cap in (caps.items() if isinstance(caps, dict) else ()):
            if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
                raise fail(f"options.max_concurrency.{ep}", f"must be a whole number >= 1, got {cap!r}")
        if self.output_mode == "merge" and not self.key:
            raise fail("output.mode", "'merge' merges by key: add key = [\"<column>\", ...] naming the columns that identify a row")
        if self.key and self.output_mode != "overwrite" and self.input_view is None and len(self.sources) > 1:
            raise fail("[input]", f"is needed with several sources ({', '.join(self.sources)}): add [input] view = \"<the source holding the key>\" "
                       "(or sql = \"SELECT ...\" to build the input rows)")

    @property
    def incremental(self) -> bool:
        """Chunked, resumable runs that skip done keys (``key`` set, mode merge or append)."""
        return bool(self.key) and self.output_mode in ("merge", "append")

    @property
    def driving_view(self) -> str:
        """The view whose rows the job processes (the one the key filter applies to)."""
        return self.input_view or next(iter(self.sources))

    @property
    def job_id(self) -> str:
        """The Delta app-transaction id of this job's commits."""
        return f"ai-query:{self.name}"

    @property
    def state_path(self) -> str:
        """Where the job keeps its response journal, staged usage rows and run log."""
        return self.state_dir or self.output_path + ".aiq"

    @property
    def usage_table(self) -> str:
        return self.usage_path or self.state_path + "/endpoint_usage"

    def storage_entries(self) -> dict[str, dict[str, str]]:
        """``[storage_options]`` as one entry per object storage path of the job (what ``install`` takes)."""
        from ai_query._storage_options import expand

        if not self.storage_options:
            return {}
        paths = [*self.sources.values(), self.output_path, self.state_path, self.usage_table, self.inference_path or ""]
        return expand(self.storage_options, paths)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base_dir: Path, source_file: str | None = None) -> "JobSpec":
        where = source_file or "job spec"

        def fail(key: str, message: str) -> ConfigError:
            return ConfigError(f"{where}: {key} {message}")

        allowed_top = {"name", "query", "prompt", "sources", "input", "output", "options", "key", "endpoints", "schedule", "batch_api",
                       "mlflow", "storage_options"}
        unknown = sorted(set(data) - allowed_top)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed are {', '.join(sorted(allowed_top))}")
        name = data.get("name")  # first: a job is named in every later message and state file
        if not isinstance(name, str) or not _NAME.match(name):
            raise fail("name", f"must be {_NAME_TEXT}, got {name!r}")
        query = data.get("query")
        prompt = data.get("prompt")
        if query is not None and prompt is not None:
            raise fail("query", "and [prompt] are both given; keep one: a SQL SELECT, or a prompt template")
        if prompt is not None:
            prompt = _check_prompt(prompt, fail)
        elif not isinstance(query, str) or "select" not in query.lower():
            raise fail("query", "must be a SQL SELECT statement (a TOML string, e.g. query = \"\"\"SELECT ...\"\"\"), "
                       "or give a [prompt] table with endpoint and template")

        def resolve(p: str) -> str:
            if re.match(r"^[a-z][a-z0-9+.-]*://", p):
                return p
            return str((base_dir / p).resolve())

        sources_raw = data.get("sources", {})
        if not isinstance(sources_raw, Mapping) or not sources_raw:
            raise fail("[sources]", "must name at least one Delta table the query reads, e.g. [sources] reviews = \"data/reviews\"")
        sources = {}
        for view, path in sources_raw.items():
            if not _VIEW.match(view):
                raise fail(f"sources.{view}", "is not a valid view name (letters, digits, '_')")
            if not isinstance(path, str) or not path:
                raise fail(f"sources.{view}", f"must be the path of a Delta table, got {path!r}")
            sources[view] = resolve(path)

        input_view, input_sql = None, None
        if "input" in data:
            raw_input = data["input"]
            if not isinstance(raw_input, Mapping):
                raise fail("[input]", "must be a table with view = \"name\" and optionally sql = \"SELECT ...\"")
            unknown = sorted(set(raw_input) - {"view", "sql"})
            if unknown:
                raise fail("[input]", f"has unknown key(s) {', '.join(unknown)}; allowed are sql, view")
            input_view = raw_input.get("view", "input" if "sql" in raw_input else None)
            input_sql = raw_input.get("sql")
            if not isinstance(input_view, str) or not _VIEW.match(input_view):
                raise fail("input.view", f"must name a view (letters, digits, '_'), got {input_view!r}")
            if input_sql is not None and (not isinstance(input_sql, str) or "select" not in input_sql.lower()):
                raise fail("input.sql", "must be a SQL SELECT over the [sources] views")
            if input_sql is None and input_view not in sources:
                raise fail("input.view", f"{input_view!r} is not one of [sources] ({', '.join(sources)}); add sql = \"SELECT ...\" to define it")
            if input_sql is not None and input_view in sources:
                raise fail("input.view", f"{input_view!r} is already a source; pick another name for the SQL input")

        output = data.get("output")
        if not isinstance(output, Mapping) or not isinstance(output.get("path"), str):
            raise fail("[output]", "needs path = \"<Delta table path>\"")
        output_keys = {"path", "mode", "usage_path", "inference_path", "max_payload_bytes", "state_dir"}
        unknown = sorted(set(output) - output_keys)
        if unknown:
            raise fail("[output]", f"has unknown key(s) {', '.join(unknown)}; allowed are {', '.join(sorted(output_keys))}")
        for name_ in ("usage_path", "inference_path", "state_dir"):
            if name_ in output and (not isinstance(output[name_], str) or not output[name_]):
                raise fail(f"output.{name_}", f"must be a path string, got {output[name_]!r}")

        key = data.get("key", [])
        if isinstance(key, str):
            key = [key]
        if not isinstance(key, list) or not all(isinstance(k, str) and k for k in key):
            raise fail("key", f"must be a column name or a list of column names, got {key!r}")

        options = data.get("options", {})
        if not isinstance(options, Mapping):
            raise fail("[options]", "must be a table")
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise fail("[options]", f"has unknown key(s) {', '.join(unknown)}; allowed are {', '.join(_OPTIONS)}")
        concurrency = options.get("max_concurrency")
        schedule = data.get("schedule")
        if schedule is not None:
            from ai_query import CronError

            from ._cron import Cron

            try:
                Cron.parse(schedule)
            except CronError as exc:
                raise fail("schedule", f"is not a valid cron expression: {exc}") from None
        endpoints = data.get("endpoints")
        if endpoints is not None and not isinstance(endpoints, str):
            raise fail("endpoints", f"must be the path of an endpoints JSON file, got {endpoints!r}")

        with building(where):
            return cls(
                name=data.get("name"),  # type: ignore[arg-type]
                query=query if prompt is None else _prompt_query(prompt, input_view or next(iter(sources))),
                sources=sources,
                output_path=resolve(output["path"]),
                output_mode=output.get("mode", "overwrite"),
                key=tuple(key),
                endpoints=resolve(endpoints) if endpoints else None,
                allowed_failure_rate=options.get("allowed_failure_rate", 0.0),
                master=options.get("master"),
                source_file=source_file,
                input_view=input_view,
                input_sql=input_sql,
                usage_path=resolve(output["usage_path"]) if "usage_path" in output else None,
                inference_path=resolve(output["inference_path"]) if "inference_path" in output else None,
                max_payload_bytes=output.get("max_payload_bytes", 65536),
                state_dir=resolve(output["state_dir"]) if "state_dir" in output else None,
                max_rows=options.get("max_rows"),
                chunk_rows=options.get("chunk_rows", 500),
                max_concurrency=dict(concurrency) if isinstance(concurrency, Mapping) else concurrency,
                max_cost_usd=options.get("max_cost_usd"),
                max_tokens=options.get("max_tokens"),
                pilot_rows=options.get("pilot_rows", 20),
                schedule=schedule,
                prompt=prompt,
                batch_api=batch_api_options(data["batch_api"], where) if "batch_api" in data else None,
                storage_options=parse_section(data["storage_options"], where) if "storage_options" in data else None,
                mlflow=_mlflow_options(data["mlflow"], where) if "mlflow" in data else None,
            )

    @classmethod
    def load(cls, path: str | Path) -> "JobSpec":
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read job spec {p}: {exc.strerror}; check the path") from exc
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"job spec {p} is not valid TOML: {exc}") from exc
        return cls.from_dict(data, p.resolve().parent, str(p))


def _mlflow_options(raw: Any, where: str) -> dict[str, str]:
    """``[mlflow]`` checked (``_mlflow.MlflowTarget.from_spec``), kept as the table it was."""
    from ._mlflow import MlflowTarget

    MlflowTarget.from_spec(raw, where)
    return dict(raw)


_BATCH_KEYS = ("completion_window", "deadline", "poll_s", "max_poll_s", "online_rows_per_s", "max_requests")


def batch_api_options(raw: Any, where: str = "job spec") -> dict[str, Any]:
    """``[batch_api]`` checked: ``completion_window``, ``deadline`` (-> ``deadline_s``), ``poll_s``,
    ``max_poll_s``, ``online_rows_per_s`` (the online rate deadline routing plans with), ``max_requests``
    (per batch, below the provider's limit)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: [batch_api] must be a table, e.g. [batch_api] deadline = \"6h\"")
    unknown = sorted(set(raw) - set(_BATCH_KEYS))
    if unknown:
        raise ConfigError(f"{where}: [batch_api] has unknown key(s) {', '.join(unknown)}; allowed are {', '.join(_BATCH_KEYS)}")
    out: dict[str, Any] = {"completion_window": raw.get("completion_window", "24h")}
    if not isinstance(out["completion_window"], str):
        raise ConfigError(f"{where}: batch_api.completion_window must be a string such as \"24h\", got {out['completion_window']!r}")
    if raw.get("deadline") is not None:
        out["deadline_s"] = duration_s(raw["deadline"], f"{where}: batch_api.deadline")
    for key in ("poll_s", "max_poll_s", "online_rows_per_s"):
        if key in raw:
            value = raw[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{where}: batch_api.{key} must be a positive number, got {value!r}")
            out[key] = float(value)
    if "max_requests" in raw:
        value = raw["max_requests"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}: batch_api.max_requests must be a whole number >= 1, got {value!r}")
        out["max_requests"] = value
    return out


_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


def template_parts(template: str) -> list[tuple[str, str]]:
    """A prompt template as ``[("text", ...), ("column", ...)]``; ``{{``/``}}`` are literal braces."""
    parts: list[tuple[str, str]] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(template):
        text = template[pos:m.start()]
        token = m.group(0)
        if token in ("{{", "}}"):
            text += token[0]
        elif token in ("{", "}"):
            raise ConfigError(f"prompt.template has a lone {token!r} at offset {m.start()}; write {token * 2} for a literal brace")
        if text:
            _add_text(parts, text)
        if m.group(1) is not None:
            column = m.group(1).strip()
            if not column:
                raise ConfigError("prompt.template has an empty {} placeholder; put a column name in it, e.g. {review}")
            parts.append(("column", column))
        pos = m.end()
    if template[pos:]:
        _add_text(parts, template[pos:])
    if not any(kind == "column" for kind, _ in parts):
        raise ConfigError("prompt.template uses no column; add a placeholder such as {review}")
    return parts


def _add_text(parts: list[tuple[str, str]], text: str) -> None:
    if parts and parts[-1][0] == "text":
        parts[-1] = ("text", parts[-1][1] + text)
    else:
        parts.append(("text", text))


def _sql_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _check_prompt(prompt: Any, fail: Any) -> dict[str, Any]:
    if not isinstance(prompt, Mapping):
        raise fail("[prompt]", "must be a table with endpoint = \"...\" and template = \"... {column} ...\"")
    allowed = {"endpoint", "template", "column", *_MODEL_PARAMETERS}
    unknown = sorted(set(prompt) - allowed)
    if unknown:
        raise fail("[prompt]", f"has unknown key(s) {', '.join(unknown)}; allowed are {', '.join(sorted(allowed))}")
    for key in ("endpoint", "template"):
        if not isinstance(prompt.get(key), str) or not prompt[key]:
            raise fail(f"prompt.{key}", f"must be a non-empty string, got {prompt.get(key)!r}")
    column = prompt.get("column", "response")
    if not isinstance(column, str) or not _VIEW.match(column):
        raise fail("prompt.column", f"must be a column name (letters, digits, '_'), got {column!r}")
    try:
        template_parts(prompt["template"])
    except ConfigError as exc:
        raise fail("prompt.template", str(exc).removeprefix("prompt.template ")) from None
    return dict(prompt, column=column)


def _prompt_query(prompt: Mapping[str, Any], view: str) -> str:
    """The SELECT a ``[prompt]`` table stands for: every input column plus the answer."""
    pieces = [_sql_string(v) if kind == "text" else f"CAST(`{v}` AS STRING)" for kind, v in template_parts(prompt["template"])]
    request = pieces[0] if len(pieces) == 1 else f"CONCAT({', '.join(pieces)})"
    params = []
    for key in _MODEL_PARAMETERS:
        if key in prompt:
            value = prompt[key]
            if isinstance(value, list):
                literal = "array(" + ", ".join(_sql_string(str(v)) for v in value) + ")"
            elif isinstance(value, str):
                literal = _sql_string(value)
            else:
                literal = repr(value)
            params.append(f"'{key}', {literal}")
    extra = f", modelParameters => named_struct({', '.join(params)})" if params else ""
    return f"SELECT *, ai_query({_sql_string(prompt['endpoint'])}, {request}{extra}) AS `{prompt['column']}` FROM `{view}`"
