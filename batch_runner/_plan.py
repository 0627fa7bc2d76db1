"""``ai-query plan``: what the next run of a job will do and cost, before it runs.

Input tokens are counted from the requests the query builds for the pending rows: with the
model's own tokenizer (and chat template) when the endpoint's model is local, else as
(characters + 1) / 4, the estimate the client uses when an endpoint reports no usage. A pilot
then sends ``options.pilot_rows`` pending rows through the real query: the ratio of the tokens
the endpoint reported to the estimate for the same rows calibrates the input estimate, and the
pilot's completion tokens, latency and cost per row give the output tokens, duration and cost.
The pilot's answers are journaled, so the run that follows answers those rows from the journal
instead of paying for them again. Without a pilot (``--no-pilot``) no request is sent; output
tokens are then bounded by ``max_tokens`` when the query sets it, else unknown.
"""

from __future__ import annotations

import functools
import math
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

import spark_udfs
from ai_query import storage
from ai_query.backends import provider_of
from ai_query.batch import JOURNAL_PROPERTY, ResponseJournal

from ._job_input import _INPUT_ALIAS, open_job, pending_keys, request_query, rows_of_keys
from ._job_state import journal_dirs
from ._runner import flatten_audit
from ._spec import JobSpec, duration_s

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

_SAMPLE_FOR_TOKENIZER = 2000
_CHUNK_OVERHEAD_S = 1.0  # a Spark job per chunk: planning, tasks, the Delta commits (measured ~0.5-2 s here)


@dataclass
class EndpointPlan:
    endpoint: str
    rows: int
    input_chars: int
    input_tokens: int
    input_tokens_method: str
    output_tokens: int | None
    output_tokens_method: str
    cost_usd: float | None
    seconds: float | None
    pilot_rows: int = 0
    pilot_calibration: float | None = None
    """Tokens the endpoint reported for the pilot rows over the estimate for them."""
    batch_cost_usd: float | None = None
    """The same rows through the provider's batch API (the batch rate); ``None``: no batch API or no prices."""
    batch_seconds: float | None = None
    """When batch mode is done at the latest: the ``[batch_api]`` deadline, else the completion window."""


@dataclass
class JobPlan:
    job: str
    pending_rows: int
    chunks: int
    endpoints: list[EndpointPlan] = field(default_factory=list)
    pilot_requests: int = 0

    @property
    def input_tokens(self) -> int:
        return sum(e.input_tokens for e in self.endpoints)

    @property
    def output_tokens(self) -> int | None:
        values = [e.output_tokens for e in self.endpoints]
        return None if any(v is None for v in values) else sum(values)  # type: ignore[misc]

    @property
    def cost_usd(self) -> float | None:
        values = [e.cost_usd for e in self.endpoints]
        return None if any(v is None for v in values) else sum(values)  # type: ignore[misc]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(input_tokens=self.input_tokens, output_tokens=self.output_tokens, cost_usd=self.cost_usd)
        return out

    def render(self) -> str:
        lines = [f"job {self.job!r}: {self.pending_rows} pending rows in {self.chunks} chunk(s)"
                 + (f"; pilot sent {self.pilot_requests} request(s), journaled for the run" if self.pilot_requests else "")]
        head = f"  {'endpoint':<20}{'rows':>8}{'input tok':>12}{'output tok':>12}{'cost USD':>11}{'time':>9}"
        lines.append(head)
        for e in self.endpoints:
            out = "?" if e.output_tokens is None else str(e.output_tokens)
            cost = "?" if e.cost_usd is None else f"{e.cost_usd:.4f}"
            secs = "?" if e.seconds is None else _duration(e.seconds)
            lines.append(f"  {e.endpoint:<20}{e.rows:>8}{e.input_tokens:>12}{out:>12}{cost:>11}{secs:>9}")
            lines.append(f"    input: {e.input_tokens_method}; output: {e.output_tokens_method}")
            if e.batch_seconds is not None:
                bcost = "?" if e.batch_cost_usd is None else f"{e.batch_cost_usd:.4f} USD"
                lines.append(f"    online: {cost} USD, done in ~{secs}; batch API ([batch_api] or run --batch-api): {bcost}, "
                             f"done within {_duration(e.batch_seconds)}")
        if not self.endpoints:
            lines.append("  (nothing to do)")
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@functools.lru_cache(maxsize=4)
def _local_tokenizer(model: str) -> Any:
    """The tokenizer of a local model folder (or alias), or ``None`` when it cannot be loaded here."""
    try:
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer

        path = Path(model)
        if not path.is_dir():
            from ai_query.backends import local_model_folder  # an alias of the local_model backend

            folder = local_model_folder(model)
            if folder is None or not (folder / "config.json").is_file():  # not prepared on this machine
                return None
            path = folder
        return AutoTokenizer.from_pretrained(str(path))
    except Exception:  # noqa: BLE001 - no transformers, no folder: fall back to characters
        return None


