"""A response journal: every successful answer is written to disk on the executor as it arrives.

A batch job commits its rows in chunks. When the job is killed in the middle of a chunk, the
answers that chunk already received were paid for but never committed; without a journal the
re-run would send (and pay for) them again. With one, each answer is appended to a journal file
the moment the client has it (before the row is used), and a re-run answers those requests
from the journal instead of the endpoint.

Layout (a directory every executor and the driver can reach, like the Delta tables)::

    <journal>/run-<id>/part-<host>-<pid>-<n>.jsonl     one file per Python worker process
    <journal>/run-<id>/tasks/<stage>.<partition>       created by a task's first attempt

A run *writes* under its own ``run-<id>`` and *replays* the directories of earlier runs. Lines
are keyed by ``RequestKey.digest`` (a hash of endpoint, request, parameters and response
format: the key dedup compares, so a journal and dedup never disagree on "the same request");
only ``ok`` answers are journaled (a failed request is not billed, and ``--retry-failed`` must
ask again). A line cut short by a kill is skipped. The driver deletes a run's directory once its
rows are committed.

Inside a run, a task writes through its ``TaskJournal``, which tags each line with the task
(``<stage>.<partition>`` in Spark). An attempt that finds the task's marker already there (a
retried or speculative attempt, or one of a retried stage, whose attempt numbers start at 0
again) reads the lines earlier attempts of the same task wrote in this run (any worker, any
host) and replays them before it sends anything, and catches up again before each later batch
(a speculative copy follows the attempt still running). Only lines of the same task: a line of
another task answers a row that task commits itself, and replaying it would put one answer in
two rows. A first attempt reads nothing of its own run (no cost on the common path).

Limits: the requests in flight at a kill (of the run, or of one Python worker whose task Spark
retries; at most that worker's share of ``max_concurrency``) are answered and billed by
the endpoint but never read, so they are sent again; the usage table holds the answers the job
received. A replayed answer is shared like a sent one: identical requests of later rows in
the same query and worker become copies (zero tokens), as they were in the killed run. Rows
that a re-run places in another worker than the killed run did (a different partitioning) may
replay an answer each, so the usage table then counts its tokens once per worker (more than the
endpoint billed, never fewer).
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import socket
import threading
import time
from dataclasses import asdict, fields
from datetime import datetime
from typing import Any, Iterable, Mapping, Sequence

from .. import storage
from .request import RequestKey
from .results import CallResult

JOURNAL_PROPERTY = "aiq.journal"
"""The Spark local property that carries a :class:`JournalConfig` as JSON to the tasks."""

TASKS_KEPT = 16
"""Task attempts whose ``TaskJournal`` (and its read position) a process keeps."""

_RESULT_FIELDS = tuple(f.name for f in fields(CallResult))
_counter = itertools.count()


def _line_key(key: RequestKey | str) -> str:
    return key if isinstance(key, str) else key.digest


def _encode(result: CallResult) -> dict[str, Any]:
    data = asdict(result)
    data["completed_at"] = result.completed_at.isoformat() if result.completed_at else None
    return data


def _decode(data: Mapping[str, Any]) -> CallResult:
    values = {k: data[k] for k in _RESULT_FIELDS if k in data}
    if values.get("completed_at"):
        values["completed_at"] = datetime.fromisoformat(values["completed_at"])
    return CallResult(**values)


class ResponseJournal:
    """Writes this process's answers under ``write_dir``; answers from ``replay_dirs`` on lookup."""

    def __init__(self, write_dir: str | None, replay_dirs: Iterable[str] = ()) -> None:
        self.write_dir = write_dir
        self.replay_dirs = tuple(replay_dirs)
        self._replay: dict[str, dict[str, Any]] | None = None
        self._lock = threading.Lock()
        self._file: Any = None
        self._remote: _RemoteWriter | None = None
        self._writer_lock = threading.Lock()
        self._tasks: dict[tuple[str, str], TaskJournal] = {}

    @classmethod
    def from_property(cls, value: str | None) -> "ResponseJournal | None":
        """The journal named by the ``aiq.journal`` local property (``None`` when unset)."""
        if not value:
            return None
        config = json.loads(value)
        return _cached(config.get("write"), tuple(config.get("replay", ())))

    @staticmethod
    def property_value(write_dir: str | None, replay_dirs: Iterable[str] = ()) -> str:
        return json.dumps({"write": write_dir, "replay": list(replay_dirs)})

    def _load(self) -> dict[str, dict[str, Any]]:
        if self._replay is None:
            entries: dict[str, dict[str, Any]] = {}
            for directory in self.replay_dirs:
                for path in storage.list_dir(directory, suffix=".jsonl", dirs=False):
                    entries.update(read_entries(path))
            self._replay = entries
        return self._replay

    def lookup(self, key: RequestKey | str) -> CallResult | None:
        """A journaled answer to the request with ``key`` (a key or its digest), or ``None``."""
        entry = self._load().get(_line_key(key)) if self.replay_dirs else None
        return _decode(entry["result"]) if entry is not None else None

    def catch_up(self) -> None:
        """Nothing to read: a run's own lines are replayed only through a retried ``TaskJournal``."""

    def record(self, key: RequestKey | str, result: CallResult, task: str | None = None) -> None:
        """Append an ``ok`` answer (flushed to the OS at once: a killed process keeps it)."""
        if self.write_dir is None or not result.ok:
            return
        entry = {"key": _line_key(key), "result": _encode(result)}
        if task is not None:
            entry["task"] = task
        line = json.dumps(entry, default=str) + "\n"
        if storage.is_remote(self.write_dir):  # no append on object stores: see _RemoteWriter
            self._remote_writer().add(line)
            return
        with self._lock:
            if self._file is None:
                os.makedirs(self.write_dir, exist_ok=True)
                name = f"part-{socket.gethostname()}-{os.getpid()}-{next(_counter)}.jsonl"
                self._file = open(os.path.join(self.write_dir, name), "a", encoding="utf-8")  # noqa: SIM115 - kept open
            self._file.write(line)
            self._file.flush()

    def flush(self) -> None:
        """Write the answers still queued (an object store's journal; a local file is flushed per line)."""
        if self._remote is not None:
            self._remote.flush()

    def for_task(self, task: str, attempt: str, retried: bool = False) -> "TaskJournal":
        """The journal of one attempt of ``task``; it replays earlier attempts' lines when ``retried``
        or when an earlier attempt of the task started in this run (a marker file under
        ``tasks/``: Spark numbers the attempts of a retried stage from 0 again)."""
        with self._lock:
            view = self._tasks.get((task, attempt))
            if view is None:
                while len(self._tasks) >= TASKS_KEPT:
                    self._tasks.pop(next(iter(self._tasks)))
                retried = not self._first_attempt(task) or retried
                view = self._tasks[(task, attempt)] = TaskJournal(self, task, retried)
            return view

    def _first_attempt(self, task: str) -> bool:
        if self.write_dir is None:
            return True
        marker = storage.join(self.write_dir, "tasks", task)
        if not storage.is_remote(self.write_dir):
            return storage.create_exclusive(marker)
        # on an object store the task asks (a HEAD) and goes on; its marker is put by the writer's
        # thread at once, and always before any line of the task (see _RemoteWriter)
        if storage.file_exists(marker):
            return False
        self._remote_writer().add_marker(marker)
        return True

    def _remote_writer(self) -> "_RemoteWriter":
        assert self.write_dir is not None
        with self._writer_lock:  # not self._lock: for_task holds it while it asks for the marker
            if self._remote is None:
                self._remote = _RemoteWriter(self.write_dir)
            return self._remote


