"""Object storage vs local paths: the same incremental job with everything on ``s3://`` or on local disk.

    python bench/storage.py                  # writes bench/results/storage.{json,md}
    python bench/storage.py --wait-quiet     # each run started only on a quiet machine
    python bench/storage.py --rows 300 --out /tmp/s  # smoke run (writes only to --out)

The job is the incremental job users run (``run_incremental``: a ``[prompt]`` over a Delta
source, ``key``, ``merge``, usage and payload tables, a journal, staged usage, a run log), over
``--rows`` sample reviews, against ``ai_query.testing.ProviderSimulator`` at zero latency, so that
what differs between the arms is storage: the source read, each chunk's commits (usage, payloads,
output merge), the journal the executors write, the run log. The S3 arm talks to a real
S3-compatible server started here (moto in server mode on 127.0.0.1, ``tests/s3_server.py``),
with credentials from the environment (``AWS_*``), through delta-rs and pyarrow.fs exactly as a
job on AWS would; the local arm uses a temporary directory. The arms alternate (local, s3, local,
s3, ...) in one Spark ``local[2]`` session, each on fresh paths (a new bucket, a new directory);
the metric is the median rows/s of the S3 runs over that of the local runs (goal >= 0.9).

What this does not measure: a real object store's latency (moto answers from memory on the same
host, in milliseconds; AWS S3 takes 10-100 ms per request), so the ratio here is the cost of the
code path (more requests, no append or rename), not of a network.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import textwrap
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from _common import BackgroundLoad, Record, goal_met, machine, markdown  # noqa: E402 - bench/ is not a package

RESULTS = Path(__file__).resolve().parent / "results"


def endpoints_json(base_url: str) -> dict[str, Any]:
    return {"name": "sim-chat", "config": {"served_entities": [{
        "name": "sim", "external_model": {"name": "sim-model", "provider": "openai", "task": "llm/v1/chat",
                                          "openai_config": {"openai_api_key": "{{secrets/bench/key}}",
                                                            "openai_api_base": base_url}}}]},
        "client_config": {"max_concurrency": 64, "initial_concurrency": 64}}


def write_job(workdir: Path, base: str, sim_url: str, chunk_rows: int) -> Path:
    """A job spec under ``workdir`` whose source, output and state are under ``base`` (a directory or ``s3://bucket``)."""
    (workdir / "endpoints.json").write_text(json.dumps(endpoints_json(sim_url)))
    job = workdir / "job.toml"
    job.write_text(textwrap.dedent(f'''
        name = "storage-bench"
        endpoints = "endpoints.json"
        key = ["review_id"]
        [prompt]
        endpoint = "sim-chat"
        template = "Review {{review_id}} of {{product}}: {{review}}"
        column = "answer"
        max_tokens = 12
        [sources]
        reviews = "{base}/reviews"
        [output]
        path = "{base}/out"
        mode = "merge"
        inference_path = "{base}/payloads"
        [options]
        chunk_rows = {chunk_rows}
    '''))
    return job


def run_arm(spark: Any, arm: str, base: str, rows: int, chunk_rows: int, wait_quiet: bool, log: Any) -> dict[str, Any]:
    from ai_query.testing import ProviderSimulator
    from batch_runner import JobSpec, run_incremental, write_sample_reviews

    write_sample_reviews(f"{base}/reviews", rows=rows)
    quiet = BackgroundLoad.wait_for_quiet(log=log) if wait_quiet else None
    with ProviderSimulator(api_key="sk-sim", seed=11) as sim, tempfile.TemporaryDirectory(prefix="aiq-storage-bench-") as work:
        spec = JobSpec.load(write_job(Path(work), base, sim.base_url, chunk_rows))
        load = BackgroundLoad().start()
        t0 = time.monotonic()
        report = run_incremental(spec, spark, progress=False)
        elapsed = time.monotonic() - t0
        others = load.stop()
        served = sim.snapshot()["ok"]
    assert report.rows == rows and report.table_rows == rows, (report.rows, report.table_rows)
    assert served == rows, f"the simulator served {served} answers for {rows} rows"
    return {"arm": arm, "rows": report.rows, "ok": report.rows_ok, "chunks": report.chunks, "elapsed_s": elapsed,
            "rows_per_s": report.rows / elapsed, "others_cores": others, "quiet_before": quiet}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000, help="rows of the job (default 10,000)")
    parser.add_argument("--chunk-rows", type=int, default=1000, help="rows per chunk, one set of Delta commits each (default 1,000)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each arm, alternating (default 2)")
    parser.add_argument("--wait-quiet", action="store_true", help="start each run only when other processes use < 0.25 cores")
    parser.add_argument("--out", type=Path, default=None, help=f"results folder (default {RESULTS}; a run with --rows "
                        "other than 10,000 writes only to --out)")
    args = parser.parse_args(argv)
    started = time.monotonic()

    def log(msg: str) -> None:
        print(f"{time.monotonic() - started:7.1f}s {msg}", flush=True)

    from tests.s3_server import S3Server, s3_environment

    os.environ.update(s3_environment())  # before Spark starts: its Python workers inherit AWS_*
    os.environ["AIQ_SECRET_BENCH_KEY"] = "sk-sim"
    import spark_udfs

    runs: list[dict[str, Any]] = []
    with S3Server(os.environ["AWS_ENDPOINT_URL"]) as s3, tempfile.TemporaryDirectory(prefix="aiq-storage-bench-") as local_root:
        spark = spark_udfs.build_session(app_name="ai-query-storage-bench", ui=False)
        try:
            log("warming up (a small job on each arm)")
            run_arm(spark, "warm-local", f"{local_root}/warm", 200, 100, False, log)
            run_arm(spark, "warm-s3", f"s3://{s3.bucket()}", 200, 100, False, log)
            for rep in range(args.repeats):
                for arm in ("local", "s3"):
                    base = f"{local_root}/{arm}{rep}" if arm == "local" else f"s3://{s3.bucket()}"
                    res = run_arm(spark, arm, base, args.rows, args.chunk_rows, args.wait_quiet, log)
                    runs.append(res)
                    log(f"{arm:>5} rep {rep}: {res['rows']} rows in {res['chunks']} chunks, {res['elapsed_s']:.1f} s = "
                        f"{res['rows_per_s']:.1f} rows/s, others {res['others_cores']:.2f} cores")
        finally:
            spark.stop()

    def med(arm: str) -> float:
        return statistics.median(r["rows_per_s"] for r in runs if r["arm"] == arm)

    s3_rate, local_rate = med("s3"), med("local")
    ratio = round(s3_rate / local_rate, 3)
    others = max(r["others_cores"] for r in runs)
    setup = (f"{args.rows} rows, chunk_rows {args.chunk_rows}, [prompt] job (merge by key, usage + payload tables, journal, "
             f"run log); simulator at zero latency; Spark local[2]; S3 = moto server on 127.0.0.1")
    records = [
        Record("object_storage", "s3_over_local_rows_per_s", ratio, "ratio", ">= 0.9", 1.0, None, args.rows, None,
               notes=f"median rows/s with everything on s3:// over the same job on local paths ({args.repeats} alternating runs each); {setup}"),
        Record("object_storage", "rows_per_s", round(s3_rate, 1), "rows/s", None, round(local_rate, 1), ratio, args.rows,
               args.rows - int(statistics.median(r["ok"] for r in runs if r["arm"] == "s3")),
               notes="ours = everything on s3://; baseline = local paths"),
        Record("object_storage", "others_cpu_load", round(others, 2), "cores", None, None, None, args.rows, None,
               notes="the most CPU used by processes not of this benchmark during any run (the machine has 2 cores)"),
    ]
    for r in records:
        r.met = goal_met(r.value, r.goal)
        print(f"  {r.metric:26} {r.value!s:>8} {r.unit:7} goal {r.goal or '-':7} baseline {r.baseline}")
    if args.out is None and args.rows != 10_000:
        return 0
    out = args.out or RESULTS
    out.mkdir(parents=True, exist_ok=True)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python bench/storage.py" + (" --wait-quiet" if args.wait_quiet else "") + (
        f" --rows {args.rows}" if args.rows != 10_000 else "")
    meta = {"date": date, "machine": machine(), "command": command, "wall_s": round(time.monotonic() - started)}
    (out / "storage.json").write_text(json.dumps([{**r.as_dict(), **meta, "runs": runs} for r in records], indent=1) + "\n")
    md = markdown(records, date=date, command=command, machine_line=meta["machine"], wall_s=meta["wall_s"],
                  title="Object storage benchmark results",
                  preamble=[f"- workload: {setup}", "- runs (alternating):"]
                  + [f"  - {r['arm']}: {r['rows']} rows, {r['chunks']} chunks, {r['elapsed_s']:.1f} s, {r['rows_per_s']:.1f} rows/s, "
                     f"others {r['others_cores']:.2f} cores" for r in runs])
    (out / "storage.md").write_text(md)
    log(f"wrote {out / 'storage.json'} and {out / 'storage.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
