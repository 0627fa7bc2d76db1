"""Batch mode on the local engine: a ``vllm_pool`` takes the OpenAI batch JSONL through vLLM's own
batch runner (``python -m vllm.entrypoints.openai.run_batch -i in.jsonl -o out.jsonl``).

**The remote path's lines and reader.** A batch's lines are OpenAI batch input lines
(``custom_id``, ``method``, ``url``, ``body``), written by ``ProviderBatches``' own encoder; the
output file is read by ``ProviderBatches.read_output``, the reader of OpenAI's output files. So
the poll loop, deadline routing and the row results (``ai_query.batch.provider_batches``) are the
remote path's; only where a batch runs differs: a ``run_batch`` process per batch, started with
the pool's model folder and engine options (``_server_options.run_batch_command``).

**Life of a batch**: ``submit`` writes ``<dir>/input.jsonl`` and starts the runner in its own
process group; ``poll`` is ``in_progress`` while it runs, ``completed`` when it exited 0,
``failed`` otherwise (its log's tail in ``errors``); ``cancel`` kills the group (vLLM writes the
output at the end: a cancelled batch answers nothing, its rows go online). ``results`` reads the
output file. The work directory is the batch id's, under a temporary directory of this process.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import tempfile
import uuid
from typing import Any, Mapping, Sequence

from ai_query import EndpointError, ModelParameters, ModelResponse
from ai_query.backends import BatchLine, BatchState, ProviderBatches
from ai_query.backends import llm_v1_body, parse_openai_shape
from ai_query.config import ServedEntity

from ._server_options import LocalServerOptions, _resolve, _server_env, run_batch_command


class VLLMRunBatch(ProviderBatches):
    """``ProviderBatches`` whose batches run through vLLM's ``run_batch`` on this machine."""

    def __init__(self, entity: ServedEntity, *, max_requests: int | None = None, workdir: str | None = None) -> None:
        assert entity.vllm_pool is not None
        self.entity = entity
        self.provider = "openai"  # the OpenAI batch JSONL, in and out
        self.pool = entity.vllm_pool
        self.max_requests = max_requests or 50_000
        self.max_bytes = 200 * 1024 * 1024
        self.target = _resolve(self.pool.model, self.pool.task, LocalServerOptions.from_mapping(dict(self.pool.options)))
        self.workdir = pathlib.Path(workdir or tempfile.mkdtemp(prefix="aiq-run-batch-"))
        self._runs: dict[str, tuple[subprocess.Popen[bytes], int]] = {}

    def lines(self, task: str, requests: Sequence[Any], params: Sequence[Any], prompt_texts: Sequence[str],
              response_format: Mapping[str, Any] | None = None) -> list[BatchLine]:
        """The bodies the pool's replicas would get online (the served model name, ``llm/v1`` body)."""
        return [BatchLine(uuid.uuid4().hex, task, {"model": self.target.served_model_name, **llm_v1_body(
                    task, value, p if isinstance(p, ModelParameters) else ModelParameters.from_mapping(p), response_format)}, text)
                for value, p, text in zip(requests, params, prompt_texts)]

    def submit(self, lines: Sequence[BatchLine], completion_window: str = "24h", metadata: Mapping[str, str] | None = None) -> str:
        batch_id = f"vllm_batch_{uuid.uuid4().hex}"
        directory = self.workdir / batch_id
        directory.mkdir(parents=True)
        (directory / "input.jsonl").write_bytes(b"".join(self._encode(line) for line in lines))
        with open(directory / "run_batch.log", "wb") as log:
            proc = subprocess.Popen(run_batch_command(self.target, directory / "input.jsonl", directory / "output.jsonl"),
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=_server_env(self.target),
                                    start_new_session=True)
        self._runs[batch_id] = (proc, len(lines))
        return batch_id

    def poll(self, batch_id: str) -> BatchState:
        proc, total = self._runs[batch_id]
        code = proc.poll()
        if code is None:
            return BatchState(batch_id, "in_progress", False, total, 0)
        if code == 0:
            return BatchState(batch_id, "completed", True, total, total)
        log = (self.workdir / batch_id / "run_batch.log").read_text(errors="replace").strip().splitlines()
        return BatchState(batch_id, "failed" if code > 0 else "cancelled", True, total, 0, " | ".join(log[-3:]) or f"exit {code}")

    def cancel(self, batch_id: str) -> None:
        proc, _ = self._runs[batch_id]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def results(self, batch_id: str, lines: Mapping[str, BatchLine]) -> dict[str, ModelResponse | EndpointError]:
        output = self.workdir / batch_id / "output.jsonl"
        return self.read_output(output.read_bytes(), lines) if output.is_file() else {}

    def _parse(self, line: BatchLine, status: int, headers: Mapping[str, str], body: Any) -> ModelResponse | EndpointError:
        try:
            return parse_openai_shape(self.entity, line.task, status, headers, json.dumps(body).encode(), line.prompt_text,
                                      self.target.served_model_name)
        except EndpointError as exc:
            return exc


__all__ = ["VLLMRunBatch"]
