"""The ``ai-query`` command line: subcommands come from the ``ai_query.commands`` entry-point group.

Each package registers the commands it owns, so the core knows none of them by name and never
imports a package it must not depend on::

    [project.entry-points."ai_query.commands"]
    serve = "ai_query.serving._server:SERVE_COMMAND"     # the core's serving endpoint
    run = "batch_runner.cli:RUN_COMMAND"                 # jobs: run, plan, status, schedule, ...
    workers = "gpu_workers._workers_cli:WORKERS_COMMAND" # the vLLM pool

An entry point names a :class:`Command`: a name, a one-line help, a function that adds the
command's options to its argparse sub-parser, and a function that runs it. A plugin that is not
installed simply has no command; one that is installed but cannot be imported is left out of
``--help`` and, when called, answers with the import error instead of taking the other commands
down. ``ai-query X ...`` imports only the module that registers ``X``; ``ai-query --help``
imports every command module, so those modules keep Spark, vLLM and MLflow imports inside
their functions (a unit test checks that ``--help`` imports none of them).

:func:`run_command` is the one guard around a command: an :class:`~ai_query.AIQueryError` (a bad
spec, an unknown endpoint, a bad key) becomes one paragraph on stderr and exit code 2, as does
any other exception (with a hint); 2 stays argparse's, for a command line it cannot parse; ``--debug`` or ``AIQ_DEBUG=1`` also prints the traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, NoReturn, Sequence

if TYPE_CHECKING:
    import argparse

GROUP = "ai_query.commands"
EXIT_OK = 0
EXIT_SYSTEMIC = 2
"""The command could not do its work: a bad spec or config, an unknown endpoint, a bad key, an engine down."""
EXIT_USAGE = 64
"""The command line itself is wrong (an unknown option, a missing argument): EX_USAGE of sysexits.h, so a
scheduler can tell it from a systemic failure (argparse's own 2 is that code here)."""
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports it

DESCRIPTION = "SQL batch LLM inference on Spark and Delta Lake."

EPILOG = """\
exit codes: 0 success; 2 a systemic failure (bad spec, unknown endpoint, bad key, engine down);
64 a usage error (the command line); a command may add its own (ai-query run --help); docs/cli.md
lists them all. --debug or AIQ_DEBUG=1 shows tracebacks.
"""


@dataclass(frozen=True)
class Command:
    """One ``ai-query`` subcommand, registered by the package that owns it.

    ``run`` gets the parsed arguments and returns the exit code (``None`` means 0). It may raise
    an :class:`~ai_query.AIQueryError`: the runner turns it into one paragraph on stderr and exit
    code 2. ``args.command_argv`` holds the command's own arguments as typed, for a command that
    starts copies of itself (``serve --workers N``).

    >>> def hello(args):
    ...     print(f"hello {args.name}")
    >>> HELLO = Command(name="hello", help="greet someone", example="ai-query hello --name Ada",
    ...                 add_arguments=lambda p: p.add_argument("--name", default="world"), run=hello)
    """

    name: str
    help: str
    """One line for ``ai-query --help``."""
    add_arguments: Callable[["argparse.ArgumentParser"], object]
    run: Callable[["argparse.Namespace"], "int | None"]
    description: str | None = None
    """The command's own ``--help`` text, kept as written (default: ``help``)."""
    epilog: str | None = None
    example: str | None = None
    """One typical invocation, listed in ``ai-query --help``."""
    explain_error: Callable[[BaseException], str] | None = None
    """The useful line of an error that is not an ``AIQueryError``, e.g. ours wrapped in a Spark task failure."""


@dataclass(frozen=True)
class CommandSet:
    """The commands found in the entry-point group, and those registered but not loadable."""

    commands: dict[str, Command]
    broken: dict[str, str]
    """command name -> why it could not be loaded (the entry point and the import error)."""


def load_commands(only: str | None = None) -> CommandSet:
    """Load the group's commands (only ``only``, when it names one), sorted by name.

    The first distribution on ``sys.path`` that registers a name wins, as for any entry point.
    """
    from importlib.metadata import entry_points

    points = sorted((ep for ep in entry_points(group=GROUP) if only is None or ep.name == only), key=lambda ep: ep.name)
    if only is not None and not points:
        return load_commands()  # not a command: parse everything, so argparse names the choices
    commands: dict[str, Command] = {}
    broken: dict[str, str] = {}
    for ep in points:
        if ep.name in commands or ep.name in broken:
            continue
        try:
            command = ep.load()
        except Exception as exc:  # one broken plugin must not take the other commands down
            broken[ep.name] = f"{ep.value} cannot be imported: {type(exc).__name__}: {exc}"
            continue
        if not isinstance(command, Command) or command.name != ep.name:
            broken[ep.name] = f"{ep.value} is not an ai_query.Command named {ep.name!r}"
            continue
        commands[ep.name] = command
    return CommandSet(commands, broken)


def build_parser(found: CommandSet) -> "argparse.ArgumentParser":
    """The ``ai-query`` parser: global options and one sub-parser per loaded command."""
    import argparse

    from . import __version__

    examples = [f"  {c.example}" for c in found.commands.values() if c.example]
    epilog = ("examples:\n" + "\n".join(examples) + "\n\n" if examples else "") + EPILOG
    if found.broken:
        epilog += "\nunavailable commands:\n" + "\n".join(f"  {n}: {why}" for n, why in found.broken.items())
    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> "NoReturn":  # argparse exits 2: ours says usage error
            self.print_usage(sys.stderr)
            self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")

    parser = Parser(prog="ai-query", description=DESCRIPTION, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens (endpoint preparation, Spark)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also AIQ_DEBUG=1)")
    parser.add_argument("--version", action="version", version=f"ai-query {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in found.commands.values():
        sub_parser = sub.add_parser(command.name, help=command.help, description=command.description or command.help,
                                    epilog=command.epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_arguments(sub_parser)
    return parser


def run_command(command: Command, args: "argparse.Namespace", *, debug: bool = False) -> int:
    """Run ``command``; every error becomes one paragraph on stderr and an exit code, never a traceback unless ``debug``."""
    from . import AIQueryError

    try:
        code = command.run(args)
    except BrokenPipeError:  # `ai-query endpoints | head`: the reader has gone; say nothing, as cat would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if debug:
            traceback.print_exc()
        if isinstance(exc, AIQueryError):
            print(f"ai-query: {type(exc).__name__}: {exc}", file=sys.stderr)
        else:
            hint = "" if debug else " (--debug shows the traceback)"
            print(f"ai-query: {(command.explain_error or _name_and_message)(exc)}{hint}", file=sys.stderr)
        return EXIT_SYSTEMIC
    return EXIT_OK if code is None else int(code)


def _name_and_message(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """``ai-query``: parse, run one command, return its exit code."""
    import logging

    argv = list(sys.argv[1:] if argv is None else argv)
    name = next((a for a in argv if not a.startswith("-")), None)  # global options take no value
    found = load_commands(only=name)
    if name is not None and name in found.broken:
        print(f"ai-query: the command {name!r} is registered but unavailable: {found.broken[name]}. "
              "Reinstall ai-query (pip install -e . in a checkout) or install the package that provides it.",
              file=sys.stderr)
        return EXIT_SYSTEMIC
    args = build_parser(found).parse_args(argv)
    args.command_argv = argv[argv.index(args.command) + 1:]
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local models are built from wheels, never downloaded
    debug = args.debug or os.environ.get("AIQ_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    return run_command(found.commands[args.command], args, debug=debug)


def _add_endpoints_arguments(parser: "argparse.ArgumentParser") -> None:
    parser.add_argument("name", nargs="?", help="show this endpoint's config as JSON (secrets masked)")
    parser.add_argument("--endpoints", help="an endpoints JSON file to add")
    parser.add_argument("--json", action="store_true", help="list the endpoints as JSON (name, task, kind, model)")


def _endpoints(args: "argparse.Namespace") -> int:
    import json

    from . import EndpointRegistry
    from .backends import entity_kind

    registry = EndpointRegistry.default(args.endpoints)
    if args.name:
        print(json.dumps(registry.get(args.name).to_dict(), indent=2))
        return EXIT_OK
    rows = [{"name": ep.name, "task": ep.task, "kind": entity_kind(ep.entity), "model": ep.entity.model_name} for ep in registry]
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    width = max((len(r["name"]) for r in rows), default=len("NAME"))
    print(f"{'NAME':<{width}}  {'TASK':<20}  {'KIND':<11} MODEL")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['task']:<20}  {r['kind']:<11} {r['model']}")
    return EXIT_OK


ENDPOINTS_COMMAND = Command(
    name="endpoints", help="list the endpoints ai_query can call, or show one as JSON", example="ai-query endpoints",
    description="List the endpoint registry: built-ins, $AIQ_ENDPOINTS and --endpoints.",
    add_arguments=_add_endpoints_arguments, run=_endpoints,
)
