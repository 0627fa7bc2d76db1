"""Bad-input catalogue, jobs and command line: job specs, endpoint configs, secrets, paths, the
input's keys, and the arguments of ``run``, ``plan``, ``status``, ``schedule``, ``serve`` and
``workers``.

Every case runs the real ``ai-query`` entry (``ai_query._commands.main``, in process; two cases
as a real subprocess, for the process's own stderr and exit status) and asserts: exit code 1
(2 for argparse's own errors); stderr one paragraph with no traceback (argparse's own errors: usage plus one line); the message
names the bad value and the fix; the provider simulator on 127.0.0.1 received no paid request;
and nothing was written (no output, usage or state directory). The checks that need the input
(a key column, a join that repeats keys) run ``run_incremental`` on the test session's Spark.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import write_deltalake

from ai_query import ConfigError
from ai_query._commands import main
from ai_query.testing import ProviderSimulator

pytestmark = pytest.mark.integration

KEY = "sk-catalogue"


@pytest.fixture(scope="module")
def sim():
    with ProviderSimulator(api_key=KEY, endpoint_names=["sim-serving"]) as s:
        yield s


def openai_entity(base: str, key: dict | None = None, **extra) -> dict:
    return {"name": "e", **extra, "external_model": {"name": "sim-model", "provider": "openai", "task": "llm/v1/chat",
            "openai_config": {"openai_api_base": base, **(key if key is not None else {"openai_api_key_plaintext": KEY})}}}


def write_endpoints(root: Path, sim, endpoint: dict | None = None) -> None:
    eps = [{"name": "sim-chat", "config": {"served_entities": [openai_entity(sim.base_url)]}}]
    if endpoint is not None:
        eps.append(endpoint)
    (root / "endpoints.json").write_text(json.dumps(eps))


@pytest.fixture
def work(tmp_path, sim, monkeypatch):
    """A job folder: endpoints.json, a 6-row Delta source with unique ids, and the simulator reset."""
    monkeypatch.chdir(tmp_path)
    write_endpoints(tmp_path, sim)
    write_deltalake(str(tmp_path / "reviews"), pa.table({"id": [1, 2, 3, 4, 5, 6], "part": ["a", "a", "b", "b", "c", "c"],
                                                       "text": [f"review {i}" for i in range(6)]}))
    sim.reset()
    return tmp_path


def job_toml(endpoint: str = "sim-chat", key: str = '["id"]', output: str = 'path = "out"\nmode = "merge"',
             options: str = "", extra: str = "", query: str | None = None) -> str:
    query = query or f"SELECT id, ai_query('{endpoint}', text) AS answer FROM reviews"
    return textwrap.dedent(f'''\
name = "cat"
endpoints = "endpoints.json"
key = {key}
query = """{query}"""
{extra}
[sources]
reviews = "reviews"
[output]
{output}
[options]
chunk_rows = 3
{options}
''')


def _setup_endpoint(endpoint: dict):
    def setup(work: Path, sim, monkeypatch) -> None:
        write_endpoints(work, sim, json.loads(json.dumps(endpoint).replace("SIM_BASE", sim.base_url).replace("SIM_URL", sim.url)))
    return setup


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _file(name: str):
    def setup(work: Path, sim, monkeypatch) -> None:
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text("not a directory")
    return setup


def _duplicate_source(ids: list[int], parts: list[str] | None = None):
    def setup(work: Path, sim, monkeypatch=None) -> None:
        data = {"id": ids, "part": parts or ["a"] * len(ids), "text": [f"t{i}" for i in range(len(ids))]}
        write_deltalake(str(work / "reviews"), pa.table(data), mode="overwrite")
    return setup


def _unreachable(work: Path, sim, monkeypatch) -> None:
    write_endpoints(work, sim, ep(openai_entity(f"http://127.0.0.1:{_closed_port()}/v1")))


def _secrets_file(entity: dict):
    def setup(work: Path, sim, monkeypatch) -> None:
        _setup_endpoint(ep(entity))(work, sim, monkeypatch)
        monkeypatch.setenv("AIQ_SECRETS_FILE", str(work / "no-secrets.json"))
    return setup


EP = "ep"


def ep(entity: dict) -> dict:
    return {"name": EP, "config": {"served_entities": [entity]}}


# (id, argv after "ai-query", job.toml text or None, setup(work, sim) or None, fragments the message must hold)
RUN_CASES = [
    # -- the spec file ---------------------------------------------------------------------------
    ("run-missing-file", ["run", "nope.toml"], None, None, ["nope.toml"]),
    ("run-toml-syntax", ["run", "job.toml"], 'name = "cat"\nquery = """SELECT', None, ["job.toml"]),
    ("run-unknown-top-key", ["run", "job.toml"], job_toml(extra='colour = "red"'), None, ["colour", "allowed are"]),
    ("run-no-query", ["run", "job.toml"], job_toml().replace('query = """', 'nquery = """'), None, ["nquery"]),
    ("run-query-not-select", ["run", "job.toml"], job_toml(query="DELETE FROM reviews"), None, ["query", "SELECT"]),
    ("run-bad-name", ["run", "job.toml"], job_toml().replace('name = "cat"', 'name = "c a/t"'), None, ["name", "'c a/t'"]),
    ("run-no-output-path", ["run", "job.toml"], job_toml(output='mode = "merge"'), None, ["[output]", "path ="]),
    ("run-bad-output-mode", ["run", "job.toml"], job_toml(output='path = "out"\nmode = "upsert"'), None, ["upsert"]),
    ("run-merge-without-key", ["run", "job.toml"], job_toml(key="[]"), None, ["merge", "key"]),
    ("run-key-not-names", ["run", "job.toml"], job_toml(key="[1, 2]"), None, ["key", "[1, 2]"]),
    ("run-unknown-output-key", ["run", "job.toml"], job_toml(output='path = "out"\nmode = "merge"\nusage = "u"'), None,
     ["usage", "usage_path"]),
    ("run-unknown-option", ["run", "job.toml"], job_toml(options="chunks = 4"), None, ["chunks", "chunk_rows"]),
    ("run-failure-rate-over-1", ["run", "job.toml"], job_toml(options="allowed_failure_rate = 2"), None,
     ["allowed_failure_rate", "between 0 and 1"]),
    ("run-chunk-rows-0", ["run", "job.toml"], job_toml(options="chunk_rows = 0").replace("chunk_rows = 3\n", ""), None,
     ["chunk_rows", ">= 1"]),
    ("run-negative-budget", ["run", "job.toml"], job_toml(options="max_cost_usd = -1"), None, ["max_cost_usd", "positive"]),
    ("run-no-sources", ["run", "job.toml"], job_toml().replace('[sources]\nreviews = "reviews"\n', ""), None, ["[sources]"]),
    ("run-input-view-unknown", ["run", "job.toml"], job_toml(extra='[input]\nview = "other"'), None, ["'other'", "[sources]"]),
    ("run-bad-schedule", ["run", "job.toml"], job_toml(extra='schedule = "61 * * * *"'), None, ["61"]),
    # -- arguments ---------------------------------------------------------------------------------
    ("run-limit-0", ["run", "job.toml", "--limit", "0"], job_toml(), None, ["--limit", "0", ">= 1"]),
    ("run-retry-failed-overwrite", ["run", "job.toml", "--retry-failed"], job_toml(output='path = "out"', key="[]"), None,
     ["--retry-failed", "key = [...]"]),
    # -- endpoints and endpoint configs -----------------------------------------------------------
    ("run-unknown-endpoint", ["run", "job.toml"], job_toml(endpoint="no-such-endpoint"), None, ["'no-such-endpoint'", "sim-chat"]),
    ("run-endpoint-a-number", ["run", "job.toml"], job_toml(query="SELECT id, ai_query(42, text) AS answer FROM reviews"), None,
     ["ai_query(42, ...)", "must be a string", "'my-endpoint'"]),
    ("run-endpoint-argument-missing", ["run", "job.toml"], job_toml(query="SELECT id, ai_query(text) AS answer FROM reviews"), None,
     ["ai_query", "request"]),
    ("run-endpoints-file-missing", ["run", "job.toml"], job_toml().replace('endpoints = "endpoints.json"', 'endpoints = "gone.json"'),
     None, ["gone.json", "check the path"]),
    ("run-endpoints-file-not-json", ["run", "job.toml"], job_toml(), lambda w, s, m: (w / "endpoints.json").write_text("{nope"),
     ["endpoints.json", "not valid JSON"]),
    ("run-endpoint-unknown-provider", ["run", "job.toml"], job_toml(endpoint=EP), _setup_endpoint(ep({"name": "e", "external_model": {
        "name": "m", "provider": "openaiz", "task": "llm/v1/chat"}})), ["openaiz"]),
    ("run-endpoint-bad-task", ["run", "job.toml"], job_toml(endpoint=EP), _setup_endpoint(ep({"name": "e", "external_model": {
        "name": "m", "provider": "openai", "task": "llm/v1/chatz", "openai_config": {"openai_api_key_plaintext": "k"}}})),
     ["llm/v1/chatz"]),
    ("run-endpoint-key-not-a-reference", ["run", "job.toml"], job_toml(endpoint=EP),
     _setup_endpoint(ep(openai_entity("SIM_BASE", {"openai_api_key": "sk-plain"}))), ["openai_api_key", "{{secrets/"]),
    ("run-endpoint-bad-url", ["run", "job.toml"], job_toml(endpoint=EP),
     _setup_endpoint(ep(openai_entity("localhost:99/v1"))), ["openai_api_base", "localhost:99/v1"]),
    ("run-endpoint-no-entities", ["run", "job.toml"], job_toml(endpoint=EP), _setup_endpoint({"name": EP, "config": {"served_entities": []}}),
     ["served_entities"]),
    ("run-max-concurrency-unknown-endpoint", ["run", "job.toml"], job_toml(options='max_concurrency = {"nope" = 2}'), None,
     ["'nope'"]),
    ("run-budget-without-pricing", ["run", "job.toml"], job_toml(options="max_cost_usd = 1.0"), None,
     ["max_cost_usd", "'sim-chat'", "pricing", "max_tokens"]),
    # -- secrets (resolved on the driver, before Spark) ------------------------------------------
    ("run-secret-unset", ["run", "job.toml"], job_toml(endpoint=EP),
     _setup_endpoint(ep(openai_entity("SIM_BASE", {"openai_api_key": "{{secrets/cat/unset_key}}"}))),
     ["'ep'", "{{secrets/cat/unset_key}}", "AIQ_SECRET_CAT_UNSET_KEY"]),
    ("run-secrets-file-unreadable", ["run", "job.toml"], job_toml(endpoint=EP),
     _secrets_file(openai_entity("SIM_BASE", {"openai_api_key": "{{secrets/cat/file_key}}"})),
     ["AIQ_SECRETS_FILE", "no-secrets.json"]),
    ("run-secret-unset-anthropic", ["run", "job.toml"], job_toml(endpoint=EP), _setup_endpoint(ep({"name": "e", "external_model": {
        "name": "claude", "provider": "anthropic", "task": "llm/v1/chat",
        "anthropic_config": {"anthropic_api_base": "SIM_URL", "anthropic_api_key": "{{secrets/cat/claude}}"}}})),
     ["{{secrets/cat/claude}}", "AIQ_SECRET_CAT_CLAUDE"]),
    # -- the free probe: unreachable, 401, 404 ---------------------------------------------------
    ("run-probe-bad-key", ["run", "job.toml"], job_toml(endpoint=EP),
     _setup_endpoint(ep(openai_entity("SIM_BASE", {"openai_api_key_plaintext": "sk-wrong"}))), ["'ep'", "refuses its key", "401"]),
    ("run-probe-unreachable", ["run", "job.toml"], job_toml(endpoint=EP), _unreachable, ["'ep'", "unreachable", "openai_api_base"]),
    ("run-probe-404-base-without-v1", ["run", "job.toml"], job_toml(endpoint=EP),
     _setup_endpoint(ep(openai_entity("SIM_URL"))), ["'ep'", "404", "/v1", "--no-probe"]),
    ("run-probe-anthropic-bad-key", ["run", "job.toml"], job_toml(endpoint=EP), _setup_endpoint(ep({"name": "e", "external_model": {
        "name": "claude", "provider": "anthropic", "task": "llm/v1/chat",
        "anthropic_config": {"anthropic_api_base": "SIM_URL", "anthropic_api_key_plaintext": "wrong"}}})), ["refuses its key", "401"]),
    ("run-probe-serving-unknown-name", ["run", "job.toml"], job_toml(endpoint=EP), _setup_endpoint(ep({"name": "e", "external_model": {
        "name": "no-such-serving", "provider": "databricks-model-serving", "task": "llm/v1/chat",
        "databricks_model_serving_config": {"databricks_workspace_url": "SIM_URL", "databricks_api_token_plaintext": KEY}}})),
     ["no-such-serving", "404"]),
    ("run-probe-serving-bad-token", ["run", "job.toml"], job_toml(endpoint=EP), _setup_endpoint(ep({"name": "e", "external_model": {
        "name": "sim-serving", "provider": "databricks-model-serving", "task": "llm/v1/chat",
        "databricks_model_serving_config": {"databricks_workspace_url": "SIM_URL", "databricks_api_token_plaintext": "bad"}}})),
     ["refuses its key", "401"]),
    # -- paths the job writes ---------------------------------------------------------------------
    ("run-output-is-a-file", ["run", "job.toml"], job_toml(), _file("out"), ["output.path", "is a file"]),
    ("run-output-under-a-file", ["run", "job.toml"], job_toml(output='path = "blob/out"\nmode = "merge"'), _file("blob"),
     ["output.path", "blob", "is a file"]),
    ("run-usage-path-unwritable", ["run", "job.toml"], job_toml(output='path = "out"\nmode = "merge"\nusage_path = "/proc/aiq/usage"'),
     None, ["output.usage_path", "/proc/aiq/usage", "writable"]),
    ("run-usage-path-a-file", ["run", "job.toml"], job_toml(output='path = "out"\nmode = "merge"\nusage_path = "usage"'), _file("usage"),
     ["output.usage_path", "is a file"]),
    ("run-state-dir-unwritable", ["run", "job.toml"], job_toml(output='path = "out"\nmode = "merge"\nstate_dir = "/sys/aiq-state"'),
     None, ["state_dir", "/sys/aiq-state"]),
    ("run-inference-path-a-file", ["run", "job.toml"], job_toml(output='path = "out"\nmode = "merge"\ninference_path = "payloads"'),
     _file("payloads"), ["output.inference_path", "is a file"]),
    ("run-overwrite-output-unwritable", ["run", "job.toml"], job_toml(key="[]", output='path = "/proc/aiq-out"'), None,
     ["output.path", "/proc/aiq-out"]),
    # -- the input's keys (read with delta-rs, before Spark) -------------------------------------
    ("run-duplicate-key", ["run", "job.toml"], job_toml(), _duplicate_source([1, 2, 2, 3, 4]), ["2 (2 rows)", "key = [...]"]),
    ("run-duplicate-keys-many", ["run", "job.toml"], job_toml(), _duplicate_source([1, 1, 2, 2, 3, 3, 4, 4, 5]),
     ["1 (2 rows)", "and 1 more"]),
    ("run-duplicate-composite-key", ["run", "job.toml"], job_toml(key='["id", "part"]', query=(
        "SELECT id, part, ai_query('sim-chat', text) AS answer FROM reviews")), _duplicate_source([1, 1, 2], ["a", "a", "a"]),
     ["(1, 'a') (2 rows)", "id, part"]),
    # -- plan / status / schedule -----------------------------------------------------------------
    ("plan-missing-file", ["plan", "nope.toml"], None, None, ["nope.toml"]),
    ("plan-limit-0", ["plan", "job.toml", "--limit", "0"], job_toml(), None, ["--limit", ">= 1"]),
    ("plan-pilot-bad-key", ["plan", "job.toml"], job_toml(endpoint=EP),
     _setup_endpoint(ep(openai_entity("SIM_BASE", {"openai_api_key_plaintext": "sk-wrong"}))), ["refuses its key"]),
    ("plan-duplicate-key", ["plan", "job.toml", "--no-pilot"], job_toml(), _duplicate_source([7, 7]), ["7 (2 rows)"]),
    ("status-not-incremental", ["status", "job.toml"], job_toml(key="[]", output='path = "out"'), None, ["status", "key = [...]"]),
    ("status-missing-file", ["status", "gone.toml"], None, None, ["gone.toml"]),
    ("schedule-no-schedule", ["schedule", "job.toml", "--max-runs", "1"], job_toml(), None, ["no schedule", "--cron"]),
    ("schedule-bad-cron", ["schedule", "job.toml", "--cron", "* * 32 * *", "--max-runs", "1"], job_toml(), None, ["32"]),
    ("schedule-short-cron", ["schedule", "job.toml", "--cron", "* *", "--max-runs", "1"], job_toml(), None, ["'* *'", "five"]),
    ("schedule-secret-unset", ["schedule", "job.toml", "--cron", "0 2 * * *", "--max-runs", "1"], job_toml(endpoint=EP),
     _setup_endpoint(ep(openai_entity("SIM_BASE", {"openai_api_key": "{{secrets/cat/sched}}"}))), ["AIQ_SECRET_CAT_SCHED"]),
    ("schedule-output-a-file", ["schedule", "job.toml", "--cron", "0 2 * * *", "--max-runs", "1"], job_toml(), _file("out"),
     ["output.path", "is a file"]),
    # -- serve: startup -----------------------------------------------------------------------------
    ("serve-endpoints-not-json", ["serve", "--endpoints", "bad.json", "--port", "0"], None,
     lambda w, s, m: (w / "bad.json").write_text("{bad"), ["bad.json", "not valid JSON"]),
    ("serve-endpoints-missing", ["serve", "--endpoints", "missing.json", "--port", "0"], None, None, ["missing.json", "check the path"]),
    ("serve-endpoints-invalid", ["serve", "--endpoints", "endpoints.json", "--port", "0"], None,
     _setup_endpoint({"name": EP, "config": {"served_entities": [{"name": "x", "external_model": {"name": "m", "provider": "nope",
                                                                                                  "task": "llm/v1/chat"}}]}}), ["nope"]),
    ("serve-endpoints-secret-unset", ["serve", "--endpoints", "endpoints.json", "--port", "0"], None,
     _setup_endpoint(ep(openai_entity("SIM_BASE", {"openai_api_key": "{{secrets/cat/serve_ep}}"}))),
     ["'ep'", "AIQ_SECRET_CAT_SERVE_EP"]),
    ("serve-tokens-bad-level", ["serve", "--tokens", "tokens.json", "--port", "0"], None, lambda w, s, m: (w / "tokens.json").write_text(
        json.dumps({"tokens": [{"user": "u", "token": "t", "permissions": {"chat": "CAN_FLY"}}]})), ["'CAN_FLY'", "CAN_QUERY"]),
    ("serve-tokens-not-json", ["serve", "--tokens", "tokens.json", "--port", "0"], None,
     lambda w, s, m: (w / "tokens.json").write_text("[{"), ["tokens.json", "not valid JSON"]),
    ("serve-tokens-shape", ["serve", "--tokens", "tokens.json", "--port", "0"], None,
     lambda w, s, m: (w / "tokens.json").write_text('{"u": "t"}'), ["tokens.json", '"tokens"']),
    ("serve-tokens-secret-unset", ["serve", "--tokens", "tokens.json", "--port", "0"], None, lambda w, s, m: (w / "tokens.json").write_text(
        json.dumps({"tokens": [{"user": "u", "token": "{{secrets/cat/serve_tok}}"}]})), ["AIQ_SECRET_CAT_SERVE_TOK"]),
    ("serve-tokens-duplicate", ["serve", "--tokens", "tokens.json", "--port", "0"], None, lambda w, s, m: (w / "tokens.json").write_text(
        json.dumps({"tokens": [{"user": "u", "token": "same"}, {"user": "v", "token": "same"}]})), ["'u'", "unique"]),
    ("serve-state-dir-a-file", ["serve", "--state-dir", "state", "--port", "0"], None, _file("state"), ["--state-dir", "is a file"]),
    ("serve-usage-table-unwritable", ["serve", "--usage-table", "/proc/aiq-usage", "--port", "0"], None, None,
     ["--usage-table", "/proc/aiq-usage"]),
    ("serve-port-in-use", ["serve", "--port", "PORT_IN_USE"], None, None, ["cannot listen", "Address already in use", "--port"]),
    ("serve-port-in-use-one-worker", ["serve", "--port", "PORT_IN_USE", "--workers", "1"], None, None, ["cannot listen", "--port"]),
    ("serve-workers-0", ["serve", "--workers", "0", "--port", "0"], None, None, ["--workers", "0"]),
]

