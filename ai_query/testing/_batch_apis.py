"""The simulator's batch APIs: OpenAI's Batch API and Anthropic's Message Batches, over real HTTP.

OpenAI: ``POST /v1/files`` (multipart, ``purpose=batch``, a JSONL of ``{custom_id, method, url,
body}``), ``GET /v1/files/{id}/content``, ``POST /v1/batches`` (``input_file_id``, ``endpoint``,
``completion_window``), ``GET /v1/batches/{id}``, ``POST /v1/batches/{id}/cancel``. Anthropic:
``POST /v1/messages/batches`` (``requests: [{custom_id, params}]``), ``GET
/v1/messages/batches/{id}``, ``.../cancel``, ``GET .../results`` (the ``results_url``, JSONL of
``{custom_id, result: {type: succeeded|errored|canceled|expired, ...}}``).

**Time is lazy, not a background task**: a batch of ``n`` lines created at ``t0`` completes line
``i`` at ``t0 + delay_s * (i + 1) / n``; every read looks at the clock. So a cancel (or an expiry
after ``expire_s``) keeps the lines done by then and drops the rest, as the providers do, and a
test steers it with ``delay_s`` instead of sleeping. A batch is ``validating`` for its first
``delay_s / 10`` seconds, then ``in_progress``, then ``completed`` (``finalizing`` is not
observable: results are built at once).

**Line outcomes** are the online path's, without the quota and latency: the same parser and the
same deterministic answer (``"echo: " + prompt``), so a row answered in a batch equals its online
answer. A line whose body the online route would refuse is an error line (400, the same message),
a line with ``[[status:N]]`` fails with N, and ``error_rate`` fails a seeded share of lines with
500: these go to the error file (OpenAI) or ``errored`` results (Anthropic).

**Busy** (``busy_polls``): the first N reads of a batch answer 429 with ``Retry-After: 0``.

**Lost creates** (``lost_creates``): the first N creations are made but their answer is lost (a
reset connection), as for a caller killed between the create and recording the id; ``GET
/v1/batches`` lists batches (newest first, ``after`` / ``limit``) with their ``metadata``.

**Enqueued-token quota** (``enqueued_token_limit``): a batch's tokens (prompt + ``max_tokens`` per
line) count while it is not ended; a batch that would exceed the limit fails at creation (OpenAI:
``status: failed`` with ``errors``; Anthropic: 429), as the providers' batch quotas do.
"""

from __future__ import annotations

import random
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .._errors import BadRequestError
from ._faults import abort
from ._provider_formats import ANTHROPIC, OPENAI, WireFormat, count_tokens, dumps, generate, loads

if TYPE_CHECKING:
    from ._simulator import ProviderSimulator

_STATUS = re.compile(r"\[\[status:(\d+)\]\]")
_DIRECTIVE = re.compile(r"\[\[\w+:.*?\]\]", re.S)
_OPENAI_PATHS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
_ENDED = ("completed", "expired", "cancelled", "failed")


@dataclass
class _Batch:
    id: str
    kind: str  # "openai" | "anthropic"
    created: float
    lines: list[tuple[str, dict[str, Any] | None, dict[str, Any] | None]]
    """(custom_id, answer body or None, error or None) per line, decided at creation."""
    tokens: int
    delay_s: float
    expire_s: float | None
    cancelled_at: float | None = None
    failed: list[dict[str, Any]] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    ended_at: float | None = None
    status: str = "validating"
    meta: dict[str, Any] = field(default_factory=dict)

    def done_by(self, when: float) -> int:
        """How many lines are finished at ``when`` (lines finish in order, evenly over ``delay_s``)."""
        if self.delay_s <= 0:
            return len(self.lines)
        share = (when - self.created) / self.delay_s
        return max(0, min(len(self.lines), int(share * len(self.lines) + 1e-9)))


