"""The ``ai-query`` dispatcher: commands come from the ``ai_query.commands`` entry-point group.

A fake plugin is installed for real: a module and a ``.dist-info`` folder (METADATA and
entry_points.txt) in a temporary directory put on ``sys.path``, so ``importlib.metadata`` finds
its commands next to the ones ai-query's own packages register.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

import ai_query
from ai_query._commands import main

PLUGIN = '''
from ai_query import Command, ConfigError


def _add_arguments(parser):
    parser.add_argument("--name", default="world")
    parser.add_argument("--fail", choices=["typed", "untyped", "interrupt"])
    parser.add_argument("--exit", type=int)
    parser.add_argument("--lines", type=int, default=0)


def _run(args):
    if args.fail == "typed":
        raise ConfigError("greeting.name 'Bob' is reserved; pick another --name")
    if args.fail == "untyped":
        raise RuntimeError("the greeter broke")
    if args.fail == "interrupt":
        raise KeyboardInterrupt
    print(f"hello {args.name}; argv {args.command_argv}")
    for i in range(args.lines):
        print(f"line {i}")
    return args.exit


HELLO = Command(name="hello", help="greet someone (a test plugin)", example="ai-query hello --name Ada",
                add_arguments=_add_arguments, run=_run)
'''

ENTRY_POINTS = """\
[ai_query.commands]
hello = aiq_fake_plugin:HELLO
broken = aiq_missing_module:COMMAND
misnamed = aiq_fake_plugin:HELLO
"""

OURS = ["endpoints", "plan", "prepare", "run", "sample-data", "schedule", "serve", "simulate", "status", "workers"]


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A distribution ``aiq-fake-plugin`` registering ``hello`` plus two broken entries, on ``sys.path``."""
    (tmp_path / "aiq_fake_plugin.py").write_text(PLUGIN)
    info = tmp_path / "aiq_fake_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: aiq-fake-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("AIQ_DEBUG", raising=False)
    yield tmp_path
    sys.modules.pop("aiq_fake_plugin", None)


