"""``ai-query workers start|status|stop`` and ``ai-query prepare``: gpu_workers' commands.

Registered in ai_query's ``ai_query.commands`` entry-point group (see ``pyproject.toml``).

::

    ai-query workers start --model tiny-llama --replicas 2        # returns once every replica is ready
    ai-query workers status [--json]
    ai-query workers stop [--name NAME]                           # default: every pool of this cache dir

``start`` runs the pool detached (it outlives the command, until ``stop``); with ``--foreground``
it stays attached and stops on Ctrl-C. A ``vllm_pool`` endpoint with the same model, task,
replicas and options uses the pool ``start`` made instead of starting its own (e.g. a cluster
init script runs ``start`` on every node).

``prepare`` builds the embedded local models into the cache once (``make demo`` runs it).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from typing import Sequence

from ai_query import Command, ConfigError
from gpu_workers._models import KNOWN_MODELS, cache_dir, prepare_model
from gpu_workers._pool import ensure_pool, list_pools, read_pool_state, stop_pools


def _config(args: argparse.Namespace) -> dict:
    config = {"model": args.model, "task": args.task, "replicas": args.replicas, "device": args.device,
              "options": args.options}
    if args.gpu_ids:
        config["gpu_ids"] = [int(g) for g in args.gpu_ids.split(",")]
    if args.tensor_parallel_size:
        config["tensor_parallel_size"] = args.tensor_parallel_size
    if args.gpu_memory_utilization:
        config["gpu_memory_utilization"] = args.gpu_memory_utilization
    return config


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({exc}); write e.g. '{{\"dtype\": \"bfloat16\"}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object; write e.g. '{{\"dtype\": \"bfloat16\"}}'")
    return value


def _print_pool(state: dict) -> None:
    alive = "alive" if state.get("alive", True) else "dead"
    owner = f"owner pid {state['owner_pid']}" if state.get("owner_pid") else "detached"
    rss = f", rss {state['rss_bytes'] / 2**30:.2f} GiB" if "rss_bytes" in state else ""
    print(f"{state['name']}  {state.get('served_model_name')} ({state.get('task')}) on {state.get('device')}  "
          f"manager pid {state.get('manager_pid')} {alive}, {owner}{rss}")
    for r in state.get("replicas", []):
        health = {True: "healthy", False: "not answering", None: ""}[r.get("healthy")]
        env = " ".join(f"{k}={v}" for k, v in r.get("env", {}).items())
        print(f"  replica {r['index']}  {r['base_url']:28} {r['status']:10} {health:13} pid {r.get('pid')} "
              f"restarts {r.get('restarts', 0)}  {env}  log {r.get('log')}")


def _start(args: argparse.Namespace) -> int:
    info = ensure_pool(_config(args), detached=not args.foreground)
    state = read_pool_state(info.name) or dict(info.state)
    _print_pool(state)
    if not args.foreground:
        return 0
    print("running in the foreground; Ctrl-C stops the pool", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        while not done.wait(2.0):
            if read_pool_state(info.name) is None:
                print(f"the pool {info.name} has stopped", file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        pass
    stop_pools(info.name)
    return 0


def _status(args: argparse.Namespace) -> int:
    pools = list_pools()
    if args.json:
        print(json.dumps(pools, indent=2))
    elif not pools:
        print(f"no vLLM pools under {cache_dir() / 'run' / 'pools'}")
    for state in pools if not args.json else []:
        _print_pool(state)
    return 0


def _stop(args: argparse.Namespace) -> int:
    stopped = stop_pools(args.name)
    for name in stopped:
        print(f"stopped {name}")
    if not stopped:
        print("no vLLM pool to stop" + (f" named {args.name!r}" if args.name else ""))
    return 0


WORKERS_DESCRIPTION = """\
Manage this node's pool of vLLM engines: start one (detached; --foreground stays attached and
Ctrl-C stops it), list pools and their replicas, stop them. A vllm_pool endpoint with the same
model, task, replicas and options uses the pool `start` made instead of starting its own.
"""


def add_workers_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    start = sub.add_parser("start", help="start a pool (or find the running one) and wait until it is ready")
    start.add_argument("--model", required=True, help="a model alias (tiny-llama, smollm2-135m-instruct) or folder")
    start.add_argument("--replicas", type=int, default=1, help="engines on this node (default 1)")
    start.add_argument("--task", default="llm/v1/chat", choices=["llm/v1/chat", "llm/v1/completions"])
    start.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    start.add_argument("--gpu-ids", help="GPUs to use, e.g. 0,1,2,3 (default: the first replicas x tp)")
    start.add_argument("--tensor-parallel-size", type=int, help="GPUs per replica (default 1)")
    start.add_argument("--gpu-memory-utilization", type=float, help="share of each GPU's memory (default 0.9)")
    start.add_argument("--options", type=_json_object, default={}, help='engine options as JSON, e.g. \'{"dtype": "bfloat16"}\'')
    start.add_argument("--foreground", action="store_true", help="stay attached; Ctrl-C stops the pool")
    start.set_defaults(action_run=_start)
    status = sub.add_parser("status", help="list pools and their replicas")
    status.add_argument("--json", action="store_true")
    status.set_defaults(action_run=_status)
    stop = sub.add_parser("stop", help="stop pools (default: all of this cache dir)")
    stop.add_argument("--name", help="the pool to stop (see status)")
    stop.set_defaults(action_run=_stop)


def prepare_models(aliases: Sequence[str]) -> int:
    """Build each model alias (default: every known one) into the cache; print its folder and build time."""
    unknown = [a for a in aliases if a not in KNOWN_MODELS]
    if unknown:
        raise ConfigError(f"unknown model alias(es) {unknown}; known: {sorted(KNOWN_MODELS)}. "
                          "Pick known aliases, or pass no alias to prepare them all")
    for alias in aliases or sorted(KNOWN_MODELS):
        started = time.monotonic()
        path = prepare_model(alias)
        print(f"{alias:24} {time.monotonic() - started:7.1f}s  {path}", flush=True)
    return 0


def _add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="*", metavar="alias", help=f"model aliases (default: all of {', '.join(sorted(KNOWN_MODELS))})")


WORKERS_COMMAND = Command(
    name="workers", help="start|status|stop a pool of vLLM engines on this node",
    example="ai-query workers start --model M --replicas N", description=WORKERS_DESCRIPTION,
    add_arguments=add_workers_arguments, run=lambda args: args.action_run(args),
)
PREPARE_COMMAND = Command(
    name="prepare", help="build the embedded local models (once)", example="ai-query prepare",
    description="Prepare local model folders in the cache ($AIQ_CACHE_DIR, default ~/.cache/ai-query).",
    add_arguments=_add_prepare_arguments, run=lambda args: prepare_models(args.models),
)
