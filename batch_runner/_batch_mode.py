"""Batch-API mode for jobs (``[batch_api]``): a job's pending rows go out as provider batches at
the batch price; what the batches do not answer in time goes online.

**Through the journal, not beside it.** The batch phase runs before the chunks: it builds each
pending row's request exactly as the ``ai_query`` call would (the same request, parameters and
request key), sends the distinct requests as provider batches, and files every answer under the
row's request key in ``<state>/journal/batch-<batch id>/``, the directory layout the response
journal replays. The chunks then run as online jobs do: every row whose answer is journaled is
answered from it (nothing sent), the rest are sent online. So rows, audit columns, usage and
payload rows are made by one code path whichever way an answer came; a batch answer differs only
in ``aiq_cost_usd`` (the price table's batch rate), its request id (the provider's line id) and
``aiq_batch_id``.

**Exactly once, paid once.** Each batch is recorded in ``<state>/batches/<id>.json`` the moment the
provider has accepted it, with its lines' request keys; a killed job's next run polls the recorded
batches and submits only requests no recorded batch carries. Before each create, an intent
(``_intent-<token>.json``: the batch's lines) is written and the token sent as the batch's
metadata: a run killed between the create and the record leaves the intent, and the next run
finds the batch by its metadata (OpenAI; Message Batches carry none) and polls it. A batch's answers are journaled once
it has ended (then it is marked collected); a chunk commit is idempotent as in online jobs, so a
batch's results are committed once. The state is dropped when the job has no pending rows left.

**Deadline routing.** With ``deadline``, the poll loop stops waiting at ``deadline - reserve``,
where ``reserve`` is the time the rows still unanswered would take online (their count over
``online_rows_per_s``, or the rate of the job's last finished online run, else 5 rows/s); the
deadline counts from the run that submitted the open batches (a resumed run keeps it); it cancels the open batches,
journals the lines they finished, and the chunks send the rest online. Lines a batch failed
(an error line) are not journaled either: only they are retried, online.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

import spark_udfs
from ai_query import get_logger
from ai_query import ConfigError
from ai_query import storage
from ai_query.backends import BatchLine, ProviderBatches
from ai_query.batch import ResponseJournal, prompt_text_of, request_key
from ai_query.batch import read_entries
from ai_query.batch.provider_batches import DEFAULT_ONLINE_ROWS_PER_S, batch_client, batch_result, poll_until_ended

from ._job_input import _INPUT_ALIAS, rows_of_keys
from ._job_state import read_runs
from ._spec import JobSpec

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = get_logger("batch_runner")
_STRUCT = "__aiq_batch_request"
_INTENT = "_intent-"
_INTENT_KEY = "aiq_intent"


@dataclass
class BatchPhase:
    """What the batch phase did, for the run report."""

    submitted: int = 0
    resumed: int = 0
    lines: int = 0
    answered: int = 0
    failed_lines: int = 0
    cancelled: int = 0
    batch_ids: list[str] = field(default_factory=list)


def _state_dir(spec: JobSpec) -> str:
    return storage.join(spec.state_path, "batches")


def _load_state(spec: JobSpec) -> dict[str, Any]:
    """``{"batches": {id: record}, "deadline_at": ...}`` from one file per batch (a save rewrites one batch only)."""
    root = _state_dir(spec)
    state: dict[str, Any] = {"batches": {}}
    state["intents"] = {}
    for path in storage.list_dir(root, suffix=".json", dirs=False):
        if storage.name(path) == "_deadline.json":
            state["deadline_at"] = json.loads(storage.read_bytes(path))["deadline_at"]
        elif storage.name(path).startswith(_INTENT):
            state["intents"][storage.name(path).removeprefix(_INTENT).removesuffix(".json")] = json.loads(storage.read_bytes(path))
        else:
            state["batches"][storage.name(path).removesuffix(".json")] = json.loads(storage.read_bytes(path))
    return state


def _write(path: str, data: Any) -> None:
    storage.write_bytes(path, json.dumps(data).encode())  # atomic: a kill leaves the old record or the new one


def _save_batch(spec: JobSpec, batch_id: str, record: dict[str, Any]) -> None:
    _write(storage.join(_state_dir(spec), f"{batch_id}.json"), record)


def _call_parts(spec: JobSpec) -> tuple[str, str, str | None]:
    """(SQL selecting each row's request and parameters, endpoint, parameters text) of the job's ai_query call."""
    from spark_udfs._rewrite import bind_arguments, find_calls
    from spark_udfs._udf import SIGNATURE

    calls = [c for c in find_calls(spec.query, {"ai_query"})]
    outer = [c for c in calls if not any(o is not c and o.start <= c.start and c.end <= o.end for o in calls)]
    if len(outer) != 1:
        raise ConfigError(f"[batch_api] needs a job query with exactly one ai_query(...) call, found {len(outer)}; "
                          "split the job, or remove [batch_api] to run it online")
    call = outer[0]
    bound = bind_arguments(call, SIGNATURE, required=2)
    endpoint = bound["endpoint"].literal
    if not isinstance(endpoint, str):
        raise ConfigError(f"[batch_api] needs the endpoint of ai_query as a string literal, got {bound['endpoint'].text}; "
                          "name the endpoint in the query, or remove [batch_api]")
    for unsupported in ("responseFormat", "files"):
        if unsupported in bound:
            raise ConfigError(f"[batch_api] does not send ai_query calls with {unsupported} yet; remove [batch_api] to run "
                              "this job online")
    params = bound["modelParameters"].text if "modelParameters" in bound else None
    struct = f"named_struct('request', ({bound['request'].text}), 'params', ({params or 'CAST(NULL AS STRING)'}))"
    return spec.query[:call.start] + struct + spec.query[call.end:], endpoint, params


def _pending_requests(spark: "SparkSession", spec: JobSpec, input_df: "DataFrame", keys: pa.Table, endpoint: str
                      ) -> dict[str, tuple[Any, Any]]:
    """Request key digest -> (request, parameters) of the pending rows (one entry per distinct request)."""
    sql, _, has_params = _call_parts(spec)
    out: dict[str, tuple[Any, Any]] = {}
    names = list(spec.key)
    step = max(spec.chunk_rows, 10_000)
    for offset in range(0, keys.num_rows, step):
        rows = rows_of_keys(spark, input_df, keys.slice(offset, step), names).toArrow()
        spark.createDataFrame(rows, schema=input_df.schema).createOrReplaceTempView(spec.driving_view)
        df = spark_udfs.sql(spark, sql)
        column = next(f.name for f in df.schema.fields if f.dataType.simpleString().startswith("struct<request:"))
        for item in df.select(column).toArrow().column(0).to_pylist():
            request, params = item["request"], item["params"] if has_params else None
            if request is None:
                continue
            out.setdefault(request_key(endpoint, request, params, None).digest, (request, params))
    return out


def _online_rate(spec: JobSpec) -> float:
    configured = (spec.batch_api or {}).get("online_rows_per_s")
    if configured:
        return float(configured)
    for run in reversed(read_runs(spec)):  # the last online run's rate (a batch-mode run's includes its waiting)
        if run.get("status") == "finished" and run.get("rows") and run.get("seconds") and not run.get("batch_api"):
            return float(run["rows"]) / float(run["seconds"])
    return DEFAULT_ONLINE_ROWS_PER_S


def run_batch_phase(spark: "SparkSession", spec: JobSpec, input_df: "DataFrame", keys: pa.Table, started: float) -> BatchPhase:
    """Send the pending rows as provider batches, wait (up to the deadline), journal the answers."""
    options = spec.batch_api or {}
    phase = BatchPhase()
    _, endpoint, _ = _call_parts(spec)
    entity = spark_udfs._state(spark).registry.get(endpoint).entity  # noqa: SLF001 - same project
    client = batch_client(entity, options.get("max_requests"))
    task = entity.task
    state = _load_state(spec)
    journal_root = storage.join(spec.state_path, "journal")

    _adopt_orphans(client, spec, state)
    carried = {d for b in state["batches"].values() for d, _ in b["lines"].values()}
    journaled = set()
    for directory in storage.list_dir(journal_root, dirs=True):
        for path in storage.list_dir(directory, suffix=".jsonl", dirs=False):
            journaled.update(read_entries(path))
    requests = _pending_requests(spark, spec, input_df, keys, endpoint)
    spark.table(_INPUT_ALIAS).createOrReplaceTempView(spec.driving_view)
    new = {d: r for d, r in requests.items() if d not in carried and d not in journaled}
    phase.resumed = sum(1 for b in state["batches"].values() if not b["collected"])

    digests = list(new)
    lines = client.lines(task, [new[d][0] for d in digests], [new[d][1] for d in digests],
                         [prompt_text_of(new[d][0]) for d in digests]) if digests else []
    for part_lines, part_digests in _parts(client.split(lines), digests):
        token = uuid.uuid4().hex  # the intent: a kill between the create and the record below leaves it
        record = {"endpoint": endpoint, "submitted_at": time.time(), "collected": False,
                  "lines": {ln.custom_id: [d, ln.prompt_text] for ln, d in zip(part_lines, part_digests)}}
        intent = storage.join(_state_dir(spec), f"{_INTENT}{token}.json")
        _write(intent, record)
        batch_id = client.submit(part_lines, options.get("completion_window", "24h"), {_INTENT_KEY: token})
        state["batches"][batch_id] = record
        _save_batch(spec, batch_id, record)
        storage.remove(intent)
        phase.submitted += 1
        phase.lines += len(part_lines)
        log.info("job %s: batch %s submitted (%d requests)", spec.name, batch_id, len(part_lines))

    # The deadline counts from the run that first submitted the open batches: a resumed run keeps it.
    deadline_at = None
    if options.get("deadline_s") is not None:
        open_batches = any(not b["collected"] for b in state["batches"].values())
        deadline_at = state.get("deadline_at") if open_batches and state.get("deadline_at") else \
            time.time() - (time.monotonic() - started) + options["deadline_s"]
        _write(storage.join(_state_dir(spec), "_deadline.json"), {"deadline_at": deadline_at})
    open_ids = [bid for bid, b in state["batches"].items() if not b["collected"]]

    def on_cancel(batch_id: str) -> None:
        phase.cancelled += 1
        log.info("job %s: batch %s cancelled at the deadline; its unfinished rows go online", spec.name, batch_id)

    poll_until_ended(client, open_ids, lambda bid, seen: _collect(client, spec, state, bid, seen.status, journal_root, phase),
                     deadline_at=deadline_at, online_rows_per_s=_online_rate(spec), poll_s=float(options.get("poll_s", 2.0)),
                     max_poll_s=float(options.get("max_poll_s", 60.0)), on_cancel=on_cancel)
    phase.batch_ids = list(state["batches"])
    return phase


def _adopt_orphans(client: ProviderBatches, spec: JobSpec, state: dict[str, Any]) -> None:
    """A batch whose create a killed run sent but never recorded: found by its intent's metadata
    and recorded (polled, not sent again); an intent the provider has no batch for is dropped."""
    for token, record in state.pop("intents").items():
        batch_id = client.find(_INTENT_KEY, token)
        if batch_id is not None and batch_id not in state["batches"]:
            state["batches"][batch_id] = record
            _save_batch(spec, batch_id, record)
            log.info("job %s: batch %s, created by a run killed before recording it, is polled instead of sent again",
                     spec.name, batch_id)
        storage.remove(storage.join(_state_dir(spec), f"{_INTENT}{token}.json"))


def _parts(batches: list[list[BatchLine]], digests: list[str]) -> list[tuple[list[BatchLine], list[str]]]:
    out, at = [], 0
    for lines in batches:
        out.append((lines, digests[at:at + len(lines)]))
        at += len(lines)
    return out


def _collect(client: ProviderBatches, spec: JobSpec, state: dict[str, Any], batch_id: str, status: str,
             journal_root: str, phase: BatchPhase) -> None:
    """Journal an ended batch's answers (each under its request key), then mark it collected."""
    record = state["batches"][batch_id]
    lines = {cid: BatchLine(cid, client.entity.task, {}, text)
             for cid, (_, text) in record["lines"].items()}
    results = client.results(batch_id, lines)
    journal = ResponseJournal(storage.join(journal_root, f"batch-{batch_id}"))
    latency_ms = (time.time() - record["submitted_at"]) * 1000.0
    for cid, answer in results.items():
        if isinstance(answer, Exception):
            phase.failed_lines += 1
            continue
        journal.record(record["lines"][cid][0], batch_result(answer, record["endpoint"], client.entity, batch_id, latency_ms))
        phase.answered += 1
    journal.flush()  # on an object store the answers are queued: written before the batch counts as collected
    record["collected"], record["status"] = True, status
    _save_batch(spec, batch_id, record)
    log.info("job %s: batch %s %s, %d answers journaled", spec.name, batch_id, status, len(results))


def batch_ids_by_request(spec: JobSpec) -> dict[str, str]:
    """Request id -> batch id of every journaled batch answer (for ``aiq_batch_id``)."""
    out: dict[str, str] = {}
    root = storage.join(spec.state_path, "journal")
    for directory in storage.list_dir(root, prefix="batch-", dirs=True):
        batch_id = storage.name(directory).removeprefix("batch-")
        for path in storage.list_dir(directory, suffix=".jsonl", dirs=False):
            for entry in read_entries(path).values():
                if entry["result"].get("request_id"):
                    out[entry["result"]["request_id"]] = batch_id
    return out


def with_batch_ids(result: pa.Table, by_request: dict[str, str]) -> pa.Table:
    """``result`` with ``aiq_batch_id``: the provider batch that answered the row (null: answered
    online). The audit struct names it for a row whose answer carried it; the journal's record of
    the job's batches fills in the rest."""
    ids = [by_request.get(rid) if rid else None for rid in result.column("aiq_request_id").to_pylist()]
    mapped = pa.array(ids, pa.string())
    if "aiq_batch_id" not in result.column_names:
        return result.append_column("aiq_batch_id", mapped)
    at = result.column_names.index("aiq_batch_id")
    return result.set_column(at, "aiq_batch_id", pc.coalesce(result.column("aiq_batch_id"), mapped))


def forget_batches(spec: JobSpec) -> None:
    """Every pending row is committed: the recorded batches are done with."""
    storage.remove_tree(_state_dir(spec))


__all__ = ["BatchPhase", "batch_ids_by_request", "forget_batches", "run_batch_phase", "with_batch_ids"]
