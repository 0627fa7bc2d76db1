"""Unit tests of gpu_workers that need neither vLLM nor a model: options, keys, the supervisor."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import gpu_workers
from gpu_workers import LocalServerOptions
from gpu_workers._server_options import _resolve

REPO = pathlib.Path(__file__).resolve().parents[2]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def test_import_stays_light() -> None:
    code = (
        "import sys, gpu_workers, gpu_workers.__main__;"
        "print([m for m in ('vllm', 'torch', 'transformers', 'tokenizers', 'numpy') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_api() -> None:
    for name in gpu_workers.__all__:
        assert hasattr(gpu_workers, name), name
    assert issubclass(gpu_workers.ModelBuildError, gpu_workers.LocalServerError)
    assert set(gpu_workers.KNOWN_MODELS) == {"smollm2-135m-instruct", "tiny-llama", "all-minilm-l6-v2"}


def test_cache_dir_follows_env(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIQ_CACHE_DIR", str(tmp_path))
    assert gpu_workers.cache_dir() == tmp_path.resolve()
    assert gpu_workers.model_path("tiny-llama") == tmp_path.resolve() / "models" / "tiny-llama"


def test_unknown_alias_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="tiny-llama"):
        gpu_workers.model_path("gpt-17")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dtype": "fp8"}, "dtype"),
        ({"max_model_len": 4}, "max_model_len"),
        ({"kv_cache_gib": 0.5}, "kv_cache_gib"),
        ({"threads": 10_000}, "threads"),
        ({"extra_args": "--seed 1"}, "extra_args"),
        ({"cpu_bind": "cores please"}, "cpu_bind"),
        ({"dtpye": "float32"}, "unknown local server option"),
    ],
)
def test_bad_options_name_the_value(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LocalServerOptions.from_mapping(options)


def test_defaults_and_timeouts_do_not_change_the_server_key(tmp_path: pathlib.Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    folder = str(tmp_path)

    def key(options: dict | None, task: str = "llm/v1/chat") -> str:
        return _resolve(folder, task, LocalServerOptions.from_mapping(options)).key

    assert key(None) == key({"dtype": "float32", "kv_cache_gib": 1}) == key({"startup_timeout": 5, "grace": 1})
    assert key(None) == key(None, "llm/v1/completions")  # one vLLM server answers both
    assert key(None) != key({"dtype": "bfloat16"})
    assert key(None) != key({"max_model_len": 1024})
    assert key(None) != key(None, "llm/v1/embeddings")


def test_task_and_model_errors(tmp_path: pathlib.Path) -> None:
    opts = LocalServerOptions()
    with pytest.raises(ValueError, match="llm/v1/embeddings"):
        _resolve("tiny-llama", "llm/v1/embeddings", opts)
    with pytest.raises(ValueError, match="is not one of"):
        _resolve("tiny-llama", "llm/v1/chat-completions", opts)
    with pytest.raises(ValueError, match="no config.json"):
        _resolve(str(tmp_path), "llm/v1/chat", opts)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="cannot serve"):
        _resolve(str(tmp_path), "llm/v1/chat", LocalServerOptions(backend="sentence-transformers"))


def test_sentence_transformers_folders_get_the_small_server(tmp_path: pathlib.Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert _resolve(str(tmp_path), "llm/v1/embeddings", LocalServerOptions()).backend == "vllm"
    (tmp_path / "modules.json").write_text("[]")
    assert _resolve(str(tmp_path), "llm/v1/embeddings", LocalServerOptions()).backend == "sentence-transformers"


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] in ("Z", "X")
    except OSError:
        return True


def test_supervisor_takes_the_server_tree_down_when_its_owner_is_killed() -> None:
    """The owner forks the supervisor from a thread that then exits, and is later SIGKILLed."""
    owner_code = textwrap.dedent(
        """
        import json, signal, subprocess, sys, threading, time
        from gpu_workers._lifecycle import _get_launcher
        from ai_query.process import set_parent_death_signal
        cmd = [sys.executable, "-m", "gpu_workers._supervisor", "--owner-pid", str(__import__("os").getpid()),
               "--grace", "2", "--key", "unit", "--", "sh", "-c", "sleep 300 & sleep 300"]
        box = {}
        def start():  # a short-lived thread, as loop.run_in_executor would use
            box["p"] = _get_launcher().call(lambda: subprocess.Popen(
                cmd, start_new_session=True, preexec_fn=lambda: set_parent_death_signal(signal.SIGTERM)))
        t = threading.Thread(target=start); t.start(); t.join()
        time.sleep(1.5)
        print(json.dumps({"supervisor": box["p"].pid}), flush=True)
        time.sleep(300)
        """
    )
    owner = subprocess.Popen([sys.executable, "-c", owner_code], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        supervisor = json.loads(owner.stdout.readline())["supervisor"]
        from ai_query.process import descendants

        deadline = time.monotonic() + 30  # the supervisor imports ai_query.process: slow on a busy machine
        while len(tree := [supervisor, *descendants(supervisor)]) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(tree) >= 3, tree  # supervisor, sh, two sleeps
        assert all(not _gone(p) for p in tree), "the thread's exit must not stop the server"
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(_gone(p) for p in tree):
            time.sleep(0.1)
        assert all(_gone(p) for p in tree), [p for p in tree if not _gone(p)]
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()


def test_supervisor_sigkills_a_server_that_ignores_sigterm() -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(300)"
    sup = subprocess.Popen(
        [sys.executable, "-m", "gpu_workers._supervisor", "--owner-pid", str(os.getpid()), "--grace", "1",
         "--", sys.executable, "-c", code],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert sup.stdout.readline().strip() == "up"
        from ai_query.process import descendants

        tree = descendants(sup.pid)
        assert tree
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(timeout=15) == 0
        assert all(_gone(p) for p in tree)
        assert "SIGKILL" in sup.stderr.read()
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()
