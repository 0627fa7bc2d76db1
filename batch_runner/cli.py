"""The ``ai-query`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Sequence

EXIT_OK = 0
EXIT_SYSTEMIC = 2
EXIT_FAILED_ROWS = 3
EXIT_BUDGET = 4

DESCRIPTION = """\
SQL batch LLM inference on Spark and Delta Lake.

  ai-query sample-data .aiq-demo/reviews       write a sample Delta table of product reviews
  ai-query run examples/reviews.toml           run a job: query -> model endpoint -> Delta table
  ai-query plan examples/reviews.toml          rows to do, estimated tokens, cost and time
  ai-query status examples/reviews.toml        done / failed / pending rows, last runs, usage totals
  ai-query schedule examples/reviews.toml      run the job on its cron schedule (foreground)
  ai-query endpoints                           list the endpoints ai_query can call
  ai-query prepare                             build the embedded local models (once)
  ai-query simulate --port 8000                an OpenAI-compatible provider simulator
  ai-query workers start --model M --replicas N   a pool of vLLM engines on this node (status, stop)
  ai-query serve --port 8080                   serve endpoints in real time (ai-query serve --help)

Exit codes: 0 success; 2 a systemic failure (bad spec, unknown endpoint, bad key, engine down);
3 the job finished but more rows failed than options.allowed_failure_rate allows;
4 the run stopped at options.max_cost_usd / max_tokens (committed rows stay; run again to continue).
"""

RUN_HELP = """\
Run job specs in order, in one Spark session.

A job with key = [...] and output.mode "merge" or "append" is incremental: only rows whose key
is not in the output yet are sent (with --retry-failed also rows whose status is error), in
chunks of options.chunk_rows, each chunk one Delta commit with an app-transaction id. A killed
run loses nothing: run it again and it resumes; answers received before the kill are replayed
from the job's journal, not paid for twice. A finished job sends no requests when re-run.
Usage rows go to the job's endpoint_usage table (output.usage_path).

examples:
  ai-query run job.toml
  ai-query run job.toml --limit 100            try the first 100 pending rows
  ai-query run job.toml --retry-failed         ask again for rows that failed
  ai-query run job.toml --master spark://host:7077
"""


def cluster_conf(master: str | None, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Settings a non-local master needs: executors run this venv's Python with the AIQ_* environment.

    Python workers read secrets (``AIQ_SECRET_*``), the model cache (``AIQ_CACHE_DIR``) and the
    endpoints file (``AIQ_ENDPOINTS``) from their environment, which on a cluster is the
    executor's, not the driver's: ``spark.executorEnv.*`` carries them over.
    """
    if not master or master.startswith("local"):
        return {}
    environ = dict(os.environ if environ is None else environ)
    conf = {"spark.pyspark.python": environ.get("PYSPARK_PYTHON", sys.executable)}
    for name, value in environ.items():
        if name.startswith("AIQ_") or name in ("PYTHONPATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            conf[f"spark.executorEnv.{name}"] = value
    return conf


def _session(args: argparse.Namespace, spec: object) -> object:
    import spark_udfs

    master = getattr(args, "master", None) or spec.master  # type: ignore[attr-defined]
    return spark_udfs.build_session(master, app_name="ai-query", **cluster_conf(master))


def _cmd_run(args: argparse.Namespace) -> int:
    from batch_runner._jobs import run_incremental
    from batch_runner._runner import run_job
    from batch_runner._spec import JobSpec

    specs = [JobSpec.load(p) for p in args.jobs]  # validate every spec before starting anything
    for spec in specs:
        if (args.retry_failed or args.limit is not None) and not spec.incremental:
            raise _config_error(f"{spec.source_file}: --retry-failed and --limit need an incremental job: "
                                "set key = [...] and output.mode = \"merge\" (or \"append\")")
    spark = None
    worst = EXIT_OK
    try:
        for spec in specs:
            if spark is None:
                spark = _session(args, spec)
            if spec.incremental:
                report = run_incremental(spec, spark, retry_failed=args.retry_failed, limit=args.limit,  # type: ignore[arg-type]
                                         progress=not args.no_progress)
                print(report.render(), flush=True)
                failed, rows, rate = report.table_failed, report.table_rows, report.failure_rate
                if report.stopped:
                    print(f"job {spec.name!r} stopped: {report.stopped}", file=sys.stderr)
                    worst = max(worst, EXIT_BUDGET)
            else:
                summary = run_job(spec, spark=spark, progress=not args.no_progress)  # type: ignore[arg-type]
                print(summary.render(), flush=True)
                failed, rows, rate = summary.rows_failed, summary.rows, summary.failure_rate
            if rate > spec.allowed_failure_rate:
                print(
                    f"job {spec.name!r}: {failed} of {rows} rows failed "
                    f"({rate:.1%} > allowed {spec.allowed_failure_rate:.1%}); see aiq_error in {spec.output_path}",
                    file=sys.stderr,
                )
                worst = EXIT_FAILED_ROWS if worst != EXIT_BUDGET else worst
    finally:
        if spark is not None:
            spark.stop()  # type: ignore[attr-defined]
    return worst


def _config_error(message: str) -> Exception:
    from ai_query import ConfigError

    return ConfigError(message)


def _cmd_plan(args: argparse.Namespace) -> int:
    from batch_runner._plan import plan_job
    from batch_runner._spec import JobSpec

    spec = JobSpec.load(args.job)
    spark = _session(args, spec)
    try:
        plan = plan_job(spec, spark, pilot=not args.no_pilot, retry_failed=args.retry_failed, limit=args.limit)  # type: ignore[arg-type]
    finally:
        spark.stop()  # type: ignore[attr-defined]
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.render(), flush=True)
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    from batch_runner._job_state import job_status
    from batch_runner._spec import JobSpec

    spec = JobSpec.load(args.job)
    if not spec.incremental:
        raise _config_error(f"{args.job}: status needs an incremental job (key = [...] and output.mode merge or append)")
    spark = _session(args, spec) if spec.input_sql is not None else None
    try:
        status = job_status(spec, spark)  # type: ignore[arg-type]
    finally:
        if spark is not None:
            spark.stop()  # type: ignore[attr-defined]
    print(status.render(last=args.last), flush=True)
    return EXIT_OK


