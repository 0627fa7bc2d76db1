"""`ai-query plan --json` from the command line (a real Spark process, a real Delta input): stdout is
one JSON document with the plan's estimates. (`run --json`: test_runner.py;
`status`, `endpoints`, `workers status`: tests/unit/test_cli.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from deltalake import write_deltalake

from batch_runner import sample_reviews

pytestmark = pytest.mark.spark


def test_plan_json_is_one_document_with_the_estimates(tmp_path):
    write_deltalake(str(tmp_path / "reviews"), sample_reviews(9))
    (tmp_path / "endpoints.json").write_text(json.dumps({"name": "priced-chat", "config": {"served_entities": [{
        "name": "e", "pricing": {"input_usd_per_million_tokens": 1.0, "output_usd_per_million_tokens": 2.0},
        "external_model": {"name": "m", "provider": "openai", "task": "llm/v1/chat",
                           "openai_config": {"openai_api_key": "{{secrets/sim/key}}", "openai_api_base": "http://127.0.0.1:9/v1"}}}]}}))
    job = tmp_path / "job.toml"
    job.write_text(textwrap.dedent('''
        name = "plan-json"
        endpoints = "endpoints.json"
        key = ["review_id"]
        [prompt]
        endpoint = "priced-chat"
        template = "Sentiment: {review}"
        max_tokens = 5
        [sources]
        reviews = "reviews"
        [output]
        path = "out"
        mode = "merge"
        [options]
        chunk_rows = 4
    '''))
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1"}
    out = subprocess.run([sys.executable, "-m", "batch_runner.cli", "plan", "--no-pilot", "--json", str(job)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)  # nothing but the document on stdout
    assert (plan["job"], plan["pending_rows"], plan["chunks"], plan["pilot_requests"]) == ("plan-json", 9, 3, 0)
    (endpoint,) = plan["endpoints"]
    assert (endpoint["endpoint"], endpoint["rows"], endpoint["output_tokens"]) == ("priced-chat", 9, 45)
    assert endpoint["cost_usd"] == pytest.approx((endpoint["input_tokens"] * 1.0 + 45 * 2.0) / 1e6)
