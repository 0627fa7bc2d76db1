"""The co-located vLLM pool against raw vLLM: the same prompts through (a) ``vllm.LLM`` itself,
(b) our offline mode from Spark SQL, (c) our server pool from Spark SQL; and a shared-prefix
workload through offline mode with and without prefix grouping.

::

    python bench/vllm_pool.py [--rows 512] [--max-tokens 32] [--replicas 2] [--wait-quiet]

Every phase runs in a child process of its own (engines die with it, so at most ``replicas``
engines exist at any time, and each phase starts from a cold machine state):

- ``raw``: one ``vllm.LLM`` on all the cores, ``llm.chat(all prompts)``;
- ``offline``: Spark ``local[R]``, a ``vllm_pool`` endpoint in ``offline`` mode with ``R`` replicas
  (each Python worker runs ``vllm.LLM`` in-process on its share of the cores);
- ``pool``: Spark ``local[R]``, the same endpoint in ``server`` mode (R vLLM servers, one per share
  of the cores, routed with prefix affinity and latency-gradient concurrency);
- ``prefix``: like ``offline`` on a workload where 8 long documents prefix the prompts, once with
  ``group_by_prefix`` and once without.

Engine and pool start-up are excluded everywhere (each phase warms up first and times a second
pass; start-up times are reported in the notes). Same model, dtype, ``max_model_len``, KV cache
size and sampling (temperature 0) in every phase. Results: ``bench/results/vllm_pool.json`` and
``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BackgroundLoad, Record, goal_met, machine, prompts  # noqa: E402

HERE = Path(__file__).resolve().parent
MODEL = "smollm2-135m-instruct"
DOCS = [
    (f"Document {d}. " + " ".join(f"Section {d}.{k}: the {w} report says revenue grew in region {k} while costs in unit {d} stayed flat."
                                  for k, w in zip(range(12), "quarterly annual weekly daily audit board market sales field tax risk ops".split())))
    for d in range(8)
]


def shared_prefix_prompts(rows: int) -> list[str]:
    """8 long documents (~1,200 characters each) interleaved, each followed by its own question."""
    return [f"{DOCS[i % 8]}\n\nQuestion {i}: in five words, what happened in section {i % 8}.{i % 12}?" for i in range(rows)]


def engine_options(dtype: str) -> dict[str, Any]:
    return {"dtype": dtype, "max_model_len": 2048, "kv_cache_gib": 2}


# -- phases (each in its own process) -------------------------------------------------------------


def phase_raw(spec: dict[str, Any]) -> dict[str, Any]:
    os.environ.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": str(spec["options"]["kv_cache_gib"]),
                       "VLLM_CPU_OMP_THREADS_BIND": f"0-{os.cpu_count() - 1}", "HF_HUB_OFFLINE": "1"})
    import gpu_workers
    from vllm import LLM, SamplingParams

    t0 = time.monotonic()
    llm = LLM(model=str(gpu_workers.prepare_model(MODEL)), dtype=spec["options"]["dtype"], max_model_len=2048,
              enforce_eager=True, seed=0)
    started = time.monotonic() - t0
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0)
    texts = spec["prompts"]
    llm.chat([[{"role": "user", "content": t}] for t in texts[:16]], params, use_tqdm=False)  # warm-up
    t0 = time.monotonic()
    outs = llm.chat([[{"role": "user", "content": t}] for t in texts], params, use_tqdm=False)
    elapsed = time.monotonic() - t0
    return {"elapsed_s": elapsed, "rows": len(outs), "ok": sum(1 for o in outs if o.outputs[0].text),
            "completion_tokens": sum(len(o.outputs[0].token_ids) for o in outs), "startup_s": started,
            "texts": [o.outputs[0].text for o in outs]}


def phase_sql(spec: dict[str, Any]) -> dict[str, Any]:
    import spark_udfs
    from ai_query import EndpointRegistry

    replicas = spec["replicas"]
    spark = spark_udfs.build_session(f"local[{replicas}]", app_name=f"bench-vllm-pool-{spec['phase']}")
    endpoints = [{"name": name, "config": {"served_entities": [{"vllm_pool": pool}]},
                  "client_config": {"max_concurrency": 256, "initial_concurrency": 32, "request_timeout_s": 600}}
                 for name, pool in spec["endpoints"].items()]
    spark_udfs.register(spark, EndpointRegistry.default().with_endpoints(EndpointRegistry.from_data(endpoints)))
    texts = spec["prompts"]
    spark.createDataFrame([(i, t) for i, t in enumerate(texts)], "id INT, prompt STRING").repartition(replicas).createOrReplaceTempView("bench_prompts")
    spark.createDataFrame([(i, f"warm up {i}") for i in range(8 * replicas)], "id INT, prompt STRING").repartition(replicas).createOrReplaceTempView("warm")
    out: dict[str, Any] = {}
    for name in spec["endpoints"]:
        query = f"""SELECT id, ai_query('{name}', prompt, modelParameters => named_struct('max_tokens', {spec['max_tokens']},
                    'temperature', 0.0)) AS r FROM {{table}}"""
        t0 = time.monotonic()
        spark_udfs.sql(spark, query.format(table="warm"), audit=True).collect()  # engines / pool start here
        started = time.monotonic() - t0
        spark.table("bench_prompts").cache().count()
        t0 = time.monotonic()
        rows = spark_udfs.sql(spark, query.format(table="bench_prompts"), audit=True).collect()
        elapsed = time.monotonic() - t0
        rows.sort(key=lambda r: r.id)
        out[name] = {"elapsed_s": elapsed, "rows": len(rows), "ok": sum(r.r.aiq_status == "ok" for r in rows),
                     "completion_tokens": sum(r.r.aiq_completion_tokens for r in rows), "startup_s": started,
                     "texts": [r.r.response for r in rows]}
    spark.stop()
    return out


def run_phase(spec: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """Run a phase in a child process; (its result, CPU cores used by others meanwhile)."""
    load = BackgroundLoad().start()
    # The spec goes through stdin: the prompts of a phase are too long for a command line.
    proc = subprocess.run([sys.executable, __file__, "--phase-json", "-"], input=json.dumps(spec), capture_output=True,
                          text=True, timeout=3600, check=False)
    others = load.stop()
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"phase {spec['phase']} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):]), others


# -- the orchestration ----------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--replicas", type=int, default=2, help="engines on this node in offline and server modes")
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16 (fast on CPU) or float32")
    parser.add_argument("--wait-quiet", action="store_true", help="wait until other processes use < 0.25 cores")
    parser.add_argument("--skip", action="append", default=[], choices=["raw", "offline", "pool", "prefix"])
    parser.add_argument("--state", type=Path, default=HERE / "results" / ".vllm_pool_phases.json",
                        help="finished phases are kept here and reused by the next run with the same settings (--fresh: redo all)")
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--phase-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase_json:
        spec = json.loads(sys.stdin.read() if args.phase_json == "-" else args.phase_json)
        result = phase_raw(spec) if spec["phase"] == "raw" else phase_sql(spec)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    if args.wait_quiet:
        print(f"others' load before start: {BackgroundLoad.wait_for_quiet():.2f} cores", flush=True)
    started = time.monotonic()
    opts = engine_options(args.dtype)
    pool = {"model": MODEL, "task": "llm/v1/chat", "replicas": args.replicas, "options": opts}
    texts = prompts(args.rows, (6, 24))
    base = {"max_tokens": args.max_tokens, "options": opts, "replicas": args.replicas}
    settings = {"rows": args.rows, "max_tokens": args.max_tokens, "replicas": args.replicas, "dtype": args.dtype}
    saved = json.loads(args.state.read_text()) if args.state.exists() and not args.fresh else {}
    if saved.get("settings") != settings:
        saved = {"settings": settings, "phases": {}}
    results: dict[str, Any] = {}
    loads: dict[str, float] = {}
    for phase in ("raw", "offline", "pool", "prefix"):
        if phase in args.skip:
            continue
        if phase in saved["phases"]:
            kept = saved["phases"][phase]
            results.update(kept["results"])
            loads[phase] = kept["others_load"]
            print(f"phase {phase}: kept from {kept['date']}", flush=True)
            continue
        if phase == "raw":
            spec = {**base, "phase": "raw", "prompts": texts}
        elif phase in ("offline", "pool"):
            spec = {**base, "phase": phase, "prompts": texts,
                    "endpoints": {phase: {**pool, "mode": "offline" if phase == "offline" else "server"}}}
        else:
            spec = {**base, "phase": "prefix", "prompts": shared_prefix_prompts(args.rows),
                    "endpoints": {"prefix_grouped": {**pool, "mode": "offline", "group_by_prefix": True},
                                  "prefix_ungrouped": {**pool, "mode": "offline", "group_by_prefix": False}}}
        print(f"{time.strftime('%H:%M:%S')} phase {phase} ...", flush=True)
        out, loads[phase] = run_phase(spec)
        results.update({phase: out} if phase == "raw" else out)
        saved["phases"][phase] = {"results": {phase: out} if phase == "raw" else out, "others_load": loads[phase],
                                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        args.state.parent.mkdir(exist_ok=True)
        args.state.write_text(json.dumps(saved))
        print(f"  {json.dumps({k: {m: v for m, v in r.items() if m != 'texts'} for k, r in ({phase: out} if phase == 'raw' else out).items()})}"
              f"  others' load {loads[phase]:.2f} cores", flush=True)
    records = build_records(results, loads, args)
    write(records, args, time.monotonic() - started)
    return 0


def rate(r: dict[str, Any]) -> float:
    return r["ok"] / r["elapsed_s"]


def build_records(results: dict[str, Any], loads: dict[str, float], args: argparse.Namespace) -> list[Record]:
    records: list[Record] = []
    raw = results.get("raw")
    cfg = f"{args.rows} prompts, max_tokens {args.max_tokens}, temperature 0, {MODEL} {args.dtype}"
    if raw:
        records.append(Record("raw_vllm", "rows_per_s", round(rate(raw), 2), "rows/s", None, None, None, raw["rows"],
                              raw["rows"] - raw["ok"], None,
                              f"vllm.LLM.chat over all prompts, one engine on all cores; {cfg}; engine start {raw['startup_s']:.0f} s "
                              f"(excluded); {raw['completion_tokens']} completion tokens; others' load {loads['raw']:.2f} cores"))
    for name, label in (("offline", "offline_sql"), ("pool", "server_pool_sql")):
        r = results.get(name)
        if not r:
            continue
        how = ("Spark local[{0}], vllm_pool offline: {0} in-process engines (one per Python worker, one core each)"
               if name == "offline" else "Spark local[{0}], vllm_pool server: {0} vLLM servers (one core each), prefix-affinity routing, "
               "latency-gradient concurrency").format(args.replicas)
        same = sum(a == b for a, b in zip(r["texts"], raw["texts"])) if raw and "texts" in r and "texts" in raw else None
        records.append(Record(label, "rows_per_s", round(rate(r), 2), "rows/s", None, round(rate(raw), 2) if raw else None,
                              round(rate(r) / rate(raw), 3) if raw else None, r["rows"], r["rows"] - r["ok"], None,
                              f"{how}; warm (start-up {r['startup_s']:.0f} s excluded); {r['completion_tokens']} completion tokens; "
                              f"others' load {loads[name]:.2f} cores"))
        if raw:
            ratio = rate(r) / rate(raw)
            records.append(Record(label, "over_raw_vllm", round(ratio, 3), "ratio", ">= 0.9", 1.0, None, r["rows"],
                                  r["rows"] - r["ok"], goal_met(ratio, ">= 0.9"),
                                  f"rows/s of {label} / rows/s of raw vllm.LLM; completion tokens {r['completion_tokens']} vs raw "
                                  f"{raw['completion_tokens']}" + (f"; {same}/{r['rows']} answers identical to raw ({args.dtype})"
                                                                   if same is not None else "")))
    g, u = results.get("prefix_grouped"), results.get("prefix_ungrouped")
    if g and u:
        ratio = rate(g) / rate(u)
        records.append(Record("shared_prefix_offline", "grouped_over_ungrouped", round(ratio, 3), "ratio", ">= 1.0",
                              round(rate(u), 2), None, g["rows"], g["rows"] - g["ok"], goal_met(ratio, ">= 1.0"),
                              f"8 documents of ~1,200 characters interleaved before each question; offline mode, {args.replicas} engines; "
                              f"grouped {rate(g):.1f} rows/s vs ungrouped {rate(u):.1f} rows/s (baseline column); "
                              f"others' load {loads['prefix']:.2f} cores"))
    return records


def write(records: list[Record], args: argparse.Namespace, wall: float) -> None:
    code = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "ai_query", "gpu_workers", "spark_udfs"], capture_output=True,
                           text=True, cwd=HERE).stdout.strip()
    stamp = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
             "command": "python bench/vllm_pool.py " + " ".join(a for a in sys.argv[1:]), "code": code + (" + uncommitted" if dirty else "")}
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    data = [{**r.as_dict(), **stamp} for r in records]
    (out / "vllm_pool.json").write_text(json.dumps(data, indent=1) + "\n")
    lines = [
        "# vLLM pool benchmark results", "",
        f"- date: {stamp['date']}", f"- machine: {stamp['machine']}", f"- command: `{stamp['command']}`",
        f"- code: {stamp['code']}", f"- wall time of the run: {wall:.0f} s", "",
        "| scenario | metric | value | unit | goal | met | baseline | ratio | rows | failed | notes |",
        "| --- | --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in records:
        met = "" if r.met is None else ("yes" if r.met else "**no**")
        cells = [r.scenario, r.metric, r.value, r.unit, r.goal or "", met, "" if r.baseline is None else r.baseline,
                 "" if r.ratio is None else r.ratio, r.rows, r.failed_rows, r.notes]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    (out / "vllm_pool.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[8:]))


if __name__ == "__main__":
    sys.exit(main())
