"""A provider that echoes the key it was sent (401, 400 and 500 bodies) puts it nowhere of ours.

The provider is the simulator with ``echo_key=True``, a real HTTP server on 127.0.0.1 speaking the
OpenAI and Anthropic wire formats. Three real processes talk to it, each with its own Spark or
server: a ``spark.sql`` script (``failOnError`` false and true, a 401), an ``ai-query run`` job with
usage and payload tables (and a job whose key is refused), and ``ai-query serve`` with its usage
and inference tables, an API-created endpoint with a plaintext key and a registry endpoint with
a secret reference. Then every artefact is searched for the keys: every file the three wrote
(Delta tables' parquet and JSON log files as bytes, and each parquet file's values decoded, as
compression could hide a key from a byte search), the state dirs, the processes' stdout and
stderr (Spark's driver and executor logs, the job's messages, the server's log) and the HTTP
answers. None may hold a key; the errors must still say what happened.

Mutation: ``redact`` returning its text unchanged (``ai_query/_redact.py``) fails this test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, write_deltalake

from ai_query.testing import ProviderSimulator

pytestmark = pytest.mark.spark

# Keys of no well-known shape (only the known-values net can catch them) and one of OpenAI's shape.
GOOD = "zq-good-" + uuid.uuid4().hex          # the provider's key, behind {{secrets/leak/good}} (environment)
WRONG = "sk-proj-" + uuid.uuid4().hex         # a refused key, behind {{secrets/leak/wrong}} (secrets file)
PLAIN = "plain-" + uuid.uuid4().hex           # a refused key given in plain text to the serving API
KEYS = (GOOD, WRONG, PLAIN)
ROWS = ["ok row", "[[status:400]] bad row", "[[status:500]] failing row"]

SQL_SCRIPT = textwrap.dedent('''
    import json, sys
    import spark_udfs
    from spark_udfs._session import build_session

    endpoints, out = sys.argv[1], sys.argv[2]
    spark = build_session(app_name="secret-echo")
    spark_udfs.register(spark, endpoints)
    spark.createDataFrame([(i, p) for i, p in enumerate(json.loads(sys.argv[3]))], "id INT, prompt STRING").createOrReplaceTempView("prompts")
    df = spark.sql("""SELECT id, ai_query('sim-openai', prompt, failOnError => false) AS o,
                             ai_query('sim-anthropic', prompt, failOnError => false) AS a FROM prompts""")
    df.write.format("delta").mode("overwrite").save(out)
    rows = sorted(spark.read.format("delta").load(out).collect(), key=lambda r: r.id)
    print("ROWS " + json.dumps([[r.o.errorMessage, r.a.errorMessage] for r in rows]), flush=True)
    for name, query in (("fail_on_error", "SELECT ai_query('sim-openai', prompt, failOnError => true) FROM prompts WHERE id = 1"),
                        ("refused_key", "SELECT ai_query('sim-wrong', prompt) FROM prompts WHERE id = 0")):
        try:
            spark.sql(query).collect()
            print(name.upper() + " no error", flush=True)
        except Exception as exc:
            print(name.upper() + " " + json.dumps(type(exc).__name__ + ": " + str(exc)), flush=True)
    spark.stop()
''')


def _endpoint(name: str, provider: str, base: str, credential: dict) -> dict:
    config_key = "openai_config" if provider == "openai" else "anthropic_config"
    base_key = "openai_api_base" if provider == "openai" else "anthropic_api_base"
    return {"name": name, "config": {"served_entities": [{"name": name + "-entity", "external_model": {
        "name": "sim-model", "provider": provider, "task": "llm/v1/chat", config_key: {**credential, base_key: base}}}]},
        "client_config": {"max_attempts": 2, "retry_backoff_s": 0.01}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("secret-echo")
    inputs, outputs = root / "inputs", root / "outputs"
    inputs.mkdir()
    outputs.mkdir()
    with ProviderSimulator(api_key=GOOD, echo_key=True) as sim:
        (inputs / "endpoints.json").write_text(json.dumps([
            _endpoint("sim-openai", "openai", sim.base_url, {"openai_api_key": "{{secrets/leak/good}}"}),
            _endpoint("sim-anthropic", "anthropic", sim.url, {"anthropic_api_key": "{{secrets/leak/good}}"}),
            _endpoint("sim-wrong", "openai", sim.base_url, {"openai_api_key": "{{secrets/leak/wrong}}"}),
        ]))
        (inputs / "secrets.json").write_text(json.dumps({"leak": {"wrong": WRONG}}))
        env = {**os.environ, "AIQ_SECRET_LEAK_GOOD": GOOD, "AIQ_SECRETS_FILE": str(inputs / "secrets.json"),
               "PYTHONUNBUFFERED": "1", "AIQ_SERVING_STATE_KEY": str(inputs / "state.key")}
        yield sim, inputs, outputs, env


def _run(args: list[str], env: dict, cwd: Path | None = None, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def _line(stdout: str, tag: str) -> object:
    match = re.search(rf"^{tag} (.*)$", stdout, re.M)
    assert match, f"no {tag} line in:\n{stdout}"
    return json.loads(match.group(1))


def _serve(inputs: Path, outputs: Path, env: dict, sim_base_url: str) -> tuple[dict[str, httpx.Response], str]:
    """``ai-query serve``: the HTTP answers to failing queries, and everything the server printed."""
    proc = subprocess.Popen([sys.executable, "-m", "ai_query.serving", "--port", "0", "--endpoints", str(inputs / "endpoints.json"),
                             "--state-dir", str(outputs / "serving-state"), "--usage-table", str(outputs / "serving-usage"),
                             "--inference-table", str(outputs / "serving-inference"), "--log-level", "debug", "--access-log", "--workers", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    answers: dict[str, httpx.Response] = {}
    try:
        first = ""
        while (found := re.search(r"serving on (http://127\.0\.0\.1:\d+)", first)) is None and proc.poll() is None:
            first += proc.stdout.readline()
        assert found, first
        url = found.group(1)
        with httpx.Client(base_url=url, timeout=60) as c:
            for _ in range(100):
                try:
                    if c.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
            plain = _endpoint("plain", "openai", sim_base_url, {"openai_api_key_plaintext": PLAIN})
            answers["create"] = c.post("/api/2.0/serving-endpoints", json=plain)
            answers["get"] = c.get("/api/2.0/serving-endpoints/plain")
            ask = lambda text: {"messages": [{"role": "user", "content": text}]}  # noqa: E731
            answers["plain-401"] = c.post("/serving-endpoints/plain/invocations", json=ask("hello"))
            answers["openai-400"] = c.post("/serving-endpoints/sim-openai/invocations", json=ask(ROWS[1]))
            answers["openai-500"] = c.post("/serving-endpoints/sim-openai/invocations", json=ask(ROWS[2]))
            answers["v1-anthropic-400"] = c.post("/v1/chat/completions", json={"model": "sim-anthropic", **ask(ROWS[1])})
            answers["wrong-401"] = c.post("/v1/chat/completions", json={"model": "sim-wrong", **ask("hello")})
            answers["ok"] = c.post("/serving-endpoints/sim-openai/invocations", json=ask(ROWS[0]))
    finally:
        proc.terminate()  # the tables are flushed on the way out
        log, _ = proc.communicate(timeout=60)
    return answers, first + log


def _files_text(folder: Path) -> list[tuple[Path, bytes]]:
    """Every file under ``folder`` as bytes, and each parquet file also as its decoded values."""
    out = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        out.append((path, data))
        if path.suffix == ".parquet":
            out.append((path, json.dumps(pq.read_table(path).to_pylist(), default=str).encode()))
    return out


def test_an_echoed_key_reaches_no_table_log_error_or_answer(setup):
    sim, inputs, outputs, env = setup
    texts: dict[str, str] = {}

    # 1. spark.sql: failOnError false (rows), true (the caller's exception), a refused key (systemic)
    (inputs / "sql.py").write_text(SQL_SCRIPT)
    sql = _run([sys.executable, str(inputs / "sql.py"), str(inputs / "endpoints.json"), str(outputs / "sql-out"), json.dumps(ROWS)], env)
    texts["sql stdout"], texts["sql stderr (Spark driver and executor logs)"] = sql.stdout, sql.stderr
    assert sql.returncode == 0, sql.stderr[-3000:]
    rows = _line(sql.stdout, "ROWS")
    assert rows[0] == [None, None]
    for errors in rows[1:]:
        for error in errors:
            assert "[REDACTED]" in error and ("HTTP 400" in error or "HTTP 500" in error), error
    assert "Bearer [REDACTED]" in rows[1][0] and "x-api-key: [REDACTED]" in rows[1][1]
    fail_on_error, refused = _line(sql.stdout, "FAIL_ON_ERROR"), _line(sql.stdout, "REFUSED_KEY")
    assert "HTTP 400" in fail_on_error and "[REDACTED]" in fail_on_error
    assert "HTTP 401" in refused and "Incorrect API key provided: [REDACTED]" in refused
    assert "[REDACTED]" in sql.stderr  # Spark logged the failed tasks: with the key scrubbed

    # 2. ai-query run: a job with usage and payload tables, then a job whose key is refused
    job = outputs / "job"
    job.mkdir()
    write_deltalake(str(job / "prompts"), pa.table({"id": pa.array(range(len(ROWS)), pa.int64()), "prompt": ROWS}))
    for name, endpoint in (("leak", "sim-openai"), ("refused", "sim-wrong")):
        (job / f"{name}.toml").write_text(textwrap.dedent(f'''
            name = "{name}"
            endpoints = "{inputs / 'endpoints.json'}"
            key = ["id"]
            query = """SELECT id, ai_query('{endpoint}', prompt) AS a FROM prompts"""
            [sources]
            prompts = "prompts"
            [output]
            path = "{name}-out"
            mode = "merge"
            usage_path = "{name}-usage"
            inference_path = "{name}-payloads"
        '''))
        done = _run([sys.executable, "-m", "batch_runner.cli", "run", "--no-progress", str(job / f"{name}.toml")], env)
        texts[f"job {name} stdout"], texts[f"job {name} stderr"] = done.stdout, done.stderr
        if name == "leak":
            assert done.returncode in (0, 3), done.stderr[-3000:]  # 3: more rows failed than allowed
            table = DeltaTable(str(job / "leak-out")).to_pyarrow_table().to_pylist()
            errors = [r["aiq_error"] for r in table if r["aiq_error"]]
            assert len(errors) == 2 and all("[REDACTED]" in e for e in errors), errors
            payloads = json.dumps(DeltaTable(str(job / "leak-payloads")).to_pyarrow_table().to_pylist(), default=str)
            assert "[REDACTED]" in payloads
        else:
            # refused before any paid request (the job's preflight), or by the first one: either way it says 401
            assert done.returncode != 0 and "401" in done.stderr and "key" in done.stderr, done.stderr[-3000:]

    # 3. ai-query serve: error answers, its log, its tables and its state dir
    answers, texts["serve log"] = _serve(inputs, outputs, env, sim.base_url)
    assert answers["create"].status_code == 200, answers["create"].text
    assert answers["ok"].status_code == 200
    assert answers["plain-401"].status_code == 502 and "Incorrect API key provided: [REDACTED]" in answers["plain-401"].text
    assert answers["wrong-401"].status_code == 502 and "Incorrect API key provided: [REDACTED]" in answers["wrong-401"].text
    assert answers["openai-400"].status_code == 400 and "Bearer [REDACTED]" in answers["openai-400"].json()["message"]
    assert answers["openai-500"].status_code == 502 and "HTTP 500" in answers["openai-500"].text
    assert answers["v1-anthropic-400"].status_code == 400 and "x-api-key: [REDACTED]" in answers["v1-anthropic-400"].json()["error"]["message"]
    for name, response in answers.items():
        texts[f"HTTP {name}"] = json.dumps(dict(response.headers)) + response.text
    assert "[REDACTED]" in texts["serve log"]  # the server logged the refused keys: scrubbed
    state = (outputs / "serving-state" / "endpoints.json").read_text()
    assert "aiq-sealed:v1:" in state  # the plaintext key is in the state, sealed

    # Every artefact, searched for every key
    artefacts = [(f"file {path.relative_to(outputs)}", data) for path, data in _files_text(outputs)]
    artefacts += [(name, text.encode()) for name, text in texts.items()]
    assert any("serving-inference" in name for name, _ in artefacts) and any("_delta_log" in name for name, _ in artefacts)
    leaks = [(name, key[:12]) for name, data in artefacts for key in KEYS if key.encode() in data]
    assert leaks == [], f"keys found in: {leaks}"
