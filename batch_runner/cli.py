"""``ai-query run / plan / status / schedule / sample-data``: the batch-job commands.

Registered in the ``ai_query.commands`` entry-point group (``ai_query._commands`` parses and
dispatches; ``serve``, ``simulate``, ``workers`` and ``prepare`` come from the packages that own
them). Spark and the job modules are imported when a command runs, never when ``--help`` is built.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Callable

from ai_query import Command, ConfigError

EXIT_OK = 0
EXIT_FAILED_ROWS = 3
EXIT_BUDGET = 4

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

Before Spark starts, every spec is checked and nothing is sent if one fails: output, usage and state
paths writable, secrets set, one input row per key, and each HTTP endpoint answering a free probe
(GET /v1/models, or the serving endpoint's GET) with its key; --no-probe skips the probe.

exit codes: 0 success; 2 a systemic failure (bad spec, unknown endpoint, bad key, engine down);
64 a usage error (the command line);
3 the job finished but more rows failed than options.allowed_failure_rate allows;
4 the run stopped at options.max_cost_usd / max_tokens (committed rows stay; run again to continue).
"""


def cluster_conf(master: str | None, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Settings a non-local master needs: executors run this venv's Python with the AIQ_* environment.

    Python workers read secrets (``AIQ_SECRET_*``), the model cache (``AIQ_CACHE_DIR``) and the
    endpoints file (``AIQ_ENDPOINTS``) and object storage credentials (``AWS_*``, ``AZURE_*``,
    ``GOOGLE_APPLICATION_CREDENTIALS``: tables and the job's state on ``s3://`` etc.) from their
    environment, which on a cluster is the executor's, not the driver's: ``spark.executorEnv.*``
    carries them over.
    """
    if not master or master.startswith("local"):
        return {}
    environ = dict(os.environ if environ is None else environ)
    conf = {"spark.pyspark.python": environ.get("PYSPARK_PYTHON", sys.executable)}
    for name, value in environ.items():
        if name.startswith(("AIQ_", "AWS_", "AZURE_")) or name in (
                "PYTHONPATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "GOOGLE_APPLICATION_CREDENTIALS"):
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

    from batch_runner._preflight import preflight_job

    specs = [JobSpec.load(p) for p in args.jobs]  # validate every spec before starting anything
    if args.batch_api or args.deadline is not None:
        specs = [_with_batch_api(spec, args) for spec in specs]
    for spec in specs:
        if (args.retry_failed or args.limit is not None) and not spec.incremental:
            raise ConfigError(f"{spec.source_file}: --retry-failed and --limit need an incremental job: "
                              "set key = [...] and output.mode = \"merge\" (or \"append\")")
        if args.limit is not None and args.limit < 1:
            raise ConfigError(f"--limit must be a number of rows >= 1, got {args.limit}; leave it out to process every pending row")
    mlflow = _mlflow_push(args, specs)
    for spec in specs:  # paths, secrets, duplicate keys, endpoints: before Spark starts and before any paid request
        preflight_job(spec, probe=not args.no_probe)
    spark = None
    worst = EXIT_OK
    summaries: list[dict[str, Any]] = []  # --json: one object per job, printed once at the end
    try:
        for spec in specs:
            if spark is None:
                spark = _session(args, spec)
            if spec.incremental:
                report = run_incremental(spec, spark, retry_failed=args.retry_failed, limit=args.limit,  # type: ignore[arg-type]
                                         progress=not args.no_progress)
                summary_json = _show(report, args.json, summaries, failure_rate=report.failure_rate)
                mlflow.push(spec, report, summary_json, _spec_target(spec))
                failed, rows, rate = report.table_failed, report.table_rows, report.failure_rate
                if report.stopped:
                    print(f"job {spec.name!r} stopped: {report.stopped}", file=sys.stderr)
                    worst = max(worst, EXIT_BUDGET)
            else:
                summary = run_job(spec, spark=spark, progress=not args.no_progress)  # type: ignore[arg-type]
                summary_json = _show(summary, args.json, summaries, failure_rate=summary.failure_rate)
                mlflow.push(spec, summary, summary_json, _spec_target(spec))
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
    if args.json:
        print(json.dumps({"jobs": summaries, "exit_code": worst}, indent=2, default=str), flush=True)
    return worst


def _show(result: Any, as_json: bool, summaries: list[dict[str, Any]], **derived: Any) -> dict[str, Any]:
    """A job's summary: its table now, or (``--json``) kept for the one JSON document printed at the end.
    Returns the JSON form (also the MLflow run's ``summary.json``)."""
    summary = {**dataclasses.asdict(result), "total_tokens": result.total_tokens, **derived}
    if as_json:
        summaries.append(summary)
    else:
        print(result.render(), flush=True)
    return summary


def _mlflow_push(args: argparse.Namespace, specs: list[Any]) -> Any:
    """``--mlflow-run [RUN_ID]`` / ``--mlflow-experiment``: where every job's counters go (a spec's
    ``[mlflow]`` adds its own target for that job when the command line gives none)."""
    from batch_runner._mlflow import MlflowPush, MlflowTarget

    if args.mlflow_run is None:
        if args.mlflow_experiment is not None:
            raise ConfigError(f"--mlflow-experiment {args.mlflow_experiment!r} needs --mlflow-run (a new run in that experiment)")
        return MlflowPush(None)
    run_id = None if args.mlflow_run == _NEW_RUN else args.mlflow_run
    if run_id is not None and len(specs) > 1:
        raise ConfigError(f"--mlflow-run {run_id} logs one job into an existing run, and {len(specs)} jobs were given; "
                          "run them one by one, or pass --mlflow-run without a run id (a new run per job)")
    if run_id is not None and args.mlflow_experiment is not None:
        raise ConfigError(f"--mlflow-experiment {args.mlflow_experiment!r} names where a new run goes, and --mlflow-run {run_id} "
                          "names an existing run; drop one of them")
    return MlflowPush(MlflowTarget(run_id=run_id, experiment=args.mlflow_experiment))


def _spec_target(spec: Any) -> Any:
    """The spec's ``[mlflow]`` target, or None (the command line's, if any)."""
    from batch_runner._mlflow import MlflowTarget

    return MlflowTarget.from_spec(spec.mlflow) if spec.mlflow is not None else None


_NEW_RUN = "<new>"


def _with_batch_api(spec: Any, args: argparse.Namespace) -> Any:
    """``--batch-api`` / ``--deadline``: the spec's ``[batch_api]``, added or with this deadline."""
    from batch_runner._spec import batch_api_options

    if not spec.incremental:
        raise ConfigError(f"{spec.source_file}: --batch-api needs an incremental job: set key = [...] and output.mode = \"merge\"")
    raw = {k: v for k, v in (spec.batch_api or {}).items() if k != "deadline_s"}
    deadline = args.deadline if args.deadline is not None else (spec.batch_api or {}).get("deadline_s")
    if deadline is not None:
        raw["deadline"] = deadline
    return spec.replace(batch_api=batch_api_options(raw, "--deadline"))


def _cmd_plan(args: argparse.Namespace) -> int:
    from batch_runner._plan import plan_job
    from batch_runner._spec import JobSpec

    from batch_runner._preflight import preflight_job

    spec = JobSpec.load(args.job)
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be a number of rows >= 1, got {args.limit}; leave it out to plan every pending row")
    preflight_job(spec, probe=not args.no_pilot)  # a pilot sends paid requests: check the endpoints first
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

    from batch_runner._preflight import use_storage_options

    spec = JobSpec.load(args.job)
    if not spec.incremental:
        raise ConfigError(f"{args.job}: status needs an incremental job (key = [...] and output.mode merge or append)")
    use_storage_options(spec)  # before Spark starts: its workers inherit AIQ_STORAGE_OPTIONS
    spark = _session(args, spec) if spec.input_sql is not None else None
    try:
        status = job_status(spec, spark)  # type: ignore[arg-type]
    finally:
        if spark is not None:
            spark.stop()  # type: ignore[attr-defined]
    if args.json:
        print(json.dumps({**dataclasses.asdict(status), "runs": status.runs[-args.last:]}, indent=2, default=str), flush=True)
    else:
        print(status.render(last=args.last), flush=True)
    return EXIT_OK


def _cmd_schedule(args: argparse.Namespace) -> int:
    from batch_runner._schedule import run_schedule
    from batch_runner._spec import JobSpec

    spec = JobSpec.load(args.job)
    cron = args.cron or spec.schedule
    if not cron:
        raise ConfigError(f"{args.job}: no schedule; add schedule = \"0 2 * * *\" to the spec or pass --cron")
    from batch_runner._preflight import preflight_job

    preflight_job(spec, probe=False)  # a broken spec fails now, not at the first firing (each run also probes)
    command = [sys.executable, "-m", "batch_runner.cli", "run", os.path.abspath(args.job), "--no-progress"]
    if args.master:
        command += ["--master", args.master]
    return run_schedule(cron, command, max_runs=args.max_runs, run_now=args.now)


def _cmd_sample_data(args: argparse.Namespace) -> int:
    from batch_runner._sample import write_sample_reviews

    write_sample_reviews(args.path, rows=args.rows, seed=args.seed)
    print(f"wrote {args.rows} sample reviews to {os.path.abspath(args.path)}")
    return EXIT_OK


def _explain_error(exc: BaseException) -> str:
    from batch_runner._runner import explain_error

    return explain_error(exc)


def _master_option(parser: argparse.ArgumentParser, help: str = "Spark master URL (default: the spec's options.master, else local[2])") -> None:
    parser.add_argument("--master", help=help)


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("jobs", nargs="+", metavar="JOB.toml", help="job spec files")
    _master_option(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    parser.add_argument("--json", action="store_true", help="print the summaries as one JSON document ({\"jobs\": [...], "
                        "\"exit_code\": N}) instead of tables")
    parser.add_argument("--retry-failed", action="store_true", help="also process rows whose status is error (incremental jobs)")
    parser.add_argument("--limit", type=int, metavar="N", help="process at most N pending rows in this run (incremental jobs)")
    parser.add_argument("--no-probe", action="store_true",
                        help="skip the free request (e.g. GET /v1/models) that checks each endpoint before the first paid one")
    parser.add_argument("--batch-api", action="store_true",
                        help="send pending rows as provider batches (half price; as [batch_api] in the spec)")
    parser.add_argument("--deadline", metavar="DURATION",
                        help="with --batch-api: rows the batches have not answered by then (e.g. 6h) go online")
    parser.add_argument("--mlflow-run", nargs="?", const=_NEW_RUN, metavar="RUN_ID",
                        help="log each job's counters (params, metrics, summary.json) to a new MLflow run in the active "
                             "experiment of MLFLOW_TRACKING_URI, or into the existing run RUN_ID (put it after the job files, "
                             "or write --mlflow-run=RUN_ID); as [mlflow] in the spec")
    parser.add_argument("--mlflow-experiment", metavar="NAME", help="with --mlflow-run: the experiment of the new runs (created if missing)")


def _add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", metavar="JOB.toml", help="job spec file")
    parser.add_argument("--no-pilot", action="store_true", help="send no request: estimate from the input text alone")
    parser.add_argument("--retry-failed", action="store_true", help="plan as for run --retry-failed")
    parser.add_argument("--limit", type=int, metavar="N", help="plan as for run --limit N")
    _master_option(parser)
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def _add_status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", metavar="JOB.toml", help="job spec file")
    parser.add_argument("--last", type=int, default=5, metavar="N", help="show the last N runs (default 5)")
    _master_option(parser, "Spark master URL, for an [input] sql job")
    parser.add_argument("--json", action="store_true", help="print the status as JSON (runs: the last N)")


def _add_schedule_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", metavar="JOB.toml", help="job spec file")
    parser.add_argument("--cron", help="use this cron expression instead of the spec's schedule")
    parser.add_argument("--now", action="store_true", help="also run once right away")
    parser.add_argument("--max-runs", type=int, metavar="N", help="exit after N runs (default: run forever)")
    _master_option(parser, "Spark master URL passed to each run")


def _add_sample_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="where to write the Delta table (replaced if it exists)")
    parser.add_argument("--rows", type=int, default=240, help="number of reviews (default 240)")
    parser.add_argument("--seed", type=int, default=7, help="random seed (default 7)")


PLAN_HELP = """\
Estimate the next run of an incremental job: pending rows, and per endpoint the input tokens
(counted with the model's tokenizer when the model is local, else (characters + 1) / 4),
output tokens, cost and duration. A pilot sends options.pilot_rows pending rows (default 20)
through the real query to calibrate the counts; its answers are journaled, so the run
reuses them instead of paying again. --no-pilot sends no request at all.
"""

STATUS_HELP = """\
Show an incremental job's state: rows done, failed and pending (pending needs Spark only when the
input is [input] sql), the run going now (the holder of its run lock: run id, host, pid, last
heartbeat), the last runs (an 'interrupted' run was killed), and the totals of its endpoint_usage
table.
"""

SCHEDULE_HELP = """\
Run `ai-query run JOB.toml` at every time the job's schedule (cron: minute hour day-of-month month
day-of-week; ranges 1-5, steps */15, lists 1,15, names mon/jan, @daily ...) fires, in the
foreground, until Ctrl-C. A firing that comes while a run is still going is skipped. Times are
this machine's local time. For production prefer your scheduler (cron, Airflow: see the README)
calling `ai-query run`; it is the same run.
"""


def _job_command(name: str, help: str, description: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                 run: Callable[[argparse.Namespace], int], example: str = "examples/reviews.toml") -> Command:
    """A batch-job command; an error Spark wraps around ours is read by ``explain_error``."""
    return Command(name=name, help=help, description=description, example=f"ai-query {name} {example}",
                   add_arguments=add_arguments, run=run, explain_error=_explain_error)


SAMPLE_DATA_COMMAND = _job_command("sample-data", "write a sample Delta table of product reviews",
                                   "Write deterministic sample product reviews as a Delta table.",
                                   _add_sample_data_arguments, _cmd_sample_data, example=".aiq-demo/reviews")
RUN_COMMAND = _job_command("run", "run job specs: query -> model endpoint -> Delta table", RUN_HELP, _add_run_arguments, _cmd_run)
PLAN_COMMAND = _job_command("plan", "estimate rows, tokens, cost and time of the next run", PLAN_HELP, _add_plan_arguments, _cmd_plan)
STATUS_COMMAND = _job_command("status", "done / failed / pending rows, last runs, usage totals", STATUS_HELP,
                              _add_status_arguments, _cmd_status)
SCHEDULE_COMMAND = _job_command("schedule", "run a job on its cron schedule, in the foreground", SCHEDULE_HELP,
                                _add_schedule_arguments, _cmd_schedule)


if __name__ == "__main__":  # `python -m batch_runner.cli run ...` is `ai-query run ...`
    from ai_query._commands import main

    sys.exit(main())
