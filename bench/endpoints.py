"""Endpoint-layer benchmark: ``ai_query`` in Spark against the provider simulator, beside a raw openai baseline.

    python bench/endpoints.py                        # every scenario; writes bench/results/endpoints.{json,md}
    python bench/endpoints.py --scenario faults      # one scenario (repeatable); results are merged by scenario
    python bench/endpoints.py --quick                # smoke run with small row counts (results not written)
    python bench/endpoints.py --rows 300 --scenario quota_sliding   # smoke run of one scenario at 300 rows

Each scenario runs twice, each time on a fresh ``ProviderSimulator`` with the same settings:

- **ours**: ``SELECT id, ai_query('sim', prompt, modelParameters => ...) FROM rows`` through
  ``spark_udfs.sql(..., audit=True)`` and ``.collect()`` on a real ``local[2]`` Spark (2 Python
  workers stand for 2 executors: ``max_concurrency`` and quotas are the endpoint's totals, shared);
- **baseline**: ``openai.AsyncOpenAI`` (its default httpx2 client, its default 2 retries) under an
  ``asyncio.Semaphore(C)``, in a plain Python process of its own.

The simulator runs in this (the driver's) process; the numbers are measured, never asserted. See
bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _endpoints_results import code_version, write_results  # noqa: E402
from _common import (  # noqa: E402 - bench/ is not a package
    BackgroundLoad,
    Record,
    SimSampler,
    SparkCpu,
    goal_met,
    prompts,
    run_baseline,
)

RESULTS = Path(__file__).resolve().parent / "results"
SECRET_ENV = "AIQ_SECRET_BENCH_SIM_KEY"
API_KEY = "sk-sim"


@dataclass(frozen=True)
class Scenario:
    name: str
    rows: int
    quick_rows: int
    sim: dict[str, Any]
    """ProviderSimulator settings (the same for ours and the baseline)."""
    client: dict[str, Any]
    """Our endpoint's client_config."""
    baseline_concurrency: int
    max_tokens: int = 16
    words: tuple[int, int] = (6, 6)
    quick_sim: dict[str, Any] = field(default_factory=dict)
    quick_client: dict[str, Any] = field(default_factory=dict)
    parallel_baseline: bool = False
    """Run the baseline while ours runs (each on its own simulator): for scenarios that wait on quota windows, not CPU."""
    summary: str = ""
    short_rows: int | None = 3000
    """Also measure on a short job of this many rows (ours and the baseline): a Spark query's fixed
    start and end weigh most there, and an adaptive limiter has no time to converge before it ends."""
    short_goals: tuple[tuple[str, str], ...] = ()
    """Goals of the short job: ``(metric, goal)`` over the records ``_whole_run_records`` and ``METRICS`` give."""


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario(
            "latency_bound", rows=25600, quick_rows=1280,
            short_goals=(("achieved_over_bound", ">= 0.90"), ("first_request_s", "<= 0.3")),
            sim={"latency_s": 0.2, "max_concurrency": 64},
            client={"max_concurrency": 64, "initial_concurrency": 64},
            baseline_concurrency=64,
            summary="200 ms fixed latency, server cap 64 (429 above); bound C/L = 320 rows/s",
        ),
        Scenario(
            "unknown_capacity", rows=24000, quick_rows=1500,
            short_goals=(("achieved_over_capacity", ">= 0.85"), ("share_429_whole_job", "<= 0.03")),
            sim={"latency_s": 0.1, "max_concurrency": 48},
            client={"max_concurrency": 256},
            baseline_concurrency=64,
            summary="100 ms latency, 429 above 48 in flight (not told to the client: max_concurrency 256, initial 8); capacity 480 rows/s",
        ),
        Scenario(
            "quota", rows=1500, quick_rows=600,
            sim={"latency_s": 0.1, "max_concurrency": 256, "rpm_limit": 600, "tpm_limit": 18000, "window_s": 60.0,
                 "tpm_refund_unused": True},
            client={"max_concurrency": 64, "initial_concurrency": 64, "requests_per_minute": 600, "tokens_per_minute": 18000,
                    "quota_refunds_unused": True},
            quick_sim={"rpm_limit": 500, "tpm_limit": 100000},
            quick_client={"requests_per_minute": 500, "tokens_per_minute": 100000},
            baseline_concurrency=64, max_tokens=32, words=(4, 24), parallel_baseline=True, short_rows=None,
            summary="600 requests and 18,000 tokens per 60-s window (tokens bind), refunds of unused max_tokens on both sides",
        ),
        Scenario(
            "quota_sliding", rows=3000, quick_rows=300,
            sim={"latency_s": 0.05, "max_concurrency": 64, "rpm_limit": 1200, "window_s": 60.0, "quota_window": "sliding"},
            client={"max_concurrency": 64, "initial_concurrency": 64, "requests_per_minute": 1200},
            quick_sim={"rpm_limit": 120}, quick_client={"requests_per_minute": 120},
            baseline_concurrency=64, parallel_baseline=True, short_rows=None,
            summary="the job told the exact RPM (1,200/min) of a server that counts it over a sliding 60-s window; cap 64",
        ),
        Scenario(
            "faults", rows=24000, quick_rows=1500,
            sim={"latency_s": 0.1, "max_concurrency": 64, "error_rates": {"500": 0.05, "503": 0.05, "reset": 0.02, "malformed": 0.02}},
            client={"max_concurrency": 64, "initial_concurrency": 64},
            baseline_concurrency=64,
            summary="5% 500, 5% 503, 2% connection resets, 2% malformed 200 bodies; 100 ms, cap 64; bound 640 rows/s",
        ),
        Scenario(
            "zero_latency", rows=10000, quick_rows=4000,
            sim={"latency_s": 0.0},
            client={"max_concurrency": 64, "initial_concurrency": 64},
            baseline_concurrency=64,
            summary="no latency, no cap: the clients' own cost (CPU-bound on 2 cores shared with the simulator)",
        ),
    ]
}


