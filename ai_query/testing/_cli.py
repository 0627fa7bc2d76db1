"""``ai-query simulate`` / ``python -m ai_query.testing``: run the provider simulator until stopped."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Sequence

from .._commands import Command
from ._latency import Latency
from ._simulator import FAULT_KINDS, ProviderSimulator

EXAMPLES = """\
examples:
  ai-query simulate                                     OpenAI, Anthropic and serving endpoints on :8000
  ai-query simulate --api-key sk-sim --latency 0.2 --max-concurrency 64
  ai-query simulate --latency lognormal:0.2,0.8 --per-token-latency 0.01
  ai-query simulate --rpm 600 --tpm 100000              a quota per 60 s window (--window to change it)
  ai-query simulate --error-rate 500=0.05 --error-rate 503=0.05 --error-rate reset=0.02 --seed 7
  ai-query simulate --endpoint my-llm --endpoint my-embedder --port 0

then, e.g.:
  curl -s localhost:8000/v1/chat/completions -H 'Authorization: Bearer sk-sim' \\
       -d '{"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8}'
  curl -s localhost:8000/_sim/stats                     the server-side counters (POST /_sim/reset zeroes them)

answers are deterministic: "echo: <prompt>", one token per whitespace word; prompts may carry
directives: [[status:N]] [[flaky:N]] [[ratelimit:N]] [[malformed:N]] [[reset:N]] [[delay:S]] [[reply:TEXT]].
tokens per window are charged at admission: prompt tokens + max_tokens (or --default-max-tokens).
"""


def _error_rate(text: str) -> list[tuple[str, float]]:
    pairs = []
    for item in text.split(","):
        kind, sep, rate = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"{item!r} is not KIND=RATE (e.g. 500=0.05); kinds: {', '.join(FAULT_KINDS)}")
        try:
            pairs.append((kind.strip(), float(rate)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: the rate must be a number between 0 and 1") from None
    return pairs


def _latency(text: str) -> Latency:
    try:
        return Latency.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


DESCRIPTION = (
    "Run a provider simulator: a real HTTP server on 127.0.0.1 speaking the wire formats of\n"
    "  OpenAI             POST /v1/chat/completions, /v1/completions, /v1/embeddings; GET /v1/models\n"
    "  Anthropic          POST /v1/messages\n"
    "  serving endpoints  POST /serving-endpoints/NAME/invocations (llm/v1/chat, completions, embeddings)\n"
    "with latency, a concurrency cap, request/token quotas and fault injection. It prints its URLs,\n"
    "runs until Ctrl-C or SIGTERM, then prints its counters as JSON (also at GET /_sim/stats)."
)


def build_parser(prog: str = "ai-query simulate") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_simulator_arguments(parser)
    return parser


def add_simulator_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``ai-query simulate`` (also ``python -m ai_query.testing``)."""
    net = parser.add_argument_group("server")
    net.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    net.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    net.add_argument("--api-key", help="key every request must carry (Bearer / x-api-key); default: accept any")
    net.add_argument("--served-model", default="sim-model", help="model name in answers and /v1/models (default sim-model)")
    net.add_argument("--endpoint", action="append", dest="endpoints", metavar="NAME",
                     help="a serving-endpoint name to serve (repeatable; default: the served model; '*' serves any name)")
    net.add_argument("--embedding-dim", type=int, default=8, help="embedding vector length (default 8)")

    timing = parser.add_argument_group("latency")
    timing.add_argument("--latency", type=_latency, default=None, metavar="SPEC",
                        help="seconds (fixed), or 'uniform:LOW,HIGH', or 'lognormal:MEAN,P99' (default 0)")
    timing.add_argument("--per-token-latency", type=float, default=0.0, metavar="S", help="extra seconds per completion token (default 0)")

    limits = parser.add_argument_group("limits (answered 429 with Retry-After and x-ratelimit-* headers)")
    limits.add_argument("--max-concurrency", type=int, metavar="N", help="requests in flight above N get 429")
    limits.add_argument("--concurrency-retry-after", type=float, default=0.05, metavar="S", help="Retry-After of those 429s (default 0.05)")
    limits.add_argument("--rpm", type=int, metavar="N", help="requests admitted per window")
    limits.add_argument("--tpm", type=int, metavar="N", help="tokens admitted per window (prompt + max_tokens, charged at admission)")
    limits.add_argument("--window", type=float, default=60.0, metavar="S", help="quota window in seconds (default 60)")
    limits.add_argument("--sliding-window", action="store_true", help="count quotas over any span of --window, not fixed windows")
    limits.add_argument("--default-max-tokens", type=int, default=256, metavar="N",
                        help="max_tokens of a request that sends none: caps its answer and its quota charge (default 256)")
    limits.add_argument("--tpm-refund-unused", action="store_true", help="give unused max_tokens back to the window after a success")

    faults = parser.add_argument_group("faults (one seeded draw per admitted request)")
    faults.add_argument("--error-rate", type=_error_rate, action="append", default=[], metavar="KIND=RATE",
                        help=f"inject a fault in this share of requests (repeatable or comma-separated); kinds: {', '.join(FAULT_KINDS)}")
    faults.add_argument("--hang", type=float, default=30.0, metavar="S", help="how long a 'timeout' fault holds its answer (default 30)")
    faults.add_argument("--seed", type=int, default=0, help="seed of the fault and latency draws (default 0)")

    out = parser.add_argument_group("output")
    out.add_argument("--stats-every", type=float, default=0.0, metavar="S", help="also print the counters every S seconds (one JSON line)")