ARGPARSE_CASES = [  # argparse refuses these itself: usage, then one line naming the value
    ("serve-port-99999", ["serve", "--port", "99999"], ["'99999'", "65535"]),
    ("serve-port-not-a-number", ["serve", "--port", "http"], ["'http'", "port"]),
    ("serve-max-request-mb-0", ["serve", "--max-request-mb", "0"], ["'0'", "megabytes"]),
    ("serve-max-request-mb-nan", ["serve", "--max-request-mb", "nan"], ["'nan'", "megabytes"]),
    ("serve-http-client", ["serve", "--http-client", "curl"], ["'curl'", "httptools"]),
    ("run-no-job", ["run"], ["JOB.toml"]),
    ("run-limit-not-a-number", ["run", "job.toml", "--limit", "ten"], ["'ten'"]),
    ("status-last-not-a-number", ["status", "job.toml", "--last", "x"], ["'x'"]),
    ("schedule-max-runs-not-a-number", ["schedule", "job.toml", "--max-runs", "once"], ["'once'"]),
    ("workers-start-no-model", ["workers", "start"], ["--model"]),
    ("workers-start-options-not-json", ["workers", "start", "--model", "tiny-llama", "--options", "[1"], ["--options"]),
    ("workers-start-bad-device", ["workers", "start", "--model", "tiny-llama", "--device", "tpu"], ["'tpu'"]),
    ("unknown-command", ["runn", "job.toml"], ["'runn'"]),
]