# -- one run of ours ---------------------------------------------------------------------------


def endpoint(name: str, base_url: str, client: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "config": {"served_entities": [{"name": name, "external_model": {
            "name": "sim-model", "provider": "openai", "task": "llm/v1/chat",
            "openai_config": {"openai_api_key": "{{secrets/bench/sim_key}}", "openai_api_base": base_url}}}]},
        "client_config": client,
    }


@dataclass
class Run:
    elapsed_s: float
    rows: int
    ok: int
    failed: int
    failures: dict[str, int]
    cpu: dict[str, float]
    sampler: SimSampler
    snapshot: dict[str, Any]
    attempts: int = 0
    total_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _failure_kind(error: str | None) -> str:
    """The cause and why it was final, without the row-specific middle of the message."""
    error = error or "?"
    for marker in (" (the endpoint's retry budget is spent", " (gave up after"):
        head, found, _ = error.partition(marker)
        if found:
            why = "retry budget spent" if "budget" in marker else "gave up"
            return f"{head[:40]}... [{why}]"
    return error[:80]


_JVM_WARMED: list[int] = []
"""The row count of this process's JVM warm-up (once per Spark application)."""


def _warm_query(spark: Any, rows: int) -> None:
    """``rows`` rows through ai_query on the zero-latency "warm" endpoint."""
    import spark_udfs

    spark.createDataFrame([(i, f"warm up {i}") for i in range(rows)], "id INT, prompt STRING").createOrReplaceTempView("warm_rows")
    spark_udfs.sql(spark, "SELECT id, ai_query('warm', prompt) AS r FROM warm_rows", audit=True).select("id", "r.aiq_status").collect()