def simulator_main(argv: Sequence[str] | None = None, *, prog: str = "ai-query simulate") -> int:
    """Run the simulator from command-line arguments until Ctrl-C or SIGTERM; return the exit code."""
    parser = build_parser(prog)
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return int(exc.code or 0)
    return run_simulator(args, prog=parser.prog)


def run_simulator(args: argparse.Namespace, *, prog: str = "ai-query simulate") -> int:
    """Run the simulator with parsed options until Ctrl-C or SIGTERM; return the exit code."""
    try:
        sim = ProviderSimulator(
            api_key=args.api_key,
            served_model=args.served_model,
            endpoint_names=args.endpoints,
            embedding_dim=args.embedding_dim,
            latency=args.latency,
            per_token_latency_s=args.per_token_latency,
            max_concurrency=args.max_concurrency,
            concurrency_retry_after_s=args.concurrency_retry_after,
            rpm_limit=args.rpm,
            tpm_limit=args.tpm,
            window_s=args.window,
            quota_window="sliding" if args.sliding_window else "fixed",
            default_max_tokens=args.default_max_tokens,
            tpm_refund_unused=args.tpm_refund_unused,
            error_rates={kind: rate for pairs in args.error_rate for kind, rate in pairs},
            hang_s=args.hang,
            seed=args.seed,
            host=args.host,
            port=args.port,
        )
        sim.start()
    except (ValueError, RuntimeError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2

    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, lambda *_: stop.set())
    key = "<key>" if args.api_key else "<any>"
    print(f"provider simulator listening on {sim.url}", flush=False)
    print(f"  OpenAI             {sim.base_url}  (Authorization: Bearer {key})")
    print(f"  Anthropic          {sim.anthropic_base_url}  (POST /v1/messages, x-api-key: {key}, anthropic-version)")
    for name in sim.endpoint_names:
        print(f"  serving endpoint   {sim.invocations_url(name) if name != '*' else sim.url + '/serving-endpoints/*/invocations'}")
    print(f"  counters           {sim.stats_url}  (POST {sim.url}/_sim/reset)")
    print("Ctrl-C or SIGTERM stops it and prints the counters as JSON.", flush=True)
    try:
        while not stop.wait(args.stats_every or 3600):
            if args.stats_every:
                print(json.dumps(sim.snapshot()), flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        final = sim.snapshot()
        sim.stop()
    print(json.dumps(final, indent=2), flush=True)
    return 0


SIMULATE_COMMAND = Command(
    name="simulate", help="a provider simulator (OpenAI, Anthropic, serving-endpoint wire formats)",
    example="ai-query simulate --port 8000", description=DESCRIPTION, epilog=EXAMPLES,
    add_arguments=add_simulator_arguments, run=run_simulator,
)