def _nothing_written(work: Path, before: set[str]) -> None:
    after = {p.name for p in work.iterdir()}
    assert after == before, f"the refused command wrote {sorted(after - before)}"


@pytest.mark.parametrize("argv,spec,setup,fragments", [c[1:] for c in RUN_CASES], ids=[c[0] for c in RUN_CASES])
def test_bad_job_or_option_exits_2_with_one_paragraph_before_any_request(work, sim, capsys, monkeypatch, argv, spec, setup,
                                                                          fragments):
    if spec is not None:
        (work / "job.toml").write_text(spec.replace("SIM_BASE", sim.base_url))
    monkeypatch.delenv("AIQ_SECRETS_FILE", raising=False)
    if setup is not None:
        setup(work, sim, monkeypatch)
    listener = None
    if "PORT_IN_USE" in argv:
        listener = socket.create_server(("127.0.0.1", 0))
        argv = [str(listener.getsockname()[1]) if a == "PORT_IN_USE" else a for a in argv]
    before = {p.name for p in work.iterdir()}
    capsys.readouterr()
    try:
        code = main(argv)
    finally:
        if listener is not None:
            listener.close()
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    message = next((line for line in lines if line.startswith("ai-query:")), "")
    assert code == 2, err
    assert "Traceback" not in err and message, err
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert sim.stats.requests == 0, "a refused job sent a paid request"
    _nothing_written(work, before)


