"""Running the serving endpoint: ``ai-query serve`` and ``ServingServer`` (uvicorn in a thread).

>>> from ai_query.serving import ServingServer
>>> with ServingServer(state_dir="/tmp/aiq-serving") as server:       # doctest: +SKIP
...     server.url          # http://127.0.0.1:PORT: point an OpenAI client at server.url + "/v1"
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

from .._commands import Command
from .._errors import ConfigError
from .._logging import RedactingFilter, get_logger, install_redaction, mask_text
from ..config import EndpointRegistry
from ._app import MAX_REQUEST_BYTES, ServingApp
from ._auth import TokenAuthenticator
from ._ratelimit import RateLimiter
from ._shared import SharedCells, SharedControl
from ._workers import Supervisor, add_worker_options, default_workers, die_with_supervisor, worker_socket
from ._store import HTTP_CLIENTS, EndpointStore
from ._tables import ServingTables

log = get_logger("ai_query.serving")

SecretMaskingFilter = RedactingFilter  # the name the serving tests and older code know


def install_log_masking() -> None:
    """``RedactingFilter`` on our package loggers and on the handlers of the root logger and uvicorn's loggers."""
    install_redaction(("", "uvicorn", "uvicorn.error", "uvicorn.access"))


def registry_sources(extra: str | os.PathLike[str] | None) -> tuple[EndpointRegistry, dict[str, str]]:
    """The registry the server serves read-only, and where each endpoint comes from."""
    registry = EndpointRegistry.builtin()
    sources = {name: "builtin_endpoints.json" for name in registry.names()}
    for source in (os.environ.get("AIQ_ENDPOINTS"), extra):
        if source:
            more = EndpointRegistry.from_file(source)
            registry = registry.with_endpoints(more)
            sources.update({name: str(source) for name in more.names()})
    return registry, sources


def build_app(*, endpoints: str | os.PathLike[str] | None = None, state_dir: str | os.PathLike[str] | None = None,
              tokens: str | os.PathLike[str] | None = None, usage_table: str | None = None,
              inference_table: str | None = None, include_registry: bool = True, http_client: str = "httptools",
              control: SharedControl | None = None, workers: int = 1, max_request_bytes: int = MAX_REQUEST_BYTES) -> ServingApp:
    """A ``ServingApp`` from the same options as ``ai-query serve``.

    ``control`` and ``workers``: the app is one of ``workers`` processes sharing ``control``
    (rate limits, endpoint changes); it takes 1/``workers`` of each endpoint's concurrency and quota.
    """
    if include_registry:
        registry, sources = registry_sources(endpoints)
    else:
        registry = EndpointRegistry.from_file(endpoints) if endpoints else EndpointRegistry()
        sources = {n: str(endpoints) for n in registry.names()}
    store = EndpointStore(registry, state_dir, sources=sources, http_client=http_client, control=control, share=1.0 / workers)
    auth = TokenAuthenticator.from_sources(tokens)
    if not auth.enabled:
        log.warning("no tokens configured (--tokens, AIQ_SERVING_TOKENS, AIQ_SERVING_TOKEN): authentication is OFF")
    cells = SharedCells(control) if control is not None else None
    return ServingApp(store, auth, tables=ServingTables(usage_table, inference_table), limiter=RateLimiter(cells=cells),
                      max_request_bytes=max_request_bytes)


def _uvicorn_config(app: ServingApp, log_level: str, access_log: bool) -> Any:
    import uvicorn

    return uvicorn.Config(app.asgi, interface="asgi3", log_level=log_level, access_log=access_log, lifespan="on",
                          timeout_keep_alive=30)