def _count_tokens(tokenizer: Any, texts: list[str], chat: bool) -> int:
    total = 0
    for text in texts:
        if chat and getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True, add_generation_prompt=True)
            total += len(ids["input_ids"] if isinstance(ids, dict) else ids)
        else:
            total += len(tokenizer.encode(text, add_special_tokens=False))
    return total


def _chars_estimate(texts: list[str]) -> int:
    return sum((len(t) + 1) // 4 for t in texts)


def _max_tokens_literal(query: str) -> int | None:
    m = re.search(r"'max_tokens'\s*,\s*(\d+)", query)
    return int(m.group(1)) if m else None


def plan_job(spec: JobSpec, spark: "SparkSession", *, pilot: bool = True, retry_failed: bool = False,
             limit: int | None = None) -> JobPlan:
    """Estimate the next run of ``spec`` (see the module docstring)."""
    input_df = open_job(spec, spark)
    caps = [n for n in (limit, spec.max_rows) if n is not None]
    keys = pending_keys(spark, spec, input_df, retry_failed=retry_failed, limit=min(caps) if caps else None)
    plan = JobPlan(spec.name, keys.num_rows, math.ceil(keys.num_rows / spec.chunk_rows))
    if keys.num_rows == 0:
        return plan
    names = list(spec.key)
    req_sql, calls = request_query(spark, spec)
    registry = spark_udfs._state(spark).registry  # noqa: SLF001 - same project
    endpoint = calls[0][1] or "?"
    config = registry.get(endpoint) if endpoint in registry else None
    try:
        rows_of_keys(spark, input_df, keys, names).createOrReplaceTempView(spec.driving_view)
        df = spark_udfs.sql(spark, spec.query, audit=True)
        _, response_column = flatten_audit(df)
        requests = spark_udfs.sql(spark, req_sql).select(*names, response_column).toArrow()
    finally:
        spark.table(_INPUT_ALIAS).createOrReplaceTempView(spec.driving_view)
    texts_col = requests.column(response_column).fill_null("")
    texts = texts_col.to_pylist()
    chars = pc.sum(pc.utf8_length(texts_col)).as_py() or 0

    tokenizer = _local_tokenizer(config.entity.local_model.model) if config is not None and config.entity.local_model else None
    chat = config is not None and config.task == "llm/v1/chat"
    if tokenizer is not None:
        sample = texts if len(texts) <= _SAMPLE_FOR_TOKENIZER else texts[:: max(1, len(texts) // _SAMPLE_FOR_TOKENIZER)]
        counted = _count_tokens(tokenizer, sample, chat)
        input_tokens = round(counted * len(texts) / len(sample))
        method = f"the model's tokenizer ({len(sample)} of {len(texts)} requests)"
        estimate_for = functools.partial(_count_tokens, tokenizer, chat=chat)
    else:
        input_tokens = _chars_estimate(texts)
        method = "(characters + 1) / 4"
        estimate_for = _chars_estimate
    max_tokens = _max_tokens_literal(spec.query)
    output_tokens = keys.num_rows * max_tokens if max_tokens else None
    output_method = f"at most max_tokens ({max_tokens}) per row" if max_tokens else "unknown without a pilot"
    cost = seconds = None
    calibration = None
    pilot_n = min(spec.pilot_rows, keys.num_rows) if pilot else 0
    if pilot_n:
        step = max(1, keys.num_rows // pilot_n)
        pilot_keys = keys.take(list(range(0, keys.num_rows, step))[:pilot_n])
        result, elapsed = _run_pilot(spark, spec, input_df, pilot_keys)
        ok = result.filter(pc.equal(result.column("aiq_status"), "ok"))
        by_key = {tuple(r[k] for k in names): r[response_column] for r in requests.to_pylist()}
        pilot_texts = [by_key.get(tuple(r[k] for k in names)) or "" for r in ok.select(names).to_pylist()]
        reported_in = pc.sum(ok.column("aiq_prompt_tokens")).as_py() or 0
        estimated_in = estimate_for(pilot_texts)
        plan.pilot_requests = result.num_rows
        if ok.num_rows and estimated_in:
            calibration = reported_in / estimated_in
            input_tokens = round(input_tokens * calibration)
            method += f", calibrated by the pilot (x{calibration:.3f})"
            per_row_out = (pc.sum(ok.column("aiq_completion_tokens")).as_py() or 0) / ok.num_rows
            output_tokens = round(per_row_out * keys.num_rows)
            output_method = f"pilot average {per_row_out:.1f} per row"
            latency_s = (pc.mean(ok.column("aiq_latency_ms")).as_py() or 0.0) / 1000
            concurrency = config.client_config.max_concurrency if config is not None else 8
            seconds = keys.num_rows * latency_s / concurrency + plan.chunks * _CHUNK_OVERHEAD_S
    if config is not None and config.entity.pricing is not None and output_tokens is not None:
        cost = config.entity.pricing.cost(input_tokens, output_tokens)
    batch_cost = batch_seconds = None
    if config is not None and provider_of(config.entity) is not None:
        options = spec.batch_api or {}
        batch_seconds = options.get("deadline_s") or duration_s(options.get("completion_window", "24h"), "batch_api.completion_window")
        if config.entity.pricing is not None and output_tokens is not None:
            batch_cost = config.entity.pricing.batch_cost(input_tokens, output_tokens)
    plan.endpoints.append(EndpointPlan(endpoint, keys.num_rows, chars, input_tokens, method, output_tokens, output_method,
                                       cost, seconds, pilot_n, calibration, batch_cost, batch_seconds))
    return plan


def _run_pilot(spark: "SparkSession", spec: JobSpec, input_df: Any, pilot_keys: pa.Table) -> tuple[pa.Table, float]:
    """The pilot rows through the real query, their answers journaled for the run; nothing committed."""
    names = list(spec.key)
    journal_dir = storage.join(spec.state_path, "journal", f"pilot-{uuid.uuid4().hex[:8]}")
    # A Spark Connect client cannot set local properties: its pilot answers are not journaled (the run asks again).
    sc = None if spark_udfs.is_connect(spark) else spark.sparkContext
    started = time.monotonic()
    try:
        rows_of_keys(spark, input_df, pilot_keys, names).createOrReplaceTempView(spec.driving_view)
        out_df, _ = flatten_audit(spark_udfs.sql(spark, spec.query, audit=True))
        if sc is not None:
            sc.setLocalProperty(JOURNAL_PROPERTY, ResponseJournal.property_value(journal_dir, journal_dirs(spec)))
        result = out_df.toArrow()
    finally:
        if sc is not None:
            sc.setLocalProperty(JOURNAL_PROPERTY, None)
        spark.table(_INPUT_ALIAS).createOrReplaceTempView(spec.driving_view)
    return result, time.monotonic() - started


__all__ = ["EndpointPlan", "JobPlan", "plan_job"]