def run_ours(spark: Any, sc: Scenario, texts: list[str], sim: Any, warm_url: str, client: dict[str, Any]) -> Run:
    import spark_udfs
    from ai_query import EndpointRegistry

    registry = EndpointRegistry.from_data([endpoint("sim", sim.base_url, client),
                                           endpoint("warm", warm_url, {"max_concurrency": 64, "initial_concurrency": 64})])
    spark_udfs.register(spark, registry)
    # Warm the Python workers (imports, the shared client, its loop) on another endpoint, so the
    # measured endpoint starts cold: its limiter at initial_concurrency, no open connections.
    # Once per Spark application, warm the JVM too: its path from these rows to Arrow batches runs
    # interpreted until compiled (in a fresh session, the first 6,400-row query spent ~0.45 s more
    # between the task's launch and the batch reaching Python than the third one did).
    if not _JVM_WARMED:
        for _ in range(2):
            _warm_query(spark, len(texts))
        _JVM_WARMED.append(len(texts))
    _warm_query(spark, 64)
    t0 = time.monotonic()  # a second, warm, query: Spark's fixed cost per query on this machine
    _warm_query(spark, 64)
    warm_query_s = time.monotonic() - t0

    df = spark.createDataFrame(list(enumerate(texts)), "id INT, prompt STRING")
    assert df.rdd.getNumPartitions() == 2, df.rdd.getNumPartitions()
    df.createOrReplaceTempView("bench_rows")
    query = (f"SELECT id, ai_query('sim', prompt, modelParameters => named_struct('max_tokens', {sc.max_tokens})) AS r "
             "FROM bench_rows")
    cpu = SparkCpu()
    reset_at = time.monotonic()
    sim.reset()  # counters to zero, quota windows start now
    sampler = SimSampler(sim).start()
    before = cpu.read()
    t0 = time.monotonic()
    rows = (spark_udfs.sql(spark, query, audit=True)
            .select("id", "r.aiq_status", "r.aiq_error", "r.aiq_attempts", "r.aiq_total_tokens").collect())
    elapsed = time.monotonic() - t0
    after = cpu.read()
    sampler.stop()
    assert sorted(r.id for r in rows) == list(range(len(texts))), "every row exactly once"
    failures: dict[str, int] = {}
    for r in rows:
        if r.aiq_status != "ok":
            kind = _failure_kind(r.aiq_error)
            failures[kind] = failures.get(kind, 0) + 1
    ok = sum(r.aiq_status == "ok" for r in rows)
    snapshot = sim.snapshot()
    # The server's clock starts at the reset, just before the query: from the query's start.
    first, last = (None if snapshot[k] is None else snapshot[k] - (t0 - reset_at) for k in ("first_request_s", "last_request_s"))
    return Run(elapsed, len(rows), ok, len(rows) - ok, failures, SparkCpu.delta(before, after), sampler, snapshot,
               attempts=sum(r.aiq_attempts for r in rows), total_tokens=sum(r.aiq_total_tokens for r in rows),
               extra={"warm_query_s": warm_query_s, "first_request_s": first, "last_request_s": last})


# -- one run of the baseline (a child process) -------------------------------------------------


def start_baseline(sc: Scenario, rows: int, sim: Any) -> subprocess.Popen:
    spec = {"base_url": sim.base_url, "rows": rows, "words": list(sc.words), "concurrency": sc.baseline_concurrency,
            "max_tokens": sc.max_tokens}
    return subprocess.Popen([sys.executable, __file__, "--baseline-json", json.dumps(spec)],
                            stdout=subprocess.PIPE, text=True)


def finish_baseline(proc: subprocess.Popen, sim: Any, sampler: SimSampler) -> Run:
    out, _ = proc.communicate()
    sampler.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"the baseline process failed (exit {proc.returncode})")
    res = json.loads(out.strip().splitlines()[-1])
    return Run(res["elapsed_s"], res["rows"], res["ok"], res["failed"], res["failures"], {"process_cpu_s": res["cpu_s"]},
               sampler, sim.snapshot(), total_tokens=res["total_tokens"])


# -- metrics -----------------------------------------------------------------------------------


def _common_records(sc: Scenario, ours: Run, base: Run, rows: int) -> list[Record]:
    rate_o, rate_b = ours.ok / ours.elapsed_s, base.ok / base.elapsed_s
    return [
        Record(sc.name, "rows_per_s", round(rate_o, 1), "rows/s", None, round(rate_b, 1), round(rate_o / rate_b, 3) if rate_b else None,
               rows, ours.failed, notes=f"ok rows / wall time of the query ({ours.elapsed_s:.1f} s ours, {base.elapsed_s:.1f} s baseline); "
               f"the server saw our first request {ours.extra['first_request_s'] or 0:.2f} s after the query started and the last "
               f"{ours.elapsed_s - (ours.extra['last_request_s'] or 0):.2f} s before it ended; "
               f"a warm 64-row query on a zero-latency endpoint takes {ours.extra['warm_query_s']:.2f} s"),
        Record(sc.name, "failed_rows", ours.failed, "rows", "== 0", base.failed, None, rows, ours.failed,
               goal_met(ours.failed, "== 0"), _failures_note(ours, base)),
    ]


