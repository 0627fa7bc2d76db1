"""Job specs: every key validated with a message naming it and the fix; prompt templates become SQL."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ai_query import ConfigError
from ai_query._commands import build_parser, load_commands
from batch_runner import JobSpec

BASE = '''name = "j"
key = ["id"]
[sources]
t = "t"
[output]
path = "o"
mode = "merge"
'''
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load(tmp_path, text):
    (tmp_path / "j.toml").write_text(text)
    return JobSpec.load(tmp_path / "j.toml")


Q = 'query = "SELECT 1"\n'
PROMPT = '[prompt]\nendpoint = "e"\n'


@pytest.mark.parametrize(
    "top, tables, message",
    [
        (Q, PROMPT + 'template = "{a}"', "query and [prompt] are both given"),
        ("", PROMPT + 'template = "no column"', "prompt.template uses no column; add a placeholder"),
        ("", PROMPT + 'template = "a { b"', "prompt.template has a lone '{'"),
        ("", PROMPT + 'template = "{a}"\nmax_tokenz = 3', "[prompt] has unknown key(s) max_tokenz"),
        ("", '[prompt]\ntemplate = "{a}"', "prompt.endpoint must be a non-empty string"),
        (Q + 'schedule = "0 2 * *"\n', "", "schedule is not a valid cron expression"),
        (Q, "[options]\nmax_cost_usd = -1", "options.max_cost_usd must be a positive number"),
        (Q, "[options]\nchunk_rows = 0", "options.chunk_rows must be a whole number >= 1"),
        (Q, "[options]\nmax_tokens = 1.5", "options.max_tokens must be a whole number"),
        (Q, "[options]\nmax_concurrency = {e = 0}", "options.max_concurrency.e must be a whole number >= 1"),
        (Q, "[options]\nbudget = 3", "[options] has unknown key(s) budget"),
        (Q, '[input]\nview = "nope"', "input.view 'nope' is not one of [sources]"),
        (Q, '[input]\nsql = "DELETE FROM t"', "input.sql must be a SQL SELECT"),
    ],
)
def test_bad_specs_name_the_key_and_the_fix(tmp_path, top, tables, message):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, top + BASE + tables)
    assert message in str(info.value)


def test_merge_needs_a_key_and_several_sources_need_an_input(tmp_path):
    with pytest.raises(ConfigError, match="'merge' merges by key: add key"):
        load(tmp_path, Q + BASE.replace('key = ["id"]\n', ""))
    with pytest.raises(ConfigError, match=r"\[input\] is needed with several sources"):
        load(tmp_path, Q + BASE.replace('t = "t"', 't = "t"\nu = "u"'))


def test_prompt_template_becomes_a_query(tmp_path):
    spec = load(tmp_path, BASE.replace("[sources]", '''[prompt]
endpoint = "sim-chat"
template = "Rate {product}'s review: {review} {{json}}"
column = "rating"
max_tokens = 8
temperature = 0.0
stop = ["\\n"]
[sources]''', 1))
    assert spec.query == (
        "SELECT *, ai_query('sim-chat', CONCAT('Rate ', CAST(`product` AS STRING), '\\'s review: ', CAST(`review` AS STRING), "
        "' {json}'), modelParameters => named_struct('max_tokens', 8, 'temperature', 0.0, 'stop', array('\n'))) AS `rating` FROM `t`"
    )
    assert spec.incremental and spec.job_id == "ai-query:j" and spec.state_path == str(tmp_path / "o") + ".aiq"
    assert spec.usage_table.endswith("o.aiq/endpoint_usage")


def test_options_and_paths(tmp_path):
    spec = load(tmp_path, Q + 'schedule = "@daily"\n'
                + BASE.replace('mode = "merge"', 'mode = "append"\nusage_path = "usage"\ninference_path = "p"\nmax_payload_bytes = 100')
                + '[options]\nmax_rows = 5\nmax_concurrency = 4\nmax_cost_usd = 2\nmax_tokens = 1000\n')
    assert (spec.max_rows, spec.max_concurrency, spec.max_cost_usd, spec.max_tokens) == (5, 4, 2.0, 1000)
    assert spec.usage_table == str(tmp_path / "usage") and spec.inference_path == str(tmp_path / "p") and spec.max_payload_bytes == 100


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.toml")))
def test_examples_load(name):
    spec = JobSpec.load(EXAMPLES / name)
    assert spec.key and spec.query


@pytest.mark.parametrize("command, words", [
    ("run", ["--retry-failed", "--limit", "incremental"]),
    ("plan", ["--no-pilot", "tokenizer", "pilot"]),
    ("status", ["pending", "interrupted"]),
    ("schedule", ["cron", "--max-runs", "Airflow"]),
])
def test_every_command_has_help(command, words, capsys):
    with pytest.raises(SystemExit):
        build_parser(load_commands()).parse_args([command, "--help"])
    text = capsys.readouterr().out
    assert all(w in text for w in words), text


def test_cli_reports_a_bad_spec_without_traceback(tmp_path):
    (tmp_path / "j.toml").write_text(Q + 'schedule = "61 * * * *"\n' + BASE)
    out = subprocess.run([sys.executable, "-m", "batch_runner.cli", "plan", str(tmp_path / "j.toml")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "schedule is not a valid cron expression: minute 61 is out of range" in out.stderr
    assert "Traceback" not in out.stderr


_DIRECT = dict(name="j", query="SELECT 1", sources={"t": "/data/t"}, output_path="/data/out")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"chunk_rows": 0}, "JobSpec: options.chunk_rows must be a whole number >= 1, got 0"),
        ({"output_mode": "merge"}, "JobSpec: output.mode 'merge' merges by key: add key"),
        ({"output_mode": "upsert"}, "JobSpec: output.mode is 'upsert'; use one of overwrite, append, merge"),
        ({"name": "two words"}, "JobSpec: name must be a short identifier"),
        ({"max_concurrency": True}, "JobSpec: options.max_concurrency must be a whole number >= 1 (every endpoint) or a table"),
        ({"max_concurrency": {"e": 0}}, "JobSpec: options.max_concurrency.e must be a whole number >= 1, got 0"),
        ({"max_cost_usd": 0}, "JobSpec: options.max_cost_usd must be a positive number of dollars, e.g. 5.0, got 0"),
        ({"allowed_failure_rate": 2}, "JobSpec: options.allowed_failure_rate must be a number between 0 and 1, got 2"),
        ({"sources": {}}, "JobSpec: [sources] must name at least one Delta table"),
        ({"key": ("id",), "output_mode": "append", "sources": {"a": "/a", "b": "/b"}}, "JobSpec: [input] is needed with several sources (a, b)"),
    ],
)
def test_specs_built_directly_are_checked_with_the_same_messages(changes, message):
    with pytest.raises(ConfigError) as info:
        JobSpec(**{**_DIRECT, **changes})
    assert message in str(info.value)


def test_spec_replace_is_checked_and_specs_pickle():
    import pickle

    spec = JobSpec(**_DIRECT, key=("id",), output_mode="merge", max_concurrency={"e": 4})
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert spec.replace(max_cost_usd=None).max_cost_usd is None
    with pytest.raises(ConfigError, match="options.max_rows must be a whole number >= 1, got 0"):
        spec.replace(max_rows=0)
