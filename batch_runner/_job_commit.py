"""What a chunk writes, each table once: its usage and payload rows, then its output rows.

Every commit carries the app transaction (the job's id, the chunk's version) through the one
Delta committer (``ai_query.sinks``), so a commit that landed before a kill is skipped by the
re-run. The output and the usage table are two Delta tables, so no single commit covers both;
the pair is made exactly once by its order and by what a resumed run does:

1. **usage first** (and payloads), with transaction (job, v); **output second**, with (job, v).
   A usage commit that fails (an unwritable table, a full disk) leaves the output untouched:
   the chunk's keys stay pending, nothing disagrees, and the answers are in the journal.
2. A kill (or a failed output commit) between the two leaves usage rows for chunk ``v`` and no
   output rows. Chunk versions continue after the highest version of **any** of the job's
   tables (:func:`next_chunk_version`), so the orphan version is never reused and no later
   chunk's usage is skipped as "already committed".
3. The orphan chunk's keys are still pending: the re-run answers them from the killed run's
   journal (nothing is sent again), and :class:`ReplayedAnswers` sees their request ids in the
   usage table already, so they are written to the output as zero-token copies and get no
   second usage row.

So every paid request has exactly one usage row and every key one output row, whatever fails
between them; only the moment differs at which both tables agree (at the latest, the end of the
next run). Runs of an earlier order (output first) staged usage rows as parquet in the job's
state directory; ``UsageStaging.recover`` commits what such a run left.
"""

from __future__ import annotations

import contextvars
import getpass
import json
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ai_query.batch import CallResult, read_entries
from ai_query import storage
from ai_query.sinks import (
    INFERENCE_SCHEMA,
    USAGE_SCHEMA,
    AppTransaction,
    CommitResult,
    DeltaAppender,
    DeltaCommitter,
    inference_record,
    usage_record,
)
from spark_udfs import AUDIT_COLUMNS

from ._spec import JobSpec

# --------------------------------------------------------------------------------------------
# usage rows from a chunk's output


def _call_result(row: dict[str, Any], response_column: str) -> CallResult:
    return CallResult(
        index=0, endpoint=row["aiq_endpoint"], status=row["aiq_status"], value=row.get(response_column),
        error=row.get("aiq_error"), model=row.get("aiq_model"), prompt_tokens=row["aiq_prompt_tokens"] or 0,
        completion_tokens=row["aiq_completion_tokens"] or 0, total_tokens=row["aiq_total_tokens"] or 0,
        usage_estimated=bool(row.get("aiq_usage_estimated")), cost_usd=row.get("aiq_cost_usd"),
        latency_ms=row.get("aiq_latency_ms") or 0.0, attempts=row.get("aiq_attempts") or 0,
        request_id=row.get("aiq_request_id"), completed_at=row.get("aiq_completed_at") or datetime.now(timezone.utc),
        status_code=row.get("aiq_status_code"),
    )