def _failures_note(ours: Run, base: Run) -> str:
    def show(d: dict[str, int]) -> str:
        return ", ".join(f"{k}: {v}" for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:3]) or "none"

    return f"ours: {show(ours.failures)}; baseline: {show(base.failures)}"


def _record(sc: Scenario, metric: str, value: float, unit: str, goal: str | None, baseline: float | None, rows: int,
            failed: int, notes: str = "") -> Record:
    ratio = round(value / baseline, 3) if baseline else None
    return Record(sc.name, metric, round(value, 4), unit, goal, None if baseline is None else round(baseline, 4), ratio,
                  rows, failed, goal_met(value, goal), notes)


def _steady(run: Run) -> dict[str, float]:
    """Server-side counts over the middle of the run (20% to 80% of its wall time): no start-up, no tail."""
    return run.sampler.after(0.2 * run.elapsed_s, 0.8 * run.elapsed_s)


def _steady_record(sc: Scenario, ours: Run, base: Run, rows: int, bound: float, what: str) -> Record:
    so, sb = _steady(ours), _steady(base)
    return _record(sc, f"steady_state_over_{what}", so["ok"] / so["seconds"] / bound if so["seconds"] else 0.0, "ratio", None,
                   sb["ok"] / sb["seconds"] / bound if sb["seconds"] else 0.0, rows, ours.failed,
                   f"ok answers/s at the server from 20% to 80% of the run's time, over {bound:.0f}/s; mean in flight there "
                   f"{so['mean_in_flight']:.1f} ours, {sb['mean_in_flight']:.1f} baseline")


def metrics_latency_bound(sc: Scenario, ours: Run, base: Run, rows: int) -> list[Record]:
    bound = sc.sim["max_concurrency"] / sc.sim["latency_s"]
    o, b = ours.ok / ours.elapsed_s / bound, base.ok / base.elapsed_s / bound
    return [_record(sc, "achieved_over_bound", o, "ratio", ">= 0.95", b, rows, ours.failed,
                    f"bound C/L = {bound:.0f} rows/s; server peak in flight {ours.snapshot['peak_concurrency']} ours, "
                    f"{base.snapshot['peak_concurrency']} baseline; 429s {ours.snapshot['rate_limited']} / {base.snapshot['rate_limited']}"),
            _steady_record(sc, ours, base, rows, bound, "bound")]


def metrics_unknown_capacity(sc: Scenario, ours: Run, base: Run, rows: int) -> list[Record]:
    capacity = sc.sim["max_concurrency"] / sc.sim["latency_s"]
    o, b = ours.ok / ours.elapsed_s / capacity, base.ok / base.elapsed_s / capacity
    cut_o, cut_b = 0.2 * ours.elapsed_s, 0.2 * base.elapsed_s
    after_o, after_b = ours.sampler.after(cut_o), base.sampler.after(cut_b)
    return [
        _record(sc, "achieved_over_capacity", o, "ratio", ">= 0.90", b, rows, ours.failed,
                f"capacity 48/L = {capacity:.0f} rows/s; whole query, ramp from initial_concurrency 8 included"),
        _record(sc, "share_429_after_convergence", after_o["share_429"], "share", "<= 0.02", after_b["share_429"], rows, ours.failed,
                f"429s / requests seen by the server after the first 20% of the run (ours {after_o['rate_limited']:,}/"
                f"{after_o['requests']:,}; baseline {after_b['rate_limited']:,}/{after_b['requests']:,})"),
        _steady_record(sc, ours, base, rows, capacity, "capacity"),
        _record(sc, "requests_per_row", ours.snapshot["requests"] / rows, "requests", None, base.snapshot["requests"] / rows,
                rows, ours.failed, "HTTP requests the server saw per input row (retries after 429 included)"),
    ]


def _quota_utilization(sc: Scenario, snap: dict[str, Any], rpm: int, tpm: int) -> tuple[float, list[str]]:
    """Mean, over the windows that had to be full (all but the last), of the binding limit's use."""
    windows = sorted(int(w) for w in snap["admitted_by_window"])
    if len(windows) < 2:
        return 0.0, []
    uses, shown = [], []
    for w in windows[:-1]:
        req = snap["admitted_by_window"].get(str(w), 0)
        tok = snap["admitted_tokens_by_window"].get(str(w), 0)
        use = max(req / rpm, tok / tpm)
        uses.append(use)
        shown.append(f"w{w}: {req} req, {tok:,} tok")
    return sum(uses) / len(uses), shown