REMOTE_FLUSH_S = 0.5
"""On an object store, the journal writes what is queued as one object at least this often."""
REMOTE_FLUSH_LINES = 1024
"""... or as soon as this many answers wait (an object's size, and the memory they hold)."""
REMOTE_IDLE_S = 5.0
"""The writer's thread ends after this long with nothing queued (a long-lived Python worker serves
many runs, each with a journal of its own); the next answer starts it again."""


class _RemoteWriter:
    """The journal of one process on an object store. Objects cannot be appended to, and one PUT
    per answer made on the client's event loop (where answers arrive) held every request up: a
    10,000-row job ran at 0.08x its local speed. Answers are queued here and a thread writes
    what is queued as one object (``part-<host>-<pid>-<n>.jsonl``) every ``REMOTE_FLUSH_S``
    (sooner when ``REMOTE_FLUSH_LINES`` wait), and a batch of rows writes what is queued before
    its rows go back to Spark (``PendingRows.wait``), so no answer of a committed chunk is written
    after the driver removed the run's journal.

    The interval is in time, not in answers, because that is what bounds both costs. A kill on
    an object store re-buys the answers still queued: those of the last ``REMOTE_FLUSH_S`` (plus
    one write), which at a model's latency (0.5 s and more) is no more than the requests in flight
    that any kill loses anyway. And a Python worker puts at most 1 / ``REMOTE_FLUSH_S`` objects a
    second however fast answers come: a count (an object per 64 answers) made a fast endpoint's
    workers put tens a second each, every request a round trip and CPU for the store (S3 allows
    3,500 PUTs a second per prefix, and bills each).

    A task's marker (``tasks/<stage>.<partition>``, see :meth:`ResponseJournal.for_task`) is queued
    here too and put at once by the thread, not by the task before it sends anything (on S3 a
    round trip at the start of every task). Every write puts the queued markers first, so no line
    of a task is in the store before its marker: an attempt that died before its marker landed
    journaled nothing, and the next attempt, finding no marker, has nothing to replay."""

    def __init__(self, write_dir: str) -> None:
        self.write_dir = write_dir
        self._lines: list[str] = []
        self._markers: list[str] = []
        self._lock = threading.Lock()
        self._writing = threading.Lock()  # one write at a time: a task's marker lands before its lines
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        atexit.register(self.flush)

    def add(self, line: str) -> None:
        with self._lock:
            self._lines.append(line)
            full = len(self._lines) >= REMOTE_FLUSH_LINES
            self._start()
        if full:
            self._wake.set()

    def add_marker(self, path: str) -> None:
        """Queue a task's marker; the thread puts it now."""
        with self._lock:
            self._markers.append(path)
            self._start()
        self._wake.set()

    def _start(self) -> None:
        if self._thread is None:  # under self._lock
            self._thread = threading.Thread(target=self._run, name="ai-query-journal", daemon=True)
            self._thread.start()

    def flush(self, markers_only: bool = False) -> int:
        """Put the queued markers, then the queued answers as one object (nothing when none waits);
        returns how many answers and markers were written."""
        with self._writing:
            with self._lock:
                markers, self._markers = self._markers, []
                lines = []
                if not markers_only:
                    lines, self._lines = self._lines, []
            done = 0
            try:
                for marker in markers:
                    storage.write_bytes(marker, b"")
                    done += 1
                if lines:
                    name = f"part-{socket.gethostname()}-{os.getpid()}-{next(_counter)}.jsonl"
                    storage.write_bytes(storage.join(self.write_dir, name), "".join(lines).encode())
            except BaseException as exc:
                with self._lock:  # kept for the next write (a marker whose put failed, and every line)
                    self._markers[:0] = markers[done:]
                    self._lines[:0] = lines
                if isinstance(exc, OSError):
                    raise OSError(f"the response journal could not write {len(lines)} answer(s) to {self.write_dir}: "
                                  f"{exc}; they stay queued and are written at the next try") from exc
                raise
            return len(lines) + len(markers)

    def _run(self) -> None:
        idle = 0.0
        due = time.monotonic() + REMOTE_FLUSH_S
        while True:
            self._wake.wait(max(due - time.monotonic(), 0.0))
            self._wake.clear()
            with self._lock:  # woken early for a marker (not for a full queue): the lines keep their interval
                early = time.monotonic() < due and len(self._lines) < REMOTE_FLUSH_LINES
            if not early:
                due = time.monotonic() + REMOTE_FLUSH_S
            try:
                wrote = self.flush(markers_only=early)
            except OSError:  # the store is unreachable for a moment: the lines wait for the next write
                wrote = 0
            with self._lock:
                if self._lines or self._markers or wrote:
                    idle = 0.0
                    continue
                idle += REMOTE_FLUSH_S
                if idle >= REMOTE_IDLE_S:  # nothing to write for a while: the thread ends, add() starts another
                    self._thread = None
                    return