def usage_rows(spec: JobSpec, result: pa.Table, requests: dict[Any, str], response_column: str, run_id: str,
               version: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(usage rows, payload rows) of a chunk: one per request sent (in-batch duplicates sent none)."""
    requester = _requester()
    usage, payloads = [], []
    names = list(spec.key)
    for row in result.to_pylist():
        if not row.get("aiq_attempts"):
            continue  # a copy of an identical request in the batch, or a NULL endpoint: nothing was sent
        key = tuple(row[k] for k in names)
        key_text = json.dumps(key[0] if len(key) == 1 else list(key), default=str)
        res = _call_result(row, response_column)
        request = requests.get(key)
        context = {"job": spec.name, "run": run_id, "chunk": str(version), "key": key_text}
        client_id = f"{spec.name}/{key_text}"
        usage.append(usage_record(res, request=request, requester=requester, source=f"batch:{spec.name}",
                                  client_request_id=client_id, usage_context=context))
        if spec.inference_path:
            payloads.append(inference_record(res, request, max_payload_bytes=spec.max_payload_bytes,
                                             source=f"batch:{spec.name}", client_request_id=client_id))
    return usage, payloads


def _requester() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        return ""


# --------------------------------------------------------------------------------------------
# commits: one app transaction (the job's id, the chunk's version) in every table a chunk writes


def chunk_transaction(spec: JobSpec, version: int) -> AppTransaction:
    return AppTransaction(spec.job_id, version)


def landed_version(spec: JobSpec) -> int | None:
    """The last chunk version the output table committed (``None``: none yet)."""
    return DeltaCommitter(spec.output_path).committed_version(spec.job_id)


def next_chunk_version(spec: JobSpec) -> int:
    """Chunk versions count from 1, after the last one any of the job's tables committed.

    The usage table is committed first, so it may hold a version whose output never landed
    (a kill between the two commits): the next chunk takes the version after it.
    """
    paths = [spec.output_path, spec.usage_table, *([spec.inference_path] if spec.inference_path else [])]

    def committed(path: str) -> int | None:
        return DeltaCommitter(path).committed_version(spec.job_id)

    # the tables at once (on an object store each is a LIST and GETs); each thread in a copy of this
    # context, which keeps the run's Delta handles (storage.reuse_delta_tables) for its commits
    with ThreadPoolExecutor(len(paths), thread_name_prefix="aiq-versions") as pool:
        futures = [pool.submit(contextvars.copy_context().run, committed, p) for p in paths]
    versions = [v for v in (f.result() for f in futures) if v is not None]
    return max(versions) + 1 if versions else 1


def commit_output(spec: JobSpec, table: pa.Table, version: int, *, fresh: bool = False) -> CommitResult:
    """Write a chunk to the output (merge by key, or append) with app transaction (job, version).

    ``fresh``: ``version`` was taken by this run after every version the job's tables held
    (:func:`next_chunk_version`), so no table can hold it yet and the check before the commit (a
    read of the table's new commits: on an object store a LIST and a GET or more per commit) is
    skipped. A run is its job's one writer; a commit racing another writer's commit of the same
    transaction is refused by delta-rs's conflict check (an app transaction of the same id)."""
    committer = DeltaCommitter(spec.output_path)
    # an output written by an earlier version gains the audit columns added since (aiq_status_code, aiq_batch_id)
    if spec.output_mode == "merge":
        return committer.merge(table, spec.key, chunk_transaction(spec, version), check_committed=not fresh,
                               add_columns=AUDIT_COLUMNS)
    return committer.append(table, chunk_transaction(spec, version), check_committed=not fresh, add_columns=AUDIT_COLUMNS)


class UsageStaging:
    """A chunk's usage and payload rows, committed before its output; and what older runs staged.

    ``commit_rows`` appends a chunk's rows to the usage and payload tables, each with the chunk's
    app transaction (see the module docstring for the order). Runs of the earlier order (output
    first) staged these rows as parquet in the job's state directory before committing them;
    ``recover`` handles what such a run left when killed: staged rows of a chunk whose output
    landed are committed, each once (app transaction per table); the others are dropped (their
    usage either landed already or their answers are still in the journal and will be written with
    the output). The current order needs no staged copy: a kill before the usage commit leaves
    the chunk pending with its answers in the journal, a kill after it is the orphan version above.
    """

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        self.dir = storage.join(spec.state_path, "staged")

    def _path(self, version: int, kind: str) -> str:
        return storage.join(self.dir, f"v{version:08d}-{kind}.parquet")

    def commit_rows(self, version: int, usage: list[dict[str, Any]], payloads: list[dict[str, Any]], *,
                    fresh: bool = False) -> None:
        """Append chunk ``version``'s usage rows, then its payload rows, each table at most once
        (``fresh``: a version this run took, see :func:`commit_output`)."""
        for path, rows, schema in ((self.spec.usage_table, usage, USAGE_SCHEMA),
                                   (self.spec.inference_path, payloads, INFERENCE_SCHEMA)):
            if path is not None:
                DeltaAppender(path, schema).append(rows, txn=chunk_transaction(self.spec, version), check_committed=not fresh)

    def commit(self, version: int) -> None:
        """Commit what an earlier run staged for chunk ``version`` (each table once), then remove it."""
        import pyarrow.parquet as pq

        for kind, path, schema in (("usage", self.spec.usage_table, USAGE_SCHEMA),
                                   ("inference", self.spec.inference_path, INFERENCE_SCHEMA)):
            staged = self._path(version, kind)
            if path is None or not storage.exists(staged):
                continue
            rows = pq.read_table(pa.BufferReader(storage.read_bytes(staged))).to_pylist()
            DeltaAppender(path, schema).append(rows, txn=chunk_transaction(self.spec, version))
            storage.remove(staged)

    def recover(self) -> int:
        """Commit what a killed run staged for chunks whose output landed; drop the rest. Returns chunks recovered."""
        names = storage.list_dir(self.dir, dirs=False)
        if not names:
            return 0
        landed = landed_version(self.spec)
        recovered = set()
        for staged in names:
            base = storage.name(staged)
            if not (base.startswith("v") and base.endswith(".parquet")):
                if ".tmp-" in base:  # left by a kill inside an earlier local write
                    storage.remove(staged)
                continue
            version = int(base[1:9])
            if landed is not None and version <= landed:
                self.commit(version)
                recovered.add(version)
            else:
                storage.remove(staged)
        return len(recovered)


class ReplayedAnswers:
    """Journaled answers of earlier runs, so that each one is billed in the usage table once.

    The journal is keyed by request content: two pending rows with the same request both get
    the one journaled answer. The first use carries its tokens; later uses (in this run, or
    already in the usage table from an earlier one) become copies with zero tokens, as
    identical requests inside one batch do.
    """

    _ZEROED = {"aiq_prompt_tokens": 0, "aiq_completion_tokens": 0, "aiq_total_tokens": 0, "aiq_attempts": 0}

    def __init__(self, spec: JobSpec, journal_dirs: list[str]) -> None:
        self.ids: set[str] = set()
        for directory in journal_dirs:
            for path in storage.list_dir(directory, suffix=".jsonl", dirs=False):
                self.ids.update(e["result"].get("request_id") for e in read_entries(path).values())
        self.ids.discard(None)  # type: ignore[arg-type]
        self.billed: set[str] = set()
        if self.ids:
            usage = DeltaAppender(spec.usage_table).read()
            if usage.num_rows:
                self.billed = self.ids & set(usage.column("databricks_request_id").to_pylist())

    def zero_repeats(self, result: pa.Table) -> pa.Table:
        if not self.ids:
            return result
        repeat = []
        for rid in result.column("aiq_request_id").to_pylist():
            again = rid in self.ids and rid in self.billed
            if rid in self.ids:
                self.billed.add(rid)
            repeat.append(again)
        if not any(repeat):
            return result
        mask = pa.array(repeat)
        for name, zero in {**self._ZEROED, "aiq_cost_usd": 0.0}.items():
            i = result.column_names.index(name)
            column = result.column(i)
            result = result.set_column(i, result.field(i), pc.if_else(mask, pa.scalar(zero, column.type), column))
        return result


__all__ = ["ReplayedAnswers", "UsageStaging", "chunk_transaction", "commit_output", "landed_version", "next_chunk_version",
           "usage_rows"]
