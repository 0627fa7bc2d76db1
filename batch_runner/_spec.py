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

    [output]
    path = "data/reviews_sentiment"         # a Delta table
    mode = "overwrite"                      # overwrite | append

    [options]
    allowed_failure_rate = 0.0              # above it the run exits with code 3
    master = "local[2]"                     # Spark master (the CLI's --master wins)

Relative paths are relative to the spec file. Errors name the key and the fix.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ai_query import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_VIEW = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MODES = ("overwrite", "append")


@dataclass(frozen=True)
class JobSpec:
    name: str
    query: str
    sources: Mapping[str, str]
    output_path: str
    output_mode: str = "overwrite"
    key: tuple[str, ...] = ()
    endpoints: str | None = None
    allowed_failure_rate: float = 0.0
    master: str | None = None
    source_file: str | None = field(default=None, compare=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base_dir: Path, source_file: str | None = None) -> "JobSpec":
        where = source_file or "job spec"

        def fail(key: str, message: str) -> ConfigError:
            return ConfigError(f"{where}: {key} {message}")

        allowed_top = {"name", "query", "sources", "output", "options", "key", "endpoints"}
        unknown = sorted(set(data) - allowed_top)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed are {', '.join(sorted(allowed_top))}")
        name = data.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise fail("name", f"must be a short identifier (letters, digits, '_', '-', '.'), got {name!r}")
        query = data.get("query")
        if not isinstance(query, str) or "select" not in query.lower():
            raise fail("query", "must be a SQL SELECT statement (a TOML string, e.g. query = \"\"\"SELECT ...\"\"\")")

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

        output = data.get("output")
        if not isinstance(output, Mapping) or not isinstance(output.get("path"), str):
            raise fail("[output]", "needs path = \"<Delta table path>\"")
        unknown = sorted(set(output) - {"path", "mode"})
        if unknown:
            raise fail("[output]", f"has unknown key(s) {', '.join(unknown)}; allowed are mode, path")
        mode = output.get("mode", "overwrite")
        if mode not in MODES:
            raise fail("output.mode", f"is {mode!r}; use one of {', '.join(MODES)}")

        key = data.get("key", [])
        if isinstance(key, str):
            key = [key]
        if not isinstance(key, list) or not all(isinstance(k, str) and k for k in key):
            raise fail("key", f"must be a column name or a list of column names, got {key!r}")

        options = data.get("options", {})
        if not isinstance(options, Mapping):
            raise fail("[options]", "must be a table")
        unknown = sorted(set(options) - {"allowed_failure_rate", "master"})
        if unknown:
            raise fail("[options]", f"has unknown key(s) {', '.join(unknown)}; allowed are allowed_failure_rate, master")
        rate = options.get("allowed_failure_rate", 0.0)
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            raise fail("options.allowed_failure_rate", f"must be a number between 0 and 1, got {rate!r}")
        master = options.get("master")
        if master is not None and not isinstance(master, str):
            raise fail("options.master", f"must be a Spark master URL string, got {master!r}")
        endpoints = data.get("endpoints")
        if endpoints is not None and not isinstance(endpoints, str):
            raise fail("endpoints", f"must be the path of an endpoints JSON file, got {endpoints!r}")

        return cls(
            name=name,
            query=query,
            sources=sources,
            output_path=resolve(output["path"]),
            output_mode=mode,
            key=tuple(key),
            endpoints=resolve(endpoints) if endpoints else None,
            allowed_failure_rate=float(rate),
            master=master,
            source_file=source_file,
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