class TaskJournal:
    """One task attempt's journal: its answers tagged with the task; a retried attempt also
    answers from what earlier attempts of the same task journaled in this run."""

    def __init__(self, journal: ResponseJournal, task: str, retried: bool) -> None:
        self.journal = journal
        self.task = task
        self._earlier: dict[str, dict[str, Any]] | None = {} if retried and journal.write_dir else None
        self._read: dict[str, int] = {}  # bytes of each file of this run already read
        self._lock = threading.Lock()

    def catch_up(self) -> None:
        """Read what this run's journal files gained since the last call (a retried attempt only)."""
        if self._earlier is None:
            return
        directory = self.journal.write_dir or ""
        with self._lock:
            for path in storage.list_dir(directory, suffix=".jsonl", dirs=False):
                start = self._read.get(path, 0)
                data = storage.read_bytes(path, start)
                complete = data.rfind(b"\n") + 1  # a line still being written (or cut by a kill) waits
                self._read[path] = start + complete
                for line in data[:complete].splitlines():
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        continue
                    if entry.get("task") == self.task:
                        self._earlier[entry["key"]] = entry

    def lookup(self, key: RequestKey | str) -> CallResult | None:
        found = self.journal.lookup(key)
        if found is None and self._earlier:
            entry = self._earlier.get(_line_key(key))
            found = _decode(entry["result"]) if entry is not None else None
        return found

    def record(self, key: RequestKey | str, result: CallResult) -> None:
        self.journal.record(key, result, self.task)

    def flush(self) -> None:
        self.journal.flush()


