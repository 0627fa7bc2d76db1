"""Batch-API mode of jobs (``[batch_api]``) against the simulator's OpenAI Batch API: what it saves,
whether a deadline holds, and what the machinery costs.

    python bench/batch_api.py                  # every scenario; writes bench/results/batch_api.{json,md}
    python bench/batch_api.py --wait-quiet     # each run started only once others use < 0.25 cores
    python bench/batch_api.py --rows 8 --out /tmp/b   # smoke run (writes only to --out)

Every run is a real incremental job (``run_incremental``: a Delta table of sample reviews in, a
Delta table out, its usage table beside it) on a real Spark ``local[2]``, against a **fresh**
``ai_query.testing.ProviderSimulator`` (real HTTP on 127.0.0.1, in this process) whose endpoint is
priced by the registry's ``prices`` table (online and batch rates, as providers list them):

- ``cost``: the same rows online, then in batch mode (a 10-s batch with 1 % of its lines failing,
  which go online at the online price, as they would at a provider). Cost per 1,000 rows is read
  back from the output table's ``aiq_cost_usd``; goal: batch <= 0.55x online.
- ``deadline``: a first online run of part of the table (the job's measured online rate, which
  deadline routing plans with, as in production), then the rest in batch mode with a deadline
  half the simulated batch delay: the batch is cancelled when the rows it has not answered would
  need the time left online, and they go online. Goal: the run ends by its deadline.
- ``overhead``: a zero-delay batch (answers ready at once) beside the same job online on a
  zero-latency server: rows/s of the batch path's own machinery (building each row's request in
  Spark, the JSONL upload, polling, reading the output file, journaling, replaying the journal).

Nothing is asserted; see bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Record, goal_met, load_note, machine, markdown, quiet_measure  # noqa: E402 - bench/ is not a package
from _endpoints_results import code_version  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SECRET_ENV = "AIQ_SECRET_BENCH_SIM_KEY"
API_KEY = "sk-sim"
# The price table (dollars per million tokens), as providers list a small model: batch at half.
PRICES = {"sim-model": {"input_usd_per_million_tokens": 0.15, "output_usd_per_million_tokens": 0.60,
                        "batch_input_usd_per_million_tokens": 0.075, "batch_output_usd_per_million_tokens": 0.30}}
ONLINE_SIM = {"latency_s": 0.05, "max_concurrency": 64}
CLIENT = {"max_concurrency": 64, "initial_concurrency": 32, "max_attempts": 4}
SCENARIOS = ("cost", "deadline", "overhead")


@dataclass
class JobRun:
    seconds: float
    rows: int
    ok: int
    cost_usd: float
    online_rows: int
    batch_rows: int
    tokens: int
    served_tokens: int
    others: float
    served: dict[str, Any]
    phase: Any


def write_job(folder: Path, rows: int, sim_url: str, batch: dict[str, Any] | None, chunk: int, name: str = "job.toml") -> str:
    """The job (reviews in, a merged Delta table out); with ``batch``, its ``[batch_api]`` table."""
    from batch_runner import write_sample_reviews

    endpoint = {"name": "sim-chat", "config": {"served_entities": [{"name": "sim", "external_model": {
        "name": "sim-model", "provider": "openai", "task": "llm/v1/chat",
        "openai_config": {"openai_api_key": "{{secrets/bench/sim_key}}", "openai_api_base": sim_url}}}]},
        "client_config": CLIENT}
    (folder / "endpoints.json").write_text(json.dumps({"endpoints": [endpoint], "prices": PRICES}))
    if not (folder / "reviews").exists():
        write_sample_reviews(str(folder / "reviews"), rows=rows)
    section = "" if batch is None else "[batch_api]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in batch.items())
    (folder / name).write_text(textwrap.dedent(f'''
        name = "bench"
        key = ["review_id"]
        endpoints = "endpoints.json"
        [sources]
        reviews = "reviews"
        [options]
        chunk_rows = {chunk}
        [output]
        mode = "merge"
        path = "out"
        [prompt]
        max_tokens = 12
        column = "label_guess"
        endpoint = "sim-chat"
        template = "Sentiment of review {{review_id}} ({{product}}, {{rating}} stars): {{review}}"
    ''') + section + "\n")
    return str(folder / name)


def run_job(spark: Any, job: str, sim: Any, wait_quiet: bool, limit: int | None = None) -> JobRun:
    """One ``run_incremental`` of ``job``; what the output table and the simulator say afterwards."""
    import pyarrow.compute as pc
    from deltalake import DeltaTable

    from batch_runner import JobSpec, run_incremental

    spec = JobSpec.load(job)
    before = sim.snapshot()
    report, others, _ = quiet_measure(lambda: run_incremental(spec, spark, limit=limit, progress=False), wait_quiet=wait_quiet)
    served = {k: v - (before.get(k) or 0) if isinstance(v, (int, float)) else v for k, v in sim.snapshot().items()}
    table = DeltaTable(spec.output_path).to_pyarrow_table()
    batch_rows = table.num_rows - table.column("aiq_batch_id").null_count if "aiq_batch_id" in table.column_names else 0
    tokens = pc.sum(table.column("aiq_total_tokens")).as_py() or 0
    served_tokens = served.get("prompt_tokens", 0) + served.get("completion_tokens", 0) \
        + served.get("batch_prompt_tokens", 0) + served.get("batch_completion_tokens", 0)
    return JobRun(report.seconds, report.rows, report.rows_ok, pc.sum(table.column("aiq_cost_usd")).as_py() or 0.0,
                  table.num_rows - batch_rows, batch_rows, tokens, served_tokens, others, served, report.batch_phase)


def _sim(**batch: Any) -> Any:
    from ai_query.testing import ProviderSimulator

    return ProviderSimulator(api_key=API_KEY, **ONLINE_SIM, batch_api=batch or None)


def _fresh(root: Path, name: str) -> Path:
    folder = root / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def scenario_cost(spark: Any, root: Path, rows: int, chunk: int, wait_quiet: bool, log: Any) -> list[Record]:
    per_k = lambda run: run.cost_usd / run.rows * 1000  # noqa: E731
    with _sim() as sim:
        online = run_job(spark, write_job(_fresh(root, "cost-online"), rows, sim.base_url, None, chunk), sim, wait_quiet)
    log(f"cost: online {online.rows} rows in {online.seconds:.1f} s, {online.cost_usd:.6f} USD")
    with _sim(delay_s=10.0, error_rate=0.01) as sim:
        batch = run_job(spark, write_job(_fresh(root, "cost-batch"), rows, sim.base_url, {}, chunk), sim, wait_quiet)
    log(f"cost: batch {batch.rows} rows in {batch.seconds:.1f} s, {batch.cost_usd:.6f} USD, {batch.online_rows} rows online")
    ratio = per_k(batch) / per_k(online)
    loads = [online.others, batch.others]
    return [
        Record("cost", "batch_over_online_cost", round(ratio, 4), "ratio", "<= 0.55", 1.0, None, rows, batch.rows - batch.ok,
               goal_met(ratio, "<= 0.55"), others_cores=loads,
               notes=f"cost per 1,000 rows in batch mode over online, from aiq_cost_usd of the output table; price table "
                     f"{PRICES['sim-model']}; the batch's failed lines ({batch.online_rows} of {rows}) went online at the online "
                     f"price; {load_note(loads)}"),
        Record("cost", "cost_usd_per_1000_rows", round(per_k(batch), 6), "USD", None, round(per_k(online), 6), round(ratio, 4), rows,
               batch.rows - batch.ok, others_cores=loads,
               notes=f"ours = batch mode ({per_k(batch):.6f} USD; a 10-s batch, 1 % of its lines failing), baseline = the same "
                     f"job online ({per_k(online):.6f} USD, simulator "
                     f"{ONLINE_SIM}); tokens {batch.tokens} vs {online.tokens}; batch mode ran {batch.seconds:.1f} s, online "
                     f"{online.seconds:.1f} s"),
        Record("cost", "tokens_match_server", int(batch.tokens == batch.served_tokens and online.tokens == online.served_tokens),
               "bool", "== 1", None, None, rows, None, goal_met(int(batch.tokens == batch.served_tokens and online.tokens ==
                                                                     online.served_tokens), "== 1"),
               notes=f"aiq_total_tokens of the table == tokens the simulator served (online + batch lines), both runs: "
                     f"batch {batch.tokens} vs {batch.served_tokens}, online {online.tokens} vs {online.served_tokens}"),
    ]


def scenario_deadline(spark: Any, root: Path, rows: int, chunk: int, wait_quiet: bool, deadline_s: float, log: Any) -> list[Record]:
    delay = 2 * deadline_s
    calibrate = max(1, rows // 2)
    folder = _fresh(root, "deadline")
    with _sim(delay_s=delay) as sim:
        first = run_job(spark, write_job(folder, rows + calibrate, sim.base_url, None, chunk, "online.toml"), sim, wait_quiet,
                        limit=calibrate)
        log(f"deadline: calibration online run {first.rows} rows in {first.seconds:.1f} s ({first.rows / first.seconds:.0f} rows/s)")
        job = write_job(folder, rows + calibrate, sim.base_url, {"deadline": f"{deadline_s:g}s"}, chunk, "batch.toml")
        run = run_job(spark, job, sim, wait_quiet)
    online_now = run.online_rows - first.rows  # the table also holds the calibration run's rows
    batch_now = run.batch_rows
    log(f"deadline: {run.rows} rows in {run.seconds:.1f} s (deadline {deadline_s:g} s): {batch_now} from the batch, {online_now} online")
    over = run.seconds / deadline_s
    phase = run.phase
    return [
        Record("deadline", "finish_s", round(run.seconds, 2), "s", f"<= {deadline_s:g}", deadline_s, round(over, 3), run.rows,
               run.rows - run.ok, goal_met(run.seconds, f"<= {deadline_s:g}"), others_cores=[run.others],
               notes=f"batch-mode run of {run.rows} rows, deadline {deadline_s:g} s (baseline column), simulated batch delay "
                     f"{delay:g} s; from the start of run_incremental (Spark session already up) to its end; deadline routing "
                     f"planned with the job's last online run ({first.rows} rows at {first.rows / first.seconds:.0f} rows/s, "
                     f"others' CPU {first.others:.2f} cores); {load_note([run.others])}"),
        Record("deadline", "rows_online", online_now, "rows", None, None, None, run.rows, run.rows - run.ok,
               notes=f"rows of this run answered online after the batch was cancelled ({phase.cancelled if phase else 0} "
                     f"batch cancelled); {batch_now} answered by the batch before the cancel, at the batch price"),
    ]


def scenario_overhead(spark: Any, root: Path, rows: int, chunk: int, wait_quiet: bool, log: Any) -> list[Record]:
    from ai_query.testing import ProviderSimulator

    with ProviderSimulator(api_key=API_KEY) as sim:  # zero latency, no cap
        online = run_job(spark, write_job(_fresh(root, "overhead-online"), rows, sim.base_url, None, chunk), sim, wait_quiet)
    with ProviderSimulator(api_key=API_KEY, batch_api={"delay_s": 0.0}) as sim:
        batch = run_job(spark, write_job(_fresh(root, "overhead-batch"), rows, sim.base_url, {}, chunk), sim, wait_quiet)
    log(f"overhead: batch {batch.rows / batch.seconds:.0f} rows/s, online {online.rows / online.seconds:.0f} rows/s")
    rate, base = batch.rows / batch.seconds, online.rows / online.seconds
    loads = [online.others, batch.others]
    return [
        Record("overhead", "batch_rows_per_s", round(rate, 1), "rows/s", None, round(base, 1), round(rate / base, 3), rows,
               batch.rows - batch.ok, others_cores=loads,
               notes=f"a zero-delay batch (every line answered at once): the batch path's own cost, from the run's start to its "
                     f"end ({batch.seconds:.2f} s; {batch.batch_rows} rows from the batch); baseline = the same job online on a "
                     f"zero-latency, uncapped server ({online.seconds:.2f} s); both CPU-bound on 2 cores shared with the simulator"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4000, help="rows of each job (default 4,000)")
    parser.add_argument("--chunk-rows", type=int, default=1000, help="options.chunk_rows of the jobs (default 1,000)")
    parser.add_argument("--deadline", type=float, default=30.0, help="the deadline scenario's deadline in s (batch delay: twice it)")
    parser.add_argument("--scenario", action="append", choices=SCENARIOS, help="one scenario (repeatable; default: all)")
    parser.add_argument("--wait-quiet", action="store_true", help="start each run only once others use < 0.25 cores")
    parser.add_argument("--out", type=Path, default=None, help=f"results folder (default {RESULTS})")
    args = parser.parse_args(argv)
    started = time.monotonic()

    def log(msg: str) -> None:
        print(f"{time.monotonic() - started:7.1f}s {msg}", flush=True)

    os.environ[SECRET_ENV] = API_KEY  # before the JVM starts, so the Python workers inherit it
    import spark_udfs

    spark = spark_udfs.build_session("local[2]", app_name="ai-query-batch-api-bench")
    root = Path(tempfile.mkdtemp(prefix="aiq-batch-bench-"))
    records: list[Record] = []
    try:
        with _sim() as sim:  # Python workers and the JVM's path warm, so the first measured run is not the first job
            run_job(spark, write_job(_fresh(root, "warm"), 200, sim.base_url, None, 100), sim, False)
        for name in args.scenario or SCENARIOS:
            log(f"scenario {name}")
            if name == "cost":
                records += scenario_cost(spark, root, args.rows, args.chunk_rows, args.wait_quiet, log)
            elif name == "deadline":
                records += scenario_deadline(spark, root, args.rows, args.chunk_rows, args.wait_quiet, args.deadline, log)
            else:
                records += scenario_overhead(spark, root, args.rows, args.chunk_rows, args.wait_quiet, log)
    finally:
        spark.stop()
        shutil.rmtree(root, ignore_errors=True)
    for r in records:
        print(f"  {r.scenario:9} {r.metric:24} {r.value!s:>10} {r.unit:7} goal {r.goal or '-':8} baseline {r.baseline}")
    out = args.out or RESULTS
    out.mkdir(parents=True, exist_ok=True)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python bench/batch_api.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"date": date, "machine": machine(), "command": command.strip(), "code": code_version(),
            "wall_s": round(time.monotonic() - started)}
    (out / "batch_api.json").write_text(json.dumps([{**r.as_dict(), **meta} for r in records], indent=1) + "\n")
    (out / "batch_api.md").write_text(markdown(
        records, date=date, command=meta["command"], machine_line=meta["machine"], wall_s=meta["wall_s"],
        title="Batch-API mode benchmark results",
        preamble=[f"- code measured: {meta['code']}",
                  f"- jobs: {args.rows:,} sample reviews, max_tokens 12, chunk_rows {args.chunk_rows}, Spark local[2]; online "
                  f"simulator {ONLINE_SIM}, client_config {CLIENT}; [batch_api] defaults (poll every 2 s, x1.5 up to 60 s)"]))
    log(f"wrote {out / 'batch_api.json'} and {out / 'batch_api.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
