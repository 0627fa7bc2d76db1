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

DESCRIPTION = """\
SQL batch LLM inference on Spark and Delta Lake.

  ai-query sample-data .aiq-demo/reviews       write a sample Delta table of product reviews
  ai-query run examples/reviews.toml           run a job: query -> model endpoint -> Delta table
  ai-query endpoints                           list the endpoints ai_query can call
  ai-query prepare                             build the embedded local models (once)
  ai-query simulate --port 8000                an OpenAI-compatible provider simulator
  ai-query serve --port 8080                   serve endpoints in real time (ai-query serve --help)

Exit codes: 0 success; 2 a systemic failure (bad spec, unknown endpoint, bad key, engine down);
3 the job finished but more rows failed than options.allowed_failure_rate allows.
"""


def _cmd_run(args: argparse.Namespace) -> int:
    from batch_runner._runner import run_job
    from batch_runner._spec import JobSpec

    specs = [JobSpec.load(p) for p in args.jobs]  # validate every spec before starting anything
    spark = None
    worst = EXIT_OK
    try:
        for spec in specs:
            if spark is None:
                import spark_udfs

                spark = spark_udfs.build_session(args.master or spec.master, app_name="ai-query")
            summary = run_job(spec, spark=spark, progress=not args.no_progress)
            print(summary.render(), flush=True)
            if summary.failure_rate > spec.allowed_failure_rate:
                print(
                    f"job {spec.name!r}: {summary.rows_failed} of {summary.rows} rows failed "
                    f"({summary.failure_rate:.1%} > allowed {spec.allowed_failure_rate:.1%}); see aiq_error in {summary.output_path}",
                    file=sys.stderr,
                )
                worst = EXIT_FAILED_ROWS
    finally:
        if spark is not None:
            spark.stop()
    return worst


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
        kind = "local" if ep.entity.local_model else ep.entity.external_model.provider  # type: ignore[union-attr]
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
    run.set_defaults(func=_cmd_run)

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