def read_entries(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The complete lines of one journal file, by key (a line cut short by a kill is skipped)."""
    out: dict[str, dict[str, Any]] = {}
    data = storage.read_bytes(os.fspath(path))
    for line in data[:data.rfind(b"\n") + 1].splitlines():  # past the last newline: cut by a kill
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        out[entry["key"]] = entry
    return out


def replay(journal: ResponseJournal | TaskJournal, rows: Sequence[int], keys: Mapping[int, RequestKey]
           ) -> tuple[list[CallResult], list[int]]:
    """Split ``rows`` into the answers ``journal`` holds (each placed at its row) and the rows to send."""
    answered: list[CallResult] = []
    to_send: list[int] = []
    if rows:
        journal.catch_up()
    for i in rows:
        result = journal.lookup(keys[i])
        if result is None:
            to_send.append(i)
        else:
            result.index = i
            answered.append(result)
    return answered, to_send


_JOURNALS: dict[tuple[str | None, tuple[str, ...]], ResponseJournal] = {}


def _cached(write_dir: str | None, replay_dirs: tuple[str, ...]) -> ResponseJournal:
    """One journal per process and configuration (Spark reuses Python workers across tasks)."""
    key = (write_dir, replay_dirs)
    journal = _JOURNALS.get(key)
    if journal is None:
        journal = _JOURNALS[key] = ResponseJournal(write_dir, replay_dirs)
    return journal


__all__ = ["JOURNAL_PROPERTY", "TASKS_KEPT", "ResponseJournal", "TaskJournal", "read_entries", "replay"]