def metrics_quota(sc: Scenario, ours: Run, base: Run, rows: int, sim_settings: dict[str, Any]) -> list[Record]:
    rpm, tpm = sim_settings["rpm_limit"], sim_settings["tpm_limit"]
    use_o, shown_o = _quota_utilization(sc, ours.snapshot, rpm, tpm)
    use_b, shown_b = _quota_utilization(sc, base.snapshot, rpm, tpm)
    windows_needed = len(ours.snapshot["admitted_by_window"])
    ideal = (windows_needed - 1) * sim_settings["window_s"]
    return [
        _record(sc, "achieved_over_quota", use_o, "ratio", ">= 0.90", use_b, rows, ours.failed,
                f"mean use of the binding limit (max of requests/rpm, net tokens/tpm) in each window but the last; "
                f"ours {'; '.join(shown_o)}; baseline {'; '.join(shown_b) or 'n/a'}"),
        _record(sc, "quota_violations", ours.snapshot["quota_violations"], "requests", "== 0", base.snapshot["quota_violations"],
                rows, ours.failed, "requests the server refused 429 for rpm/tpm (its quota_violations counter)"),
        _record(sc, "elapsed_over_ideal", ours.elapsed_s / ideal if ideal else 0.0, "ratio", None, None, rows, ours.failed,
                f"{ours.elapsed_s:.1f} s vs {ideal:.0f} s: the last window can open no earlier than {windows_needed - 1} windows after the first"),
    ]


def metrics_faults(sc: Scenario, ours: Run, base: Run, rows: int) -> list[Record]:
    bound = sc.sim["max_concurrency"] / sc.sim["latency_s"]
    o, b = ours.ok / ours.elapsed_s / bound, base.ok / base.elapsed_s / bound
    faults = ", ".join(f"{k}: {v}" for k, v in sorted(ours.snapshot["faults"].items()))
    return [
        _record(sc, "achieved_over_bound", o, "ratio", ">= 0.80", b, rows, ours.failed,
                f"bound C/L = {bound:.0f} rows/s (faults cost a full latency each, so at most ~0.86 is possible); "
                f"faults ours: {faults}; attempts/row {ours.attempts / rows:.3f}"),
        _steady_record(sc, ours, base, rows, bound, "bound"),
    ]


def metrics_zero_latency(sc: Scenario, ours: Run, base: Run, rows: int) -> list[Record]:
    rate_o, rate_b = ours.ok / ours.elapsed_s, base.ok / base.elapsed_s
    cpu_o = ours.cpu["workers_cpu_s"] * 1e6 / rows
    cpu_b = base.cpu["process_cpu_s"] * 1e6 / rows
    return [
        _record(sc, "rows_per_s_vs_baseline", rate_o / rate_b, "ratio", ">= 1.0", None, rows, ours.failed,
                f"{rate_o:.0f} rows/s ours (Spark, 2 workers) vs {rate_b:.0f} rows/s baseline (1 process)"),
        _record(sc, "client_cpu_ms_per_1000_rows", cpu_o, "CPU-ms", None, cpu_b, rows, ours.failed,
                f"ours: user+sys of the {ours.cpu['worker_processes']} pyspark.daemon/worker processes (psutil, before/after); "
                f"baseline: time.process_time() of its process. Not counted for ours: Spark's JVM "
                f"{ours.cpu['jvm_cpu_s'] * 1e6 / rows:.0f} CPU-ms/1k rows; the driver (with the simulator) "
                f"{ours.cpu['driver_cpu_s'] * 1e6 / rows:.0f}"),
    ]


def metrics_quota_sliding(sc: Scenario, ours: Run, base: Run, rows: int, sim_settings: dict[str, Any]) -> list[Record]:
    rpm, window = sim_settings["rpm_limit"], sim_settings["window_s"]
    ideal = (math.ceil(rows / rpm) - 1) * window
    return [
        _record(sc, "quota_violations", ours.snapshot["quota_violations"], "requests", "== 0", base.snapshot["quota_violations"],
                rows, ours.failed, f"requests the server refused 429 for its sliding-window RPM ({rpm} per {window:g} s)"),
        _record(sc, "elapsed_over_ideal", ours.elapsed_s / ideal if ideal else 0.0, "ratio", None,
                base.elapsed_s / ideal if ideal else None, rows, ours.failed,
                f"{ours.elapsed_s:.1f} s ours, {base.elapsed_s:.1f} s baseline vs {ideal:.0f} s: the last of {rows:,} requests "
                f"can go no earlier than {math.ceil(rows / rpm) - 1} windows after the first"),
    ]