def test_help_lists_every_package_command_and_the_plugin(plugin, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    listed = out.split("positional arguments:")[1].split("options:")[0]
    assert re.findall(r"^    (\S+)", listed, re.M) == sorted([*OURS, "hello"])  # wrapped help lines are indented deeper
    assert "greet someone (a test plugin)" in out and "ai-query hello --name Ada" in out
    unavailable = out.split("unavailable commands:")[1]
    assert "broken: aiq_missing_module:COMMAND cannot be imported: ModuleNotFoundError" in unavailable
    assert "misnamed: aiq_fake_plugin:HELLO is not an ai_query.Command named 'misnamed'" in unavailable


def test_a_plugin_command_runs_with_its_own_arguments_and_exit_code(plugin, capsys):
    assert main(["-v", "hello", "--name", "Ada"]) == 0
    assert capsys.readouterr().out == "hello Ada; argv ['--name', 'Ada']\n"
    assert main(["hello", "--exit", "5"]) == 5


def test_a_command_parses_its_options_and_rejects_unknown_ones(plugin, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["hello", "--nmae", "Ada"])
    assert exit_.value.code == 64 and "unrecognized arguments: --nmae Ada" in capsys.readouterr().err


def test_a_typed_error_is_one_paragraph_on_stderr_and_exit_code_2(plugin, capsys):
    assert main(["hello", "--fail", "typed"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "ai-query: ConfigError: greeting.name 'Bob' is reserved; pick another --name\n"
    assert captured.out == ""


def test_any_other_error_is_one_paragraph_with_a_hint(plugin, capsys):
    assert main(["hello", "--fail", "untyped"]) == 2
    assert capsys.readouterr().err == "ai-query: RuntimeError: the greeter broke (--debug shows the traceback)\n"


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(plugin, capsys, monkeypatch, how):
    if how == "env":
        monkeypatch.setenv("AIQ_DEBUG", "1")
    assert main(["--debug", "hello", "--fail", "typed"] if how == "flag" else ["hello", "--fail", "typed"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and 'raise ConfigError("greeting.name' in err
    assert err.endswith("ai-query: ConfigError: greeting.name 'Bob' is reserved; pick another --name\n")


def test_ctrl_c_exits_130(plugin, capsys):
    assert main(["hello", "--fail", "interrupt"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_a_reader_that_goes_away_ends_the_command_quietly(plugin):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "ai_query", "hello", "--lines", "200000"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("hello world")  # `ai-query hello | head -1`
    proc.stdout.close()
    assert proc.wait(timeout=120) == 141
    assert proc.stderr.read() == ""


def test_a_registered_command_that_cannot_load_says_why(plugin, capsys):
    assert main(["broken"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ai-query: the command 'broken' is registered but unavailable: aiq_missing_module:COMMAND cannot be "
                          "imported: ModuleNotFoundError: No module named 'aiq_missing_module'. Reinstall ai-query")
    assert main(["misnamed"]) == 2
    assert "aiq_fake_plugin:HELLO is not an ai_query.Command named 'misnamed'" in capsys.readouterr().err


def test_an_unregistered_command_names_the_choices(plugin, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["wrokers", "status"])
    err = capsys.readouterr().err
    assert exit_.value.code == 64
    assert "invalid choice: 'wrokers' (choose from 'endpoints', 'hello', 'plan'," in err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"ai-query {ai_query.__version__}\n"


def test_endpoints_json_lists_the_registry(capsys, monkeypatch):
    monkeypatch.delenv("AIQ_ENDPOINTS", raising=False)
    assert main(["endpoints", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"name": "local-chat", "task": "llm/v1/chat", "kind": "local_model", "model": "smollm2-135m-instruct"} in rows
    assert main(["endpoints"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["NAME", "TASK", "KIND", "MODEL"]
    assert [line.split()[0] for line in table[1:]] == [r["name"] for r in rows]


def _run_python(code: str, pythonpath: str) -> list[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([pythonpath, os.environ.get("PYTHONPATH", "")])}
    env.pop("AIQ_DEBUG", None)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_help_imports_no_spark_vllm_or_mlflow(tmp_path):
    loaded = _run_python("""
        import contextlib, io, sys
        from ai_query._commands import main
        with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
            main(["--help"])
        assert "batch_runner.cli" in sys.modules and "gpu_workers._workers_cli" in sys.modules, "help did not load the plugins"
        print(*sorted(m for m in sys.modules if m.split(".")[0] in {"pyspark", "spark_udfs", "vllm", "torch", "mlflow", "transformers"}))
    """, str(tmp_path))
    assert loaded == []


def test_a_command_imports_only_the_module_that_registers_it(plugin):
    loaded = _run_python("""
        import contextlib, io, sys
        from ai_query._commands import main
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["hello"]) == 0
        print(*sorted(m for m in ("aiq_fake_plugin", "batch_runner.cli", "gpu_workers", "ai_query.serving", "ai_query.testing")
                      if m in sys.modules))
    """, str(plugin))
    assert loaded == ["aiq_fake_plugin"]


def test_sample_data_then_status_json_needs_no_spark(tmp_path, capsys):
    assert main(["sample-data", str(tmp_path / "reviews"), "--rows", "12"]) == 0
    assert capsys.readouterr().out == f"wrote 12 sample reviews to {tmp_path / 'reviews'}\n"
    job = tmp_path / "job.toml"
    job.write_text(textwrap.dedent("""\
        name = "status-json"
        key = ["review_id"]
        query = "SELECT review_id, ai_query('local-chat', review) AS answer FROM reviews"
        [sources]
        reviews = "reviews"
        [output]
        path = "out"
        mode = "merge"
    """))
    state = tmp_path / "out.aiq"
    state.mkdir()
    (state / "runs.jsonl").write_text("".join(json.dumps({"run_id": f"r{i}", "started": f"2026-01-0{i}T00:00:00", "status": "done", "rows": i}) + "\n"
                                              for i in (1, 2, 3)))
    assert main(["status", str(job), "--json", "--last", "2"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["job"], status["done"], status["failed"], status["pending"], status["usage_requests"]) == ("status-json", 0, 0, 12, 0)
    assert [r["run_id"] for r in status["runs"]] == ["r2", "r3"]
    assert main(["status", str(job)]) == 0
    text = capsys.readouterr().out
    assert "pending               12" in text
    header, *runs = text.splitlines()[-4:]  # the runs table: a header, then one line per run
    assert header.split() == ["STARTED", "STATUS", "ROWS", "FAILED", "TOKENS"]
    assert [r.split()[:3] for r in runs] == [["2026-01-01T00:00:00", "done", "1"], ["2026-01-02T00:00:00", "done", "2"],
                                             ["2026-01-03T00:00:00", "done", "3"]]


def test_workers_status_json_and_its_empty_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AIQ_CACHE_DIR", str(tmp_path))  # no pool recorded in this cache
    assert main(["workers", "status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["workers", "status"]) == 0
    assert capsys.readouterr().out.startswith(f"no vLLM pools under {tmp_path}")


def test_status_of_a_priced_job_with_no_usage_yet_costs_zero_not_unknown(tmp_path, capsys):
    """Mutation caught: ``job_priced`` always False (the status says "unknown (no pricing)" again)."""
    assert main(["sample-data", str(tmp_path / "reviews"), "--rows", "3"]) == 0
    model = {"name": "m", "provider": "openai", "task": "llm/v1/chat",
             "openai_config": {"openai_api_key": "{{secrets/p/key}}", "openai_api_base": "http://127.0.0.1:9/v1"}}
    price = {"input_usd_per_million_tokens": 1.0, "output_usd_per_million_tokens": 2.0}
    (tmp_path / "endpoints.json").write_text(json.dumps([
        {"name": "priced-chat", "config": {"served_entities": [{"name": "m", "pricing": price, "external_model": model}]}},
        {"name": "free-chat", "config": {"served_entities": [{"name": "m", "external_model": model}]}}]))
    for name, endpoint, cost in (("priced", "priced-chat", "0.0000 USD"), ("unpriced", "free-chat", "unknown (no pricing)")):
        job = tmp_path / f"{name}.toml"
        job.write_text(textwrap.dedent(f"""\
            name = "{name}"
            key = ["review_id"]
            endpoints = "endpoints.json"
            query = "SELECT review_id, ai_query('{endpoint}', review) AS answer FROM reviews"
            [sources]
            reviews = "reviews"
            [output]
            path = "out-{name}"
            mode = "merge"
        """))
        capsys.readouterr()
        assert main(["status", str(job), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["usage_cost_usd"] == (0.0 if name == "priced" else None)
        assert main(["status", str(job)]) == 0
        assert cost in capsys.readouterr().out


def test_workers_start_refuses_options_that_are_not_a_json_object(capsys):
    for bad, why in (("{bad", "is not JSON (Expecting property name"), ("[1]", "is not a JSON object")):
        with pytest.raises(SystemExit) as exit_:
            main(["workers", "start", "--model", "tiny-llama", "--options", bad])
        err = capsys.readouterr().err
        assert exit_.value.code == 64 and f"argument --options: {bad!r} {why}" in err and '{"dtype": "bfloat16"}' in err


def test_prepare_names_the_known_aliases(capsys):
    assert main(["prepare", "tiny-lama"]) == 2
    assert capsys.readouterr().err == (
        "ai-query: ConfigError: unknown model alias(es) ['tiny-lama']; known: ['all-minilm-l6-v2', 'smollm2-135m-instruct', "
        "'tiny-llama']. Pick known aliases, or pass no alias to prepare them all\n")


def test_job_commands_show_our_error_from_inside_a_spark_failure():
    from batch_runner.cli import PLAN_COMMAND, RUN_COMMAND, SCHEDULE_COMMAND, STATUS_COMMAND

    wrapped = RuntimeError("An error occurred while calling o42.collectToPython.\n: org.apache.spark.SparkException: Job aborted\n"
                           "  File \"/x/_udf.py\", line 9, in run\nai_query._errors.UnknownEndpointError: unknown endpoint 'nope': "
                           "known endpoints are 'sim-chat'.\n\tat org.apache.spark.api.python.BasePythonRunner")
    for command in (RUN_COMMAND, PLAN_COMMAND, STATUS_COMMAND, SCHEDULE_COMMAND):
        assert command.explain_error(wrapped) == "UnknownEndpointError: unknown endpoint 'nope': known endpoints are 'sim-chat'."