def _cmd_schedule(args: argparse.Namespace) -> int:
    from batch_runner._schedule import run_schedule
    from batch_runner._spec import JobSpec

    spec = JobSpec.load(args.job)
    cron = args.cron or spec.schedule
    if not cron:
        raise _config_error(f"{args.job}: no schedule; add schedule = \"0 2 * * *\" to the spec or pass --cron")
    command = [sys.executable, "-m", "batch_runner.cli", "run", os.path.abspath(args.job), "--no-progress"]
    if args.master:
        command += ["--master", args.master]
    return run_schedule(cron, command, max_runs=args.max_runs, run_now=args.now)


def _cmd_sample_data(args: argparse.Namespace) -> int:
    from batch_runner._sample import write_sample_reviews

    write_sample_reviews(args.path, rows=args.rows, seed=args.seed)
    print(f"wrote {args.rows} sample reviews to {os.path.abspath(args.path)}")
    return EXIT_OK


def _cmd_endpoints(args: argparse.Namespace) -> int:
    from ai_query import EndpointRegistry

    registry = EndpointRegistry.default(args.endpoints)
    if args.name:
        print(json.dumps(registry.get(args.name).to_dict(), indent=2))
        return EXIT_OK
    width = max(len(n) for n in registry.names())
    for ep in registry:
        e = ep.entity
        kind = "local" if e.local_model else ("vllm_pool" if e.vllm_pool else (e.external_model.provider if e.external_model else "mlflow"))
        print(f"{ep.name:<{width}}  {ep.task:<20}  {kind:<8} {ep.entity.model_name}")
    return EXIT_OK


def _cmd_prepare(args: argparse.Namespace) -> int:
    import time

    import gpu_workers

    for alias in args.models:
        t0 = time.monotonic()
        path = gpu_workers.prepare_model(alias)
        print(f"{alias}: {path} ({time.monotonic() - t0:.1f} s)")
    return EXIT_OK


