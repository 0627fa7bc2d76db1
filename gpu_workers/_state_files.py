"""Where local servers are recorded: ``<cache>/run/<key>.json`` state files, their locks and logs.

Spark's Python workers are separate processes from the driver, so a server is found through its
state file, written atomically (readers never see half a file). Starting one takes ``flock`` on
``<key>.lock``: concurrent callers start at most one server per key, the others wait and attach.
A server's log is ``logs/<key>.log`` (the previous start's kept as ``.log.1``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import re
import time
from collections.abc import Iterator
from typing import Any

from gpu_workers._errors import LocalServerError
from gpu_workers._models import cache_dir


def run_dir() -> pathlib.Path:
    """Where state files, locks and logs of local servers live: ``<cache>/run``."""
    return cache_dir() / "run"


def _state_path(key: str) -> pathlib.Path:
    return run_dir() / f"{key}.json"


def _read_json(path: pathlib.Path) -> Any:
    """The file's JSON, or None if it is missing or half written."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_state(key: str) -> dict[str, Any] | None:
    return _read_json(_state_path(key))


def _write_state(state: dict[str, Any]) -> None:
    path = _state_path(state["key"])
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)  # readers never see a half-written file


def _remove_state(key: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        _state_path(key).unlink()


@contextlib.contextmanager
def _locked(key: str, timeout: float, *, blocking: bool = True) -> Iterator[bool]:
    """``flock`` on the key's lock file; yields False (not raising) if non-blocking and busy."""
    path = run_dir() / f"{key}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not blocking:
                    yield False
                    return
                if time.monotonic() > deadline:
                    raise LocalServerError(
                        f"timed out after {timeout:.0f}s waiting for another process to finish starting the "
                        f"local server {key!r} (lock {path}); its log is {_log_path(key)}. Stop it with "
                        "`python -m gpu_workers stop` if it is stuck."
                    ) from None
                time.sleep(0.2)
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _log_path(key: str) -> pathlib.Path:
    return run_dir() / "logs" / f"{key}.log"


def _last_error_line(tail: str) -> str:
    """The line of a log tail most likely to name the cause (Python's final exception line)."""
    for line in reversed(tail.splitlines()):
        if re.search(r"(Error|Exception|error:)", line) and not line.lstrip().startswith("File "):
            return line.strip()[:500]
    return ""


def _log_tail(path: pathlib.Path | str, lines: int = 40) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64_000))
            text = fh.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])
