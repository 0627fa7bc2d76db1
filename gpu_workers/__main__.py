"""``python -m gpu_workers``: prepare models and manage local servers from a shell.

::

    python -m gpu_workers prepare [alias ...]     # build models into the cache (default: all)
    python -m gpu_workers status [--json]         # servers recorded in the cache, alive or not
    python -m gpu_workers stop                    # stop every server of this cache dir
    python -m gpu_workers serve ALIAS [--task T]  # start a server and keep it up until Ctrl-C

``serve`` exists because a server lives as long as the process that started it: this command
is that process when you want a server outside Spark (e.g. for a notebook or curl).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from ai_query import AIQueryError
from gpu_workers._errors import LocalServerError
from gpu_workers._models import KNOWN_MODELS, cache_dir
from gpu_workers._local_servers import ensure_local_server, list_local_servers, stop_local_servers
from gpu_workers._workers_cli import prepare_models


def _status(as_json: bool) -> int:
    servers = list_local_servers()
    if as_json:
        print(json.dumps([s.to_dict() for s in servers], indent=2))
        return 0
    if not servers:
        print(f"no local servers recorded under {cache_dir() / 'run'}")
        return 0
    for s in servers:
        health = "healthy" if s.healthy else ("alive, not answering" if s.alive else "dead")
        print(
            f"{s.model:24} {','.join(t.rsplit('/', 1)[-1] for t in s.tasks):18} {s.base_url:28} "
            f"{health:10} pid {s.pid} owner {s.owner_pid} rss {s.rss_bytes / 2**30:.2f} GiB  log {s.log_path}"
        )
    return 0


def _stop() -> int:
    stopped = stop_local_servers(owned_only=False)
    for s in stopped:
        print(f"stopped {s.model} ({s.base_url}, pid {s.pid})")
    if not stopped:
        print("no local servers to stop")
    return 0


def _serve(model: str, task: str, options: dict) -> int:
    url = ensure_local_server(model, task, options)
    print(f"{model} ({task}) at {url}; Ctrl-C to stop", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        while not done.wait(2.0):
            # `python -m gpu_workers stop` from another shell, or a crash: nothing left to serve
            if not any(s.base_url == url and s.alive for s in list_local_servers(check_health=False)):
                print(f"the server at {url} has stopped", file=sys.stderr)
                return 2
    except KeyboardInterrupt:
        pass
    stop_local_servers(owned_only=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpu_workers", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_prepare = sub.add_parser("prepare", help="build models into the cache")
    p_prepare.add_argument("aliases", nargs="*", metavar="alias", help=f"default: all of {sorted(KNOWN_MODELS)}")
    p_status = sub.add_parser("status", help="list local servers")
    p_status.add_argument("--json", action="store_true")
    sub.add_parser("stop", help="stop every local server of this cache dir")
    p_serve = sub.add_parser("serve", help="start a server and keep it running until Ctrl-C")
    p_serve.add_argument("model", help="an alias or a model folder")
    p_serve.add_argument("--task", default=None, help="default: the model's first task")
    p_serve.add_argument("--options", default="{}", help='JSON, e.g. \'{"dtype": "bfloat16"}\'')
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            return prepare_models(args.aliases)
        if args.command == "status":
            return _status(args.json)
        if args.command == "stop":
            return _stop()
        task = args.task or (KNOWN_MODELS[args.model].tasks[0] if args.model in KNOWN_MODELS else "llm/v1/chat")
        return _serve(args.model, task, json.loads(args.options))
    except (LocalServerError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except AIQueryError as exc:  # e.g. an unknown model alias
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