def _cmd_simulate(args: argparse.Namespace) -> int:
    from ai_query.testing import simulator_main

    return simulator_main(args.simulator_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ai-query", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens (endpoint preparation, Spark)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run one or more job specs (TOML)", description="Run job specs in order, in one Spark session.")
    run.add_argument("jobs", nargs="+", metavar="JOB.toml", help="job spec files")
    run.add_argument("--master", help="Spark master URL (default: the spec's options.master, else local[2])")
    run.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    run.add_argument("--retry-failed", action="store_true", help="also process rows whose status is error (incremental jobs)")
    run.add_argument("--limit", type=int, metavar="N", help="process at most N pending rows in this run (incremental jobs)")
    run.description = RUN_HELP
    run.formatter_class = argparse.RawDescriptionHelpFormatter
    run.set_defaults(func=_cmd_run)

    plan = sub.add_parser(
        "plan", help="estimate rows, tokens, cost and time of the next run",
        description="Estimate the next run of an incremental job: pending rows, and per endpoint the input tokens\n"
                    "(counted with the model's tokenizer when the model is local, else (characters + 1) / 4),\n"
                    "output tokens, cost and duration. A pilot sends options.pilot_rows pending rows (default 20)\n"
                    "through the real query to calibrate the counts; its answers are journaled, so the run\n"
                    "reuses them instead of paying again. --no-pilot sends no request at all.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    plan.add_argument("job", metavar="JOB.toml", help="job spec file")
    plan.add_argument("--no-pilot", action="store_true", help="send no request: estimate from the input text alone")
    plan.add_argument("--retry-failed", action="store_true", help="plan as for run --retry-failed")
    plan.add_argument("--limit", type=int, metavar="N", help="plan as for run --limit N")
    plan.add_argument("--master", help="Spark master URL (default: the spec's options.master, else local[2])")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(func=_cmd_plan)

    status = sub.add_parser(
        "status", help="done / failed / pending rows, last runs, usage totals",
        description="Show an incremental job's state: rows done, failed and pending (pending needs Spark only when the\n"
                    "input is [input] sql), the last runs (an 'interrupted' run was killed), and the totals of its\n"
                    "endpoint_usage table.", formatter_class=argparse.RawDescriptionHelpFormatter)
    status.add_argument("job", metavar="JOB.toml", help="job spec file")
    status.add_argument("--last", type=int, default=5, metavar="N", help="show the last N runs (default 5)")
    status.add_argument("--master", help="Spark master URL, for an [input] sql job")
    status.set_defaults(func=_cmd_status)

    schedule = sub.add_parser(
        "schedule", help="run a job on its cron schedule, in the foreground",
        description="Run `ai-query run JOB.toml` at every time the job's schedule (cron: minute hour day-of-month month\n"
                    "day-of-week; ranges 1-5, steps */15, lists 1,15, names mon/jan, @daily ...) fires, in the\n"
                    "foreground, until Ctrl-C. A firing that comes while a run is still going is skipped. Times are\n"
                    "this machine's local time. For production prefer your scheduler (cron, Airflow: see the README)\n"
                    "calling `ai-query run`; it is the same run.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    schedule.add_argument("job", metavar="JOB.toml", help="job spec file")
    schedule.add_argument("--cron", help="use this cron expression instead of the spec's schedule")
    schedule.add_argument("--now", action="store_true", help="also run once right away")
    schedule.add_argument("--max-runs", type=int, metavar="N", help="exit after N runs (default: run forever)")
    schedule.add_argument("--master", help="Spark master URL passed to each run")
    schedule.set_defaults(func=_cmd_schedule)

    sample = sub.add_parser("sample-data", help="write the sample reviews Delta table", description="Write deterministic sample product reviews as a Delta table.")
    sample.add_argument("path", help="where to write the Delta table (replaced if it exists)")
    sample.add_argument("--rows", type=int, default=240, help="number of reviews (default 240)")
    sample.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    sample.set_defaults(func=_cmd_sample_data)

    endpoints = sub.add_parser("endpoints", help="list endpoints, or show one as JSON", description="List the endpoint registry: built-ins, $AIQ_ENDPOINTS and --endpoints.")
    endpoints.add_argument("name", nargs="?", help="show this endpoint's config (secrets masked)")
    endpoints.add_argument("--endpoints", help="an endpoints JSON file to add")
    endpoints.set_defaults(func=_cmd_endpoints)

    prepare = sub.add_parser("prepare", help="build the embedded local models once", description="Prepare local model folders in the cache ($AIQ_CACHE_DIR, default ~/.cache/ai-query).")
    prepare.add_argument("models", nargs="*", default=["smollm2-135m-instruct", "tiny-llama", "all-minilm-l6-v2"], help="model aliases")
    prepare.set_defaults(func=_cmd_prepare)

    simulate = sub.add_parser(
        "simulate",
        help="run a provider simulator (OpenAI, Anthropic, serving-endpoint wire formats)",
        description="Run the provider simulator; every option after 'simulate' goes to it (ai-query simulate --help).",
        add_help=False,
    )
    simulate.add_argument("simulator_args", nargs=argparse.REMAINDER)
    simulate.set_defaults(func=_cmd_simulate)

    workers = sub.add_parser("workers", help="start|status|stop a pool of vLLM engines on this node",
                             description="Every option after 'workers' goes to it (ai-query workers --help).", add_help=False)
    workers.add_argument("workers_args", nargs=argparse.REMAINDER)
    serve = sub.add_parser(
        "serve",
        help="serve endpoints in real time: invocations, OpenAI-compatible /v1, the management API",
        description="Run the serving endpoint; every option after 'serve' goes to it (ai-query serve --help).",
        add_help=False,
    )
    serve.add_argument("serve_args", nargs=argparse.REMAINDER)
    serve.set_defaults(func=lambda args: _serve(args.serve_args))
    return parser


def _serve(argv: Sequence[str]) -> int:
    from ai_query.serving import serve_main

    return serve_main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["simulate"]:  # the simulator has its own options (and --help)
        from ai_query.testing import simulator_main

        return simulator_main(argv[1:])
    if argv[:1] == ["workers"]:  # gpu_workers owns these subcommands (start|status|stop)
        from gpu_workers import workers_main

        return workers_main(argv[1:])
    if argv[:1] == ["serve"]:  # the server has its own options (and --help)
        return _serve(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ai_query import AIQueryError
    from batch_runner._runner import explain_error

    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except AIQueryError as exc:
        print(f"ai-query: {explain_error(exc)}", file=sys.stderr)
        return EXIT_SYSTEMIC
    except Exception as exc:  # a Spark task failure wraps our error: show its message, not a traceback
        if args.verbose:
            raise
        print(f"ai-query: {explain_error(exc)}", file=sys.stderr)
        return EXIT_SYSTEMIC


if __name__ == "__main__":
    sys.exit(main())