@pytest.mark.parametrize("argv,fragments", [c[1:] for c in ARGPARSE_CASES], ids=[c[0] for c in ARGPARSE_CASES])
def test_bad_argument_is_refused_by_the_parser(work, sim, capsys, argv, fragments):
    before = {p.name for p in work.iterdir()}
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 64 and "Traceback" not in err, err  # a usage error, not a systemic one (2)
    last = err.strip().splitlines()[-1]
    assert "error:" in last and all(f in last for f in fragments), last
    assert sim.stats.requests == 0
    _nothing_written(work, before)


# -- through a real process: the process's own stderr and exit status ---------------------------


@pytest.mark.parametrize("case", ["secret-unset", "duplicate-key"])
def test_a_real_ai_query_process_prints_one_line_and_exits_2(work, sim, case):
    """The issue's two worst cases: 77 traceback lines for an unset secret, 4 paid requests for a duplicate key."""
    if case == "secret-unset":
        write_endpoints(work, sim, ep(openai_entity(sim.base_url, {"openai_api_key": "{{secrets/cat/proc_key}}"})))
        (work / "job.toml").write_text(job_toml(endpoint=EP))
        fragment = "AIQ_SECRET_CAT_PROC_KEY"
    else:
        _duplicate_source([1, 2, 3, 3])(work, sim)
        (work / "job.toml").write_text(job_toml())
        fragment = "3 (2 rows)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIQ_SECRET")}
    before = {p.name for p in work.iterdir()}
    done = subprocess.run([sys.executable, "-m", "ai_query", "run", "job.toml", "--no-progress"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and fragment in lines[0], done.stderr
    assert sim.stats.requests == 0
    _nothing_written(work, before)


# -- checks that need the input: Spark -----------------------------------------------------------

SPARK_CASES = [
    ("key-column-missing", job_toml(key='["review_id"]'), ["review_id", "'reviews'", "id, part, text"]),
    ("join-repeats-keys", job_toml(query="SELECT r.id, ai_query('sim-chat', r.text) AS answer FROM reviews r JOIN reviews s "
                                   "ON r.part = s.part"), ["several rows for one key", "joins"]),
    ("input-sql-repeats-keys", job_toml(extra='[input]\nview = "inp"\nsql = "SELECT r.* FROM reviews r JOIN reviews s ON r.part = s.part"',
                                        query="SELECT id, ai_query('sim-chat', text) AS answer FROM inp"),
     ["several rows for one key", "'inp'"]),
    ("key-not-selected", job_toml(query="SELECT text, ai_query('sim-chat', text) AS answer FROM reviews"), ["id", "select them"]),
    ("input-sql-fails", job_toml(extra='[input]\nview = "inp"\nsql = "SELECT nope FROM reviews"',
                                 query="SELECT id, ai_query('sim-chat', text) AS answer FROM inp"), ["input.sql", "[input]"]),
]


@pytest.mark.spark
@pytest.mark.parametrize("spec,fragments", [c[1:] for c in SPARK_CASES], ids=[c[0] for c in SPARK_CASES])
def test_input_checks_refuse_before_any_request(spark, work, sim, spec, fragments):
    from batch_runner import run_incremental
    from batch_runner._spec import JobSpec

    (work / "job.toml").write_text(spec)
    with pytest.raises(ConfigError) as refused:
        run_incremental(JobSpec.load(work / "job.toml"), spark, progress=False)
    for fragment in fragments:
        assert fragment in str(refused.value), f"{fragment!r} not in {refused.value}"
    assert sim.stats.requests == 0
    assert not (work / "out").exists()


@pytest.mark.spark
def test_spark_sql_resolves_an_unset_secret_on_the_driver(spark, work, sim):
    """The issue's 77 traceback lines: executors found the unset secret. Now the driver does, before any task."""
    import spark_udfs
    from ai_query import EndpointRegistry, SecretNotFoundError

    write_endpoints(work, sim, ep(openai_entity(sim.base_url, {"openai_api_key": "{{secrets/cat/sql_key}}"})))
    spark_udfs.register(spark, EndpointRegistry.from_file(work / "endpoints.json"))
    with pytest.raises(SecretNotFoundError) as refused:
        spark_udfs.sql(spark, "SELECT ai_query('ep', 'hello') AS a").collect()
    assert "'ep'" in str(refused.value) and "AIQ_SECRET_CAT_SQL_KEY" in str(refused.value)
    assert sim.stats.requests == 0