def _whole_run_records(sc: Scenario, ours: Run, base: Run, rows: int, client: dict[str, Any], suffix: str = "") -> list[Record]:
    """What the provider saw of the whole run: peak in flight vs max_concurrency, quota 429s, the 429 share, the first request."""
    cap = client["max_concurrency"]
    so, sb = ours.snapshot, base.snapshot
    share_o = so["rate_limited"] / so["requests"] if so["requests"] else 0.0
    share_b = sb["rate_limited"] / sb["requests"] if sb["requests"] else 0.0
    first = ours.extra.get("first_request_s")
    return [
        _record(sc, f"peak_in_flight{suffix}", so["peak_offered"], "requests", f"<= {cap}", sb["peak_offered"], rows, ours.failed,
                f"the most requests of this job open at the server at once (those its cap refused included) vs "
                f"max_concurrency {cap}; the cap refused {so['concurrency_rejections']} ours, {sb['concurrency_rejections']} baseline"),
        _record(sc, f"quota_429s{suffix}", so["quota_violations"], "requests", "== 0", sb["quota_violations"], rows, ours.failed,
                "429s the server sent for its requests/tokens quota over the whole run"),
        _record(sc, f"share_429_whole_job{suffix}", share_o, "share", None, share_b, rows, ours.failed,
                f"429s / requests over the whole run, start-up included (ours {so['rate_limited']:,}/{so['requests']:,}; "
                f"baseline {sb['rate_limited']:,}/{sb['requests']:,})"),
        _record(sc, f"first_request_s{suffix}", first if first is not None else float("nan"), "s", None, None, rows, ours.failed,
                "from the query's start to the server's first request from it (warm Python workers)"),
    ]


METRICS: dict[str, Callable[..., list[Record]]] = {
    "latency_bound": metrics_latency_bound,
    "unknown_capacity": metrics_unknown_capacity,
    "faults": metrics_faults,
    "zero_latency": metrics_zero_latency,
}


# -- driver ------------------------------------------------------------------------------------


def run_both(spark: Any, sc: Scenario, texts: list[str], sim_settings: dict[str, Any], warm_url: str,
             client: dict[str, Any]) -> tuple[Run, Run]:
    """Ours, then the baseline (or both at once for ``parallel_baseline``), each on a fresh simulator."""
    from ai_query.testing import ProviderSimulator

    with ProviderSimulator(api_key=API_KEY, **sim_settings) as sim_o, ProviderSimulator(api_key=API_KEY, **sim_settings) as sim_b:
        if sc.parallel_baseline:
            meter = BackgroundLoad().start()
            sim_b.reset()
            sampler_b = SimSampler(sim_b).start()
            proc = start_baseline(sc, len(texts), sim_b)
            ours = run_ours(spark, sc, texts, sim_o, warm_url, client)
            base = finish_baseline(proc, sim_b, sampler_b)
            ours.extra["others_cores"] = base.extra["others_cores"] = meter.stop()
        else:
            meter = BackgroundLoad().start()
            ours = run_ours(spark, sc, texts, sim_o, warm_url, client)
            ours.extra["others_cores"] = meter.stop()
            sim_b.reset()
            meter = BackgroundLoad().start()
            sampler_b = SimSampler(sim_b).start()
            base = finish_baseline(start_baseline(sc, len(texts), sim_b), sim_b, sampler_b)
            base.extra["others_cores"] = meter.stop()
    return ours, base


def _metrics(sc: Scenario, ours: Run, base: Run, rows: int, sim_settings: dict[str, Any]) -> list[Record]:
    if sc.name == "quota":
        return metrics_quota(sc, ours, base, rows, sim_settings)
    if sc.name == "quota_sliding":
        return metrics_quota_sliding(sc, ours, base, rows, sim_settings)
    return METRICS[sc.name](sc, ours, base, rows)