class BatchAPIs:
    """The batch routes of one :class:`ProviderSimulator` (see the module docstring)."""

    def __init__(self, sim: "ProviderSimulator", *, delay_s: float = 0.5, expire_s: float | None = None,
                 error_rate: float = 0.0, enqueued_token_limit: int | None = None, busy_polls: int = 0,
                 lost_creates: int = 0) -> None:
        if not (isinstance(delay_s, (int, float)) and delay_s >= 0):
            raise ValueError(f"batch_api delay_s={delay_s!r} must be seconds >= 0 (e.g. 0.5 in tests)")
        if expire_s is not None and not (isinstance(expire_s, (int, float)) and expire_s > 0):
            raise ValueError(f"batch_api expire_s={expire_s!r} must be seconds > 0 or None (never expires)")
        if not (isinstance(error_rate, (int, float)) and 0 <= error_rate <= 1):
            raise ValueError(f"batch_api error_rate={error_rate!r} must be a share between 0 and 1")
        if enqueued_token_limit is not None and not (isinstance(enqueued_token_limit, int) and enqueued_token_limit >= 1):
            raise ValueError(f"batch_api enqueued_token_limit={enqueued_token_limit!r} must be an integer >= 1 or None")
        self.sim = sim
        self.delay_s = float(delay_s)
        self.expire_s = expire_s
        self.error_rate = float(error_rate)
        self.enqueued_token_limit = enqueued_token_limit
        self.busy_polls = busy_polls
        self.lost_creates = lost_creates
        """The first this many batch creations are made, but their answer is lost (the connection is
        reset): a caller that dies between the create and recording its id looks the same."""
        """The first this many batch reads answer 429 (``Retry-After: 0``), as a busy provider does."""
        self._rng = random.Random(f"batch/{sim.seed}")
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, _Batch] = {}
        self.counters = {"batches_created": 0, "batch_lines": 0, "batch_lines_ok": 0, "batches_cancelled": 0,
                         "batch_prompt_tokens": 0, "batch_completion_tokens": 0, "batch_files_uploaded": 0}

    def config(self) -> dict[str, Any]:
        return {"delay_s": self.delay_s, "expire_s": self.expire_s, "error_rate": self.error_rate,
                "enqueued_token_limit": self.enqueued_token_limit, "busy_polls": self.busy_polls,
                "lost_creates": self.lost_creates}

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1/files", self._upload)
        router.add_get("/v1/files/{id}/content", self._file_content)
        router.add_post("/v1/batches", self._openai_create)
        router.add_get("/v1/batches", self._openai_list)
        router.add_get("/v1/batches/{id}", self._openai_get)
        router.add_post("/v1/batches/{id}/cancel", self._openai_cancel)
        router.add_post("/v1/messages/batches", self._anthropic_create)
        router.add_get("/v1/messages/batches/{id}", self._anthropic_get)
        router.add_post("/v1/messages/batches/{id}/cancel", self._anthropic_cancel)
        router.add_get("/v1/messages/batches/{id}/results", self._anthropic_results)

    # -- shared ---------------------------------------------------------------------------
    def _refuse(self, fmt: WireFormat, request: web.Request) -> web.Response | None:
        key = self.sim.api_key
        if key is not None and not fmt.authorized(request.headers, key):
            return self._json(fmt.error(401, fmt.bad_key_message), 401)
        refusal = fmt.precheck(request.headers)
        return self._json(fmt.error(refusal[0], refusal[1]), refusal[0]) if refusal else None

    @staticmethod
    def _json(payload: Any, status: int = 200) -> web.Response:
        return web.Response(body=dumps(payload), status=status, content_type="application/json")

    def _line(self, fmt: WireFormat, task: str, body: Any) -> tuple[dict[str, Any] | None, dict[str, Any] | None, int]:
        """(answer, None, tokens) or (None, error with status, tokens) for one line, as the online route would."""
        try:
            call = fmt.parse(task, body)
        except BadRequestError as exc:
            return None, {"status": exc.status, "message": exc.message}, 0
        if call.task == "embeddings" or call.stream:
            return None, {"status": 400, "message": "batch lines must be non-streaming chat or completions requests"}, 0
        prompt = call.prompts[0] if len(call.prompts) == 1 else "\n".join(call.prompts)
        max_tokens = call.max_tokens or self.sim.default_max_tokens
        tokens = sum(map(count_tokens, call.prompts)) + max_tokens * len(call.prompts)
        status = _STATUS.search(prompt)
        if status:
            return None, {"status": int(status.group(1)), "message": f"injected status {status.group(1)}"}, tokens
        if self.error_rate and self._rng.random() < self.error_rate:
            return None, {"status": 500, "message": "The server had an error while processing your request."}, tokens
        answers = [generate("echo: " + _DIRECTIVE.sub("", p).strip(), max_tokens, call.stop) for p in call.prompts]
        prompt_tokens = sum(map(count_tokens, call.prompts))
        rid = f"batch_req_{uuid.uuid4().hex[:16]}"
        return fmt.answer(call, answers, [], prompt_tokens, rid, self.sim.served_model), None, tokens

    def _enqueued(self) -> int:
        now = time.monotonic()
        return sum(b.tokens for b in self.batches.values() if self._advance(b, now) not in _ENDED)

    def _create(self, kind: str, lines: list[tuple[str, dict[str, Any] | None, dict[str, Any] | None]], tokens: int,
                meta: dict[str, Any]) -> _Batch:
        prefix = "batch_" if kind == "openai" else "msgbatch_"
        batch = _Batch(prefix + uuid.uuid4().hex[:20], kind, time.monotonic(), lines, tokens, self.delay_s, self.expire_s, meta=meta)
        limit = self.enqueued_token_limit
        if limit is not None and self._enqueued() + tokens > limit:
            batch.failed = [{"code": "token_limit_exceeded", "line": None, "param": None,
                             "message": f"Enqueued token limit reached: {self._enqueued()} tokens enqueued + {tokens} in this "
                                        f"batch exceed the limit of {limit}. Wait for batches to finish, or send fewer lines."}]
            batch.status, batch.ended_at = "failed", batch.created
        self.batches[batch.id] = batch
        self.counters["batches_created"] += 1
        self.counters["batch_lines"] += len(lines)
        return batch

    def _advance(self, b: _Batch, now: float) -> str:
        """The batch's status at ``now``; builds its results once when it ends."""
        if b.status in _ENDED:
            return b.status
        if b.cancelled_at is not None:
            self._finish(b, "cancelled", b.cancelled_at)
        elif b.expire_s is not None and now - b.created >= b.expire_s and b.done_by(now) < len(b.lines):
            self._finish(b, "expired", b.created + b.expire_s)
        elif b.done_by(now) >= len(b.lines):
            self._finish(b, "completed", now)
        else:
            b.status = "validating" if now - b.created < b.delay_s / 10 else "in_progress"
        return b.status

    def _finish(self, b: _Batch, status: str, at: float) -> None:
        b.status, b.ended_at = status, at
        done = b.done_by(at)
        out, err = [], []
        for i, (cid, answer, error) in enumerate(b.lines):
            if i >= done:
                b.meta.setdefault("unfinished", []).append(cid)
                continue
            if answer is not None:
                self.counters["batch_lines_ok"] += 1
                usage = answer.get("usage", {})
                self.counters["batch_prompt_tokens"] += usage.get("prompt_tokens", usage.get("input_tokens", 0))
                self.counters["batch_completion_tokens"] += usage.get("completion_tokens", usage.get("output_tokens", 0))
                out.append((cid, answer))
            else:
                err.append((cid, error))
        b.meta["out"], b.meta["err"] = out, err
        if b.kind == "openai":
            def line(cid: str, status: int, body: Any) -> bytes:
                return dumps({"id": f"batch_req_{uuid.uuid4().hex[:12]}", "custom_id": cid,
                              "response": {"status_code": status, "request_id": body.get("id") if status == 200 else None,
                                           "body": body}, "error": None}) + b"\n"
            if out:
                b.output_file_id = self._store(b"".join(line(c, 200, a) for c, a in out))
            unfinished = [(c, "batch_expired" if status == "expired" else "batch_cancelled") for c in b.meta.get("unfinished", ())] \
                if status == "expired" else []
            if err or unfinished:
                b.error_file_id = self._store(
                    b"".join(line(c, e["status"], OPENAI.error(e["status"], e["message"])) for c, e in err)
                    + b"".join(dumps({"id": f"batch_req_{uuid.uuid4().hex[:12]}", "custom_id": c, "response": None,
                                      "error": {"code": code, "message": "This request could not be executed before the "
                                                "completion window expired."}}) + b"\n" for c, code in unfinished))

    def _store(self, data: bytes) -> str:
        fid = "file-" + uuid.uuid4().hex[:24]
        self.files[fid] = data
        return fid

    def _counts(self, b: _Batch) -> dict[str, int]:
        now = time.monotonic()
        status = self._advance(b, now)
        if status in _ENDED and "out" in b.meta:
            return {"total": len(b.lines), "completed": len(b.meta["out"]), "failed": len(b.meta["err"])}
        done = b.done_by(now)
        failed = sum(1 for _, a, _e in b.lines[:done] if a is None)
        return {"total": len(b.lines), "completed": done - failed, "failed": failed}

    # -- OpenAI ---------------------------------------------------------------------------
    async def _upload(self, request: web.Request) -> web.Response:
        refused = self._refuse(OPENAI, request)
        if refused:
            return refused
        purpose, data, name = None, None, "batch.jsonl"
        try:
            reader = await request.multipart()
            async for part in reader:  # type: ignore[union-attr]
                if part.name == "purpose":
                    purpose = (await part.text()).strip()
                elif part.name == "file":
                    name = part.filename or name
                    data = await part.read()
        except (AssertionError, ValueError) as exc:
            return self._json(OPENAI.error(400, f"expected a multipart/form-data body with 'purpose' and 'file' ({exc})"), 400)
        if purpose != "batch" or data is None:
            return self._json(OPENAI.error(400, f"purpose must be 'batch' and a file part is required (got purpose={purpose!r})"), 400)
        fid = self._store(bytes(data))
        self.counters["batch_files_uploaded"] += 1
        return self._json({"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                           "filename": name, "purpose": "batch"})

    async def _file_content(self, request: web.Request) -> web.Response:
        refused = self._refuse(OPENAI, request)
        if refused:
            return refused
        data = self.files.get(request.match_info["id"])
        if data is None:
            return self._json(OPENAI.error(404, f"No such File object: {request.match_info['id']}"), 404)
        return web.Response(body=data, content_type="application/octet-stream")

    async def _openai_create(self, request: web.Request) -> web.Response:
        refused = self._refuse(OPENAI, request)
        if refused:
            return refused
        try:
            body = loads(await request.read())
            fid, endpoint, window = body["input_file_id"], body["endpoint"], body.get("completion_window")
        except (ValueError, KeyError, TypeError):
            return self._json(OPENAI.error(400, "the body needs input_file_id, endpoint and completion_window"), 400)
        if window != "24h":
            return self._json(OPENAI.error(400, f"completion_window must be '24h', got {window!r}"), 400)
        if fid not in self.files:
            return self._json(OPENAI.error(404, f"No such File object: {fid}"), 404)
        task = _OPENAI_PATHS.get(endpoint)
        if task is None:
            return self._json(OPENAI.error(400, f"endpoint {endpoint!r} is not supported; use one of {sorted(_OPENAI_PATHS)}"), 400)
        lines, tokens, seen = [], 0, set()
        for n, raw in enumerate(self.files[fid].splitlines()):
            if not raw.strip():
                continue
            try:
                item = loads(raw)
                cid, url, line_body = item["custom_id"], item["url"], item["body"]
            except (ValueError, KeyError, TypeError):
                lines.append((f"line-{n + 1}", None, {"status": 400, "message": f"line {n + 1} is not a JSON object with custom_id, url and body"}))
                continue
            if cid in seen or url != endpoint:
                why = "a duplicate custom_id" if cid in seen else f"url {url!r} differs from the batch's endpoint {endpoint!r}"
                lines.append((cid, None, {"status": 400, "message": f"line {n + 1}: {why}"}))
                continue
            seen.add(cid)
            answer, error, t = self._line(OPENAI, task, line_body)
            tokens += t
            lines.append((cid, answer, error))
        batch = self._create("openai", lines, tokens, {"input_file_id": fid, "endpoint": endpoint, "metadata": body.get("metadata")})
        if self.lost_creates > 0:
            self.lost_creates -= 1
            abort(request)
        return self._json(self._openai_view(batch))

    async def _openai_list(self, request: web.Request) -> web.Response:
        """``GET /v1/batches?limit=&after=``: newest first, a page at a time (``has_more``, ``last_id``)."""
        refused = self._refuse(OPENAI, request)
        if refused:
            return refused
        ordered = sorted((b for b in self.batches.values() if b.kind == "openai"), key=lambda b: b.created, reverse=True)
        after = request.query.get("after")
        if after:
            at = next((i for i, b in enumerate(ordered) if b.id == after), None)
            ordered = ordered[at + 1:] if at is not None else []
        limit = max(1, min(100, int(request.query.get("limit", "20"))))
        page = ordered[:limit]
        return self._json({"object": "list", "data": [self._openai_view(b) for b in page],
                           "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None,
                           "has_more": len(ordered) > limit})

    def _openai_view(self, b: _Batch) -> dict[str, Any]:
        counts = self._counts(b)
        status = "cancelling" if b.status == "cancelled" and b.meta.pop("report_cancelling", False) else b.status
        return {"id": b.id, "object": "batch", "endpoint": b.meta["endpoint"], "input_file_id": b.meta["input_file_id"],
                "completion_window": "24h", "status": status, "output_file_id": b.output_file_id,
                "error_file_id": b.error_file_id, "request_counts": counts, "metadata": b.meta.get("metadata"),
                "errors": {"object": "list", "data": b.failed} if b.failed else None}

    async def _openai_get(self, request: web.Request) -> web.Response:
        b = self._batch(request, OPENAI)
        return b if isinstance(b, web.Response) else self._json(self._openai_view(b))

    async def _openai_cancel(self, request: web.Request) -> web.Response:
        b = self._batch(request, OPENAI)
        if isinstance(b, web.Response):
            return b
        if self._cancel(b):
            b.meta["report_cancelling"] = True
            self._advance(b, time.monotonic())
        return self._json(self._openai_view(b))

    def _batch(self, request: web.Request, fmt: WireFormat) -> _Batch | web.Response:
        """The batch the route names (of this provider), or the refusal to send."""
        refused = self._refuse(fmt, request)
        if refused:
            return refused
        if self.busy_polls > 0:
            self.busy_polls -= 1
            self.counters["busy_polls_refused"] = self.counters.get("busy_polls_refused", 0) + 1
            return web.Response(body=dumps(fmt.error(429, "Too many requests to the batch API; retry shortly.")), status=429,
                                headers={"retry-after": "0"}, content_type="application/json")
        b = self.batches.get(request.match_info["id"])
        if b is None or b.kind != fmt.name:
            return self._json(fmt.error(404, f"No such batch: {request.match_info['id']}"), 404)
        return b

    def _cancel(self, b: _Batch) -> bool:
        """Cancel ``b`` if it has not ended (it keeps the lines done by now)."""
        if self._advance(b, time.monotonic()) in _ENDED:
            return False
        b.cancelled_at = time.monotonic()
        self.counters["batches_cancelled"] += 1
        return True

    # -- Anthropic ------------------------------------------------------------------------
    async def _anthropic_create(self, request: web.Request) -> web.Response:
        refused = self._refuse(ANTHROPIC, request)
        if refused:
            return refused
        try:
            items = loads(await request.read())["requests"]
            assert isinstance(items, list) and items
        except (ValueError, KeyError, TypeError, AssertionError):
            return self._json(ANTHROPIC.error(400, "the body needs requests: a non-empty list of {custom_id, params}"), 400)
        lines, tokens, seen = [], 0, set()
        for n, item in enumerate(items):
            cid = item.get("custom_id") if isinstance(item, dict) else None
            if not isinstance(cid, str) or cid in seen:
                return self._json(ANTHROPIC.error(400, f"requests.{n}.custom_id must be a unique string, got {cid!r}"), 400)
            seen.add(cid)
            answer, error, t = self._line(ANTHROPIC, "chat", item.get("params"))
            tokens += t
            lines.append((cid, answer, error))
        batch = self._create("anthropic", lines, tokens, {})
        if batch.failed:
            del self.batches[batch.id]
            self.counters["batches_created"] -= 1
            return self._json(ANTHROPIC.error(429, batch.failed[0]["message"]), 429)
        return self._json(self._anthropic_view(batch, request))

    def _anthropic_view(self, b: _Batch, request: web.Request) -> dict[str, Any]:
        status = self._advance(b, time.monotonic())
        counts = self._counts(b)
        ended = status in _ENDED
        processing = 0 if ended else counts["total"] - counts["completed"] - counts["failed"]
        unfinished = len(b.meta.get("unfinished", ()))
        return {"id": b.id, "type": "message_batch", "processing_status": "ended" if ended else
                ("canceling" if b.cancelled_at else "in_progress"),
                "request_counts": {"processing": processing, "succeeded": counts["completed"], "errored": counts["failed"],
                                   "canceled": unfinished if status == "cancelled" else 0,
                                   "expired": unfinished if status == "expired" else 0},
                "results_url": f"{request.url.origin()}/v1/messages/batches/{b.id}/results" if ended else None}

    async def _anthropic_get(self, request: web.Request) -> web.Response:
        b = self._batch(request, ANTHROPIC)
        return b if isinstance(b, web.Response) else self._json(self._anthropic_view(b, request))

    async def _anthropic_cancel(self, request: web.Request) -> web.Response:
        b = self._batch(request, ANTHROPIC)
        if isinstance(b, web.Response):
            return b
        self._cancel(b)
        return self._json(self._anthropic_view(b, request))

    async def _anthropic_results(self, request: web.Request) -> web.Response:
        b = self._batch(request, ANTHROPIC)
        if isinstance(b, web.Response):
            return b
        if self._advance(b, time.monotonic()) not in _ENDED:
            return self._json(ANTHROPIC.error(400, f"message batch {b.id} has not ended yet; poll it until processing_status is 'ended'"), 400)
        rows = [{"custom_id": c, "result": {"type": "succeeded", "message": a}} for c, a in b.meta["out"]]
        rows += [{"custom_id": c, "result": {"type": "errored", "error": ANTHROPIC.error(e["status"], e["message"]) | {"status": e["status"]}}}
                 for c, e in b.meta["err"]]
        gone = "canceled" if b.status == "cancelled" else "expired"
        rows += [{"custom_id": c, "result": {"type": gone}} for c in b.meta.get("unfinished", ())]
        return web.Response(body=b"".join(dumps(r) + b"\n" for r in rows), content_type="application/binary")
