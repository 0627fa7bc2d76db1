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
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from _common import Record, alternating, goal_met, load_note, median, quiet_measure, write_results  # noqa: E402 - bench/ is not a package

RESULTS = Path(__file__).resolve().parent / "results"


def run_arm(spark: Any, arm: str, root: Path, bucket: str | None, rows: int, chunk_rows: int, wait_quiet: bool,
            log: Any, server_pid: int | None = None) -> dict[str, Any]:
    """One run of the job (the tests' resume job, ``tests/spark/test_job_resume.py``) on fresh paths:
    under ``root`` locally, or (``bucket``) its source, output, payloads and state in the bucket.
    ``server_pid``: the S3 server's process, whose CPU during the run is reported (``store_cores``:
    on this machine the store shares the two cores with the job, which a real S3 does not)."""
    import psutil
    from ai_query.testing import ProviderSimulator
    from batch_runner import JobSpec, run_incremental
    from tests.spark.test_job_resume import write_job
    from tests.spark.test_s3 import _s3_job

    root.mkdir(parents=True)
    with ProviderSimulator(api_key="sk-sim", seed=11) as sim:
        job = _s3_job(root, sim, bucket, rows, chunk_rows)[0] if bucket else write_job(root, sim, rows=rows, chunk=chunk_rows)
        spec = JobSpec.load(job)

        server = psutil.Process(server_pid) if server_pid else None

        def run() -> tuple[Any, float, float]:
            cpu0 = sum(server.cpu_times()[:2]) if server else 0.0
            t0 = time.monotonic()
            report = run_incremental(spec, spark, progress=False)
            elapsed = time.monotonic() - t0
            return report, elapsed, (sum(server.cpu_times()[:2]) - cpu0 if server else 0.0)

        (report, elapsed, server_cpu), others, quiet = quiet_measure(run, wait_quiet=wait_quiet, log=log)
        served = sim.snapshot()["ok"]
    assert report.rows == rows and report.table_rows == rows, (report.rows, report.table_rows)
    assert served == rows, f"the simulator served {served} answers for {rows} rows"
    return {"arm": arm, "rows": report.rows, "ok": report.rows_ok, "chunks": report.chunks, "elapsed_s": elapsed,
            "rows_per_s": report.rows / elapsed, "others_cores": others, "quiet_before": quiet,
            "store_cores": round(server_cpu / elapsed, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000, help="rows of the job (default 10,000)")
    parser.add_argument("--chunk-rows", type=int, default=1000, help="rows per chunk, one set of Delta commits each (default 1,000)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each arm, alternating (default 5: a run varies by 10 %% and more)")
    parser.add_argument("--wait-quiet", action="store_true", help="start each run only when other processes use < 0.25 cores")
    parser.add_argument("--out", type=Path, default=None, help=f"results folder (default {RESULTS}; a run with --rows "
                        "other than 10,000 writes only to --out)")
    args = parser.parse_args(argv)
    started = time.monotonic()

    def log(msg: str) -> None:
        print(f"{time.monotonic() - started:7.1f}s {msg}", flush=True)

    from tests.s3_server import S3Server, s3_environment

    os.environ.update(s3_environment())  # before Spark starts: its Python workers inherit AWS_*
    os.environ["AIQ_SECRET_SIM_KEY"] = "sk-sim"
    import spark_udfs

    runs: list[dict[str, Any]] = []
    with S3Server(os.environ["AWS_ENDPOINT_URL"]) as s3, tempfile.TemporaryDirectory(prefix="aiq-storage-bench-") as local_root:
        spark = spark_udfs.build_session(app_name="ai-query-storage-bench", ui=False)
        try:
            # a job of the measured size on each arm first: the JVM's JIT and the Python workers warm
            # up (the first big run of a fresh session was 20-30% slower whichever arm it was; after
            # a 2,000-row warm-up the first measured round still was, and it is the local arm's)
            warm = args.rows
            log(f"warming up (a {warm}-row job on each arm)")
            run_arm(spark, "warm-local", Path(local_root, "warm-local"), None, warm, args.chunk_rows, False, log)
            run_arm(spark, "warm-s3", Path(local_root, "warm-s3"), s3.bucket(), warm, args.chunk_rows, False, log)
            for arm, rep in alternating(("local", "s3"), args.repeats):
                bucket = s3.bucket() if arm == "s3" else None
                res = run_arm(spark, arm, Path(local_root, f"{arm}{rep}"), bucket, args.rows, args.chunk_rows,
                              args.wait_quiet, log, server_pid=s3.pid if bucket else None)
                runs.append(res)
                log(f"{arm:>5} rep {rep}: {res['rows']} rows in {res['chunks']} chunks, {res['elapsed_s']:.1f} s = "
                    f"{res['rows_per_s']:.1f} rows/s, others {res['others_cores']:.2f} cores"
                    + (f", S3 server {res['store_cores']:.2f} cores" if bucket else ""))
        finally:
            spark.stop()

    def med(arm: str) -> float:
        return median([r["rows_per_s"] for r in runs if r["arm"] == arm])

    s3_rate, local_rate = med("s3"), med("local")
    ratio = round(s3_rate / local_rate, 3)
    setup = (f"{args.rows} rows, chunk_rows {args.chunk_rows}, [prompt] job (merge by key, usage + payload tables, journal, "
             f"run log; tests/spark/test_job_resume.py's job); simulator at zero latency; Spark local[2]; S3 = moto server on 127.0.0.1")
    s3_runs, local_runs = [r for r in runs if r["arm"] == "s3"], [r for r in runs if r["arm"] == "local"]
    loads = [r["others_cores"] for r in runs]
    local_rates = ", ".join(f"{r['rows_per_s']:.1f}" for r in local_runs)
    store_cores = ", ".join(f"{r['store_cores']:.2f}" for r in s3_runs)
    records = [
        Record("object_storage", "s3_over_local_rows_per_s", ratio, "ratio", ">= 0.9", 1.0, None, args.rows, None,
               values=[round(s["rows_per_s"] / l["rows_per_s"], 3) for s, l in zip(s3_runs, local_runs)], others_cores=loads,
               notes=f"median rows/s with everything on s3:// over the same job on local paths (runs: round by round; arms "
                     f"alternate local, s3); {setup}; {load_note(loads)}"),
        Record("object_storage", "rows_per_s", round(s3_rate, 1), "rows/s", None, round(local_rate, 1), ratio, args.rows,
               args.rows - int(median([r["ok"] for r in s3_runs])),
               values=[round(r["rows_per_s"], 1) for r in s3_runs], others_cores=[r["others_cores"] for r in s3_runs],
               notes=f"ours = everything on s3://, baseline = local paths (its runs: {local_rates}); the S3 server "
                     f"(moto, on the same two cores) used {store_cores} cores"),
    ]
    for r in records:
        r.met = goal_met(r.value, r.goal)
        print(f"  {r.metric:26} {r.value!s:>8} {r.unit:7} goal {r.goal or '-':7} baseline {r.baseline}")
    if args.out is None and args.rows != 10_000:
        return 0
    command = "python bench/storage.py" + (" --wait-quiet" if args.wait_quiet else "") + (
        f" --rows {args.rows}" if args.rows != 10_000 else "") + (
        f" --chunk-rows {args.chunk_rows}" if args.chunk_rows != 1000 else "")
    written = write_results(args.out or RESULTS, "storage", records, runs, command=command, wall_s=time.monotonic() - started,
                            title="Object storage benchmark results",
                            preamble=[f"- workload: {setup}", "- runs (alternating):"]
                            + [f"  - {r['arm']}: {r['rows']} rows, {r['chunks']} chunks, {r['elapsed_s']:.1f} s, "
                               f"{r['rows_per_s']:.1f} rows/s, others {r['others_cores']:.2f} cores"
                               + (f", the S3 server (moto, ours) {r['store_cores']:.2f} cores" if r["arm"] == "s3" else "")
                               for r in runs])
    log(f"wrote {written[0]} and {written[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