def run_scenario(spark: Any, sc: Scenario, quick: bool, warm_url: str, log: Callable[[str], None],
                 wait_quiet: bool = False, rows_scale: int = 1, rows_override: int | None = None) -> tuple[list[Record], dict[str, Any]]:
    rows = rows_override or (sc.quick_rows if quick else sc.rows) * rows_scale
    sim_settings = {**sc.sim, **(sc.quick_sim if quick else {})}
    client = {**sc.client, **(sc.quick_client if quick else {})}
    texts = prompts(rows, sc.words)
    log(f"[{sc.name}] {rows:,} rows: {sc.summary}")
    if wait_quiet:
        load = BackgroundLoad.wait_for_quiet(log=lambda m: log(f"[{sc.name}] {m}"))
        log(f"[{sc.name}] others use {load:.2f} cores: starting")
    ours, base = run_both(spark, sc, texts, sim_settings, warm_url, client)
    log(f"[{sc.name}]   ours {ours.ok:,}/{rows:,} ok in {ours.elapsed_s:.1f} s ({ours.ok / ours.elapsed_s:.0f}/s), "
        f"failures {ours.failures or 0}; server: {ours.snapshot['requests']:,} requests, {ours.snapshot['rate_limited']:,} 429s, "
        f"peak in flight {ours.snapshot['peak_concurrency']}; others used {ours.extra['others_cores']:.2f} cores")
    log(f"[{sc.name}]   baseline {base.ok:,}/{rows:,} ok in {base.elapsed_s:.1f} s ({base.ok / base.elapsed_s:.0f}/s), "
        f"failures {base.failures or 0}; server: {base.snapshot['requests']:,} requests, {base.snapshot['rate_limited']:,} 429s, "
        f"peak in flight {base.snapshot['peak_concurrency']}; others used {base.extra['others_cores']:.2f} cores")
    records = _metrics(sc, ours, base, rows, sim_settings) + _whole_run_records(sc, ours, base, rows, client) \
        + _common_records(sc, ours, base, rows)
    short_rows = rows_override or sc.short_rows
    if sc.short_rows is not None and not quick and rows_scale == 1:
        assert short_rows is not None
        short_texts = prompts(short_rows, sc.words)
        log(f"[{sc.name}] the same on a short job: {short_rows:,} rows")
        s_ours, s_base = run_both(spark, sc, short_texts, sim_settings, warm_url, client)
        goals = dict(sc.short_goals)
        when = (f"on a {short_rows:,}-row job ({s_ours.elapsed_s:.1f} s ours, {s_base.elapsed_s:.1f} s baseline; the server saw "
                f"our last request {s_ours.elapsed_s - (s_ours.extra['last_request_s'] or 0):.2f} s before it ended; failed rows "
                f"{s_ours.failed} ours, {s_base.failed} baseline)")
        short = [*_metrics(sc, s_ours, s_base, short_rows, sim_settings)[:1], *_whole_run_records(sc, s_ours, s_base, short_rows, client)]
        for i, r in enumerate(short):
            goal = goals.get(r.metric, r.goal)
            records.insert(1 + i, Record(sc.name, f"{r.metric}_short_job", r.value, r.unit, goal, r.baseline, r.ratio, short_rows,
                                         s_ours.failed, goal_met(r.value, goal), f"{r.notes}; {when}"))
        log(f"[{sc.name}]   short job: " + ", ".join(f"{r.metric} {r.value}" for r in short))
    records.append(Record(sc.name, "others_cpu_load", round(ours.extra["others_cores"], 2), "cores", None,
                          round(base.extra["others_cores"], 2), None, rows, ours.failed, None,
                          "CPU used by processes not of this benchmark during the run (the machine has 2 cores)"))
    tokens_match = ours.total_tokens == ours.snapshot["total_tokens"]
    records.append(Record(sc.name, "tokens_match_server", int(tokens_match), "bool", "== 1", None, None, rows, ours.failed,
                          goal_met(int(tokens_match), "== 1"),
                          f"sum of aiq_total_tokens {ours.total_tokens:,} vs the simulator's {ours.snapshot['total_tokens']:,}"))
    detail = {
        "rows": rows, "sim": sim_settings, "client_config": client, "baseline_concurrency": sc.baseline_concurrency,
        "ours": {"elapsed_s": ours.elapsed_s, "ok": ours.ok, "failures": ours.failures, "cpu": ours.cpu, "attempts": ours.attempts,
                 "server": {k: ours.snapshot[k] for k in ("requests", "ok", "by_status", "faults", "rate_limited", "quota_violations",
                                                          "peak_concurrency", "peak_offered", "admitted_by_window",
                                                          "admitted_tokens_by_window")},
                 "timeline_t_inflight_okps": ours.sampler.series(1.0)},
        "baseline": {"elapsed_s": base.elapsed_s, "ok": base.ok, "failures": base.failures, "cpu": base.cpu,
                     "server": {k: base.snapshot[k] for k in ("requests", "ok", "by_status", "faults", "rate_limited", "quota_violations",
                                                              "peak_concurrency", "admitted_by_window", "admitted_tokens_by_window")},
                     "timeline_t_inflight_okps": base.sampler.series(1.0)},
    }
    return records, detail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", action="append", choices=list(SCENARIOS), help="run only this scenario (repeatable)")
    parser.add_argument("--quick", action="store_true", help="small row counts, a smoke run; results are not written unless --out")
    parser.add_argument("--rows-scale", type=int, default=1, metavar="K",
                        help="K times each scenario's rows: a longer job, where the fixed cost at its edges weighs less; "
                             "results are not written unless --out")
    parser.add_argument("--rows", type=int, default=None, metavar="N",
                        help="N rows in each run, the short job's too: a smoke run; results are not written unless --out")
    parser.add_argument("--out", type=Path, default=None, help=f"results folder (default {RESULTS} for a full run)")
    parser.add_argument("--details", action="store_true", help="also write endpoints.details.json (timelines, server counters)")
    parser.add_argument("--wait-quiet", action="store_true",
                        help="before each scenario, wait (up to 10 min) until other processes use under 0.25 cores")
    parser.add_argument("--render", action="store_true", help="only rewrite endpoints.md from endpoints.json (in --out or results/)")
    parser.add_argument("--baseline-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.baseline_json:  # the baseline child process
        print(json.dumps(run_baseline(json.loads(args.baseline_json))), flush=True)
        return 0

    if args.render:
        write_results(args.out or RESULTS, [], {}, "", 0.0, merge=True, scenarios=SCENARIOS)
        return 0
    started = time.monotonic()
    code = code_version()  # now: the Python workers import the project once, at the first query
    command = ("python bench/endpoints.py" + "".join(f" --scenario {s}" for s in args.scenario or [])
               + (" --quick" if args.quick else "") + (f" --rows-scale {args.rows_scale}" if args.rows_scale != 1 else "")
               + (f" --rows {args.rows}" if args.rows else "")
               + (" --wait-quiet" if args.wait_quiet else ""))
    os.environ[SECRET_ENV] = API_KEY  # before the JVM starts, so the Python workers inherit it

    def log(msg: str) -> None:
        print(f"{time.monotonic() - started:7.1f}s {msg}", flush=True)

    import spark_udfs
    from ai_query.testing import ProviderSimulator

    spark = spark_udfs.build_session(app_name="ai-query-bench")
    log(f"Spark {spark.version} {spark.sparkContext.master}, defaultParallelism {spark.sparkContext.defaultParallelism}")
    names = args.scenario or list(SCENARIOS)
    records: list[Record] = []
    details: dict[str, Any] = {}
    with ProviderSimulator(api_key=API_KEY) as warm:
        for name in names:
            recs, detail = run_scenario(spark, SCENARIOS[name], args.quick, warm.base_url, log, args.wait_quiet, args.rows_scale,
                                        args.rows)
            records += recs
            details[name] = detail
    spark.stop()
    wall = time.monotonic() - started
    for r in records:
        flag = "" if r.met is None else (" ok" if r.met else " MISSED")
        print(f"  {r.scenario:17} {r.metric:30} {r.value!s:>10} {r.unit:8} goal {r.goal or '-':8} baseline {r.baseline!s:>10}{flag}")
    log("done")

    out = args.out or (None if args.quick or args.rows_scale != 1 or args.rows else RESULTS)
    if out is not None:
        write_results(out, records, details, command, wall, merge=bool(args.scenario), with_details=args.details,
                      code=code, scenarios=SCENARIOS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