class ServingServer:
    """The serving endpoint on uvicorn, in a background thread (tests, notebooks); ``stop()`` ends it."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning", access_log: bool = False,
                 **options: Any) -> None:
        self.app = build_app(**options)
        self.host = host
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.port: int = self._sock.getsockname()[1]
        import uvicorn

        self._server = uvicorn.Server(_uvicorn_config(self.app, log_level, access_log))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "ServingServer":
        install_log_masking()
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, name="ai-query-serving", daemon=True)
        self._thread.start()
        import time

        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the serving endpoint did not start (see the log above)")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=30)
            self._thread = None
        self._sock.close()

    def __enter__(self) -> "ServingServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


SERVE_DESCRIPTION = (
    "Serve endpoints in real time through the batch code path: POST /serving-endpoints/NAME/invocations,\n"
    "OpenAI-compatible /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models, and the\n"
    "management API /api/2.0/serving-endpoints (create, get, list, update config, rate limits, tags, delete)."
)


def build_parser(prog: str = "ai-query serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=SERVE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_arguments(parser)
    return parser


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``ai-query serve`` (also ``python -m ai_query.serving``)."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8080, help="port (default 8080; 0 picks a free one)")
    parser.add_argument("--endpoints", help="an endpoints JSON file served read-only (besides built-ins and $AIQ_ENDPOINTS)")
    parser.add_argument("--state-dir", help="where endpoints created through the API are kept across restarts "
                                            "(default $AIQ_CACHE_DIR/serving or ~/.cache/ai-query/serving)")
    parser.add_argument("--tokens", help="tokens JSON file: users, bearer tokens, CAN_QUERY/CAN_MANAGE per endpoint "
                                         "(else $AIQ_SERVING_TOKENS_FILE, $AIQ_SERVING_TOKENS, $AIQ_SERVING_TOKEN; none: auth off)")
    parser.add_argument("--usage-table", help="append one usage row per request to this Delta table (batch jobs' schema)")
    parser.add_argument("--inference-table", help="also append request and response payloads to this Delta table")
    parser.add_argument("--http-client", choices=list(HTTP_CLIENTS), default="httptools",
                        help="transport to backends: 'httptools' (default, least CPU: keep-alive HTTP/1.1 parsed by "
                             "httptools) or 'aiohttp' as batch tasks use; both send the same requests through the same "
                             "provider adapters and fail with the same errors")
    parser.add_argument("--max-request-mb", type=_positive_mb, default=MAX_REQUEST_BYTES / 1024 / 1024, metavar="MB",
                        help=f"refuse a request body larger than this with 413, forwarding nothing "
                             f"(default {MAX_REQUEST_BYTES // 1024 // 1024})")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--access-log", action="store_true", help="log every request line (never headers)")
    add_worker_options(parser)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: give a number from 1 to 65535 (0 picks a free one)")
    return port


def _positive_mb(text: str) -> float:
    try:
        mb = float(text)
    except ValueError:
        mb = -1.0
    if not mb > 0 or mb != mb or mb == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: give megabytes > 0, e.g. 16 or 0.5")
    return mb


def preflight_serve(args: argparse.Namespace, state_dir: str) -> None:
    """What ``serve`` checks before it listens or starts a worker, so that a bad option is one paragraph and exit 2.

    The endpoints file (and the secrets its endpoints use), the tokens file (permission levels,
    unset secrets), the state directory and the usage / payload table paths; every failure is an
    ``AIQueryError`` naming the value and the fix (the ``ai-query`` runner prints it without a
    traceback). Workers would find the same errors one by one, each with its traceback in the log.
    Backends are not probed: a server starts while a provider is briefly down, and answers 502
    for it until it is back.
    """
    from .._preflight import check_credentials, check_writable

    registry, sources = registry_sources(args.endpoints)
    for name in [n for n, source in sources.items() if args.endpoints and source == str(args.endpoints)]:
        for entity in registry.get(name).served_entities:  # the file asked for by name: each must be able to answer
            check_credentials(name, entity)
    TokenAuthenticator.from_sources(args.tokens)
    check_writable(state_dir, "--state-dir", "pass a writable directory as --state-dir (or set AIQ_CACHE_DIR)")
    for option, path in (("--usage-table", args.usage_table), ("--inference-table", args.inference_table)):
        if path:
            check_writable(path, option, f"pass a writable directory as {option}")


def default_state_dir() -> Path:
    root = os.environ.get("AIQ_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "ai-query")
    return Path(root) / "serving"


def serve_main(argv: Sequence[str] | None = None) -> int:
    """``ai-query serve``: run until Ctrl-C / SIGTERM (with ``--workers N``, as N processes)."""
    from .._commands import run_command

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command_argv = argv
    return run_command(SERVE_COMMAND, args, debug=os.environ.get("AIQ_DEBUG", "").strip().lower() not in ("", "0", "false", "no"))


def serve(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Serve with parsed options; ``argv`` (the options as typed) is what each ``--workers`` process gets."""
    workers = default_workers() if args.workers is None else args.workers
    if workers < 1:
        raise ConfigError(f"ai-query serve: --workers must be 1 or more, got {workers}; leave it out for one per core")
    worker = args.worker_control is not None
    tag = f" [worker {args.worker_index}]" if worker else ""
    # force: under `ai-query serve` the dispatcher has configured logging already; --log-level wins
    logging.basicConfig(level=args.log_level.upper(), format=f"%(asctime)s %(levelname)s %(name)s{tag} %(message)s", force=True)
    install_log_masking()
    state_dir = args.state_dir or str(default_state_dir())
    if not worker:
        preflight_serve(args, state_dir)
    if workers > 1 and not worker:
        try:
            supervisor = Supervisor(argv, workers, args.host, args.port, state_dir)
        except OSError as exc:
            raise ConfigError(_cannot_listen(args.host, args.port, exc)) from None
        return supervisor.run()
    import uvicorn

    control = None
    if worker:
        die_with_supervisor(args.worker_supervisor)
        control = SharedControl.inherited(args.worker_control)
    app = build_app(endpoints=args.endpoints, state_dir=state_dir, tokens=args.tokens, usage_table=args.usage_table,
                    inference_table=args.inference_table, http_client=args.http_client, control=control,
                    workers=workers if worker else 1, max_request_bytes=int(args.max_request_mb * 1024 * 1024))
    config = _uvicorn_config(app, args.log_level, args.access_log)
    config.host, config.port = args.host, args.port
    server = uvicorn.Server(config)
    if worker:
        sock = worker_socket(args.host, args.port)
        ready_fd = args.worker_ready_fd

        def tell_supervisor() -> None:
            os.write(ready_fd, f"{args.worker_index}\n".encode())

        app.on_started = tell_supervisor
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((args.host, args.port))
        except OSError as exc:
            sock.close()
            raise ConfigError(_cannot_listen(args.host, args.port, exc)) from None
        print(f"ai-query serving on http://{args.host}:{sock.getsockname()[1]} (state in {app.store.state_dir})", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        if control is not None:
            control.close()
    return 0


def _cannot_listen(host: str, port: int, exc: OSError) -> str:
    return (f"ai-query serve cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port (0 picks a free "
            "one) or stop what listens there, or pass a --host of this machine")


def _run_serve(args: argparse.Namespace) -> int:
    return serve(args, args.command_argv)


SERVE_COMMAND = Command(
    name="serve", help="serve endpoints in real time: invocations, OpenAI-compatible /v1, the management API",
    example="ai-query serve --port 8080", description=SERVE_DESCRIPTION, add_arguments=add_serve_arguments, run=_run_serve,
)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(serve_main())
