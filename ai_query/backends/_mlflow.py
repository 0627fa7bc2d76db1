"""MLflow pyfunc custom models, run in-process: a served entity that names an MLflow model.

The model is loaded once per process (``mlflow.pyfunc.load_model``, cached by URI) and every row
goes through ``model.predict`` in a worker thread, never on the event loop. Rows queued together
(in one turn of the event loop, as a batch fan-out sends them, or while a predict is running) are
micro-batched into one predict call of up to ``max_batch_size`` rows; rows with different
parameters are never mixed. ``batch_wait_s > 0`` also waits that long before the first predict
of a burst, for callers whose rows trickle in (it costs that much latency per lone row).

What ``predict`` receives, from the model's signature:

- the signature has a ``messages`` input (the chat schema): a DataFrame with a ``messages``
  column, one list of ``{"role", "content"}`` messages per row (a plain prompt becomes one user
  message);
- the signature names input columns: a DataFrame with the prompts in the ``prompt`` column, or
  in its first named column;
- otherwise (no signature, or ``predict(self, context, model_input: list[str])``): a list of
  prompt strings; chat messages become the text of their messages joined by blank lines;
- a struct request (``named_struct('timestamp', ts, 'sender', s, 'text', t)``, a ``dict`` here)
  is one record of the model's input features, as Databricks feeds a custom model: the rows of
  a micro-batch become one DataFrame with those columns, typed by the signature (``_custom``),
  and each row's output is returned as a value (not its JSON text), typed by Spark later.

Generation parameters (``max_tokens``, ``temperature``, ...) and ``response_format`` go to
``predict(..., params=...)`` when the signature's params schema declares them, and are dropped
otherwise (a default ``max_tokens`` must not break a model that takes none). Any other name
(a custom model's own ``threshold``) must be declared: otherwise the row fails naming the
declared ones (the SQL rewrite refuses literal ones on the driver already).

What ``predict`` returns: one output per input, as a list, a pandas Series, a one-column
DataFrame or a numpy array. Each output is, for ``llm/v1/chat`` and ``llm/v1/completions``, a
string, or a dict in the OpenAI shape (``{"choices": [{"message": {"content": ...}}],
"usage": {...}}``; ``choices[0].text`` for completions), or any other JSON-able value, which
becomes its JSON text; for ``llm/v1/embeddings``, a list (or array) of floats, or
``{"data": [{"embedding": [...]}]}``. Token usage comes from the output's ``usage`` when it has
one, and is otherwise estimated (and marked so) with ``Usage.estimate``.

Errors: a model that cannot be loaded (a bad path, no such name or version, no registry, mlflow
not installed) raises ``SystemicEndpointError``, which stops the job with the URI and the fix; an
exception from ``predict`` fails only the rows that raise it (``PermanentEndpointError``, not
retried): a failed batch is split in halves, and those again, to find them.

``mlflow`` is imported only when a model is loaded: ``import ai_query`` stays free of it.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

from ..config import TASKS, ServedEntity
from .._errors import ArgumentError, ConfigError, PermanentEndpointError, SystemicEndpointError
from .._redact import redact
from .._schemas import ModelParameters, ModelResponse, Usage
from .._schemas import _PARAMETER_TYPES
from ._custom import ModelContract, check_params, json_value, typed_record
from ._protocol import Backend, BackendBase, Capabilities

_MESSAGE_LIMIT = 500  # characters of a model's own error message kept in a row's error


@dataclass(frozen=True)
class MLflowModelRef:
    """Which MLflow model a served entity runs: a model URI, or a registered name and version.

    ``MLflowModelRef(model_uri="/models/reviews")`` (any URI ``mlflow.pyfunc.load_model`` takes:
    a path, ``runs:/<run>/model``, ``models:/<name>@<alias>``, ...) or
    ``MLflowModelRef(entity_name="reviews", entity_version="3")``, which is ``models:/reviews/3``
    in the registry that ``MLFLOW_TRACKING_URI`` (or ``MLFLOW_REGISTRY_URI``) names.
    """

    model_uri: str | None = None
    entity_name: str | None = None
    entity_version: str | None = None

    def __post_init__(self) -> None:
        for key in ("model_uri", "entity_name", "entity_version"):
            value = getattr(self, key)
            if isinstance(value, int) and not isinstance(value, bool) and key == "entity_version":
                object.__setattr__(self, key, str(value))  # "entity_version": 3 in a JSON config
            elif value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(f"MLflow model: {key} must be a non-empty string, got {value!r:.80}")
        registered = self.entity_name is not None or self.entity_version is not None
        if self.model_uri is not None and registered:
            raise ConfigError(
                "MLflow model: set either model_uri or entity_name + entity_version, not both "
                f"(got model_uri={self.model_uri!r}, entity_name={self.entity_name!r}, entity_version={self.entity_version!r})"
            )
        if self.model_uri is None and (self.entity_name is None or self.entity_version is None):
            missing = "entity_version" if self.entity_name is not None else "entity_name"
            raise ConfigError(
                f"MLflow model: {missing} is missing; a registered model needs entity_name and entity_version "
                "(e.g. 'reviews' and '3'), or give model_uri instead"
            )

    @property
    def uri(self) -> str:
        """The URI handed to ``mlflow.pyfunc.load_model``."""
        if self.model_uri is not None:
            return self.model_uri
        return f"models:/{self.entity_name}/{self.entity_version}"


# One loaded model per URI (and registry) per process, shared by every provider and thread.
_MODELS: dict[tuple[str, str], Any] = {}
_MODELS_LOCK = threading.Lock()
_LOAD_LOCKS: dict[tuple[str, str], threading.Lock] = {}


def _redact(uri: str) -> str:
    """A tracking URI without user name or password, fit for an error message."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "(unparseable)"
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def _registry_hint(uri: str) -> str:
    tracking = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri.startswith("models:/"):
        return "Check the path or URI (it must hold an MLmodel file of the python_function flavor)."
    if not tracking and not os.environ.get("MLFLOW_REGISTRY_URI"):
        return (
            "Set MLFLOW_TRACKING_URI (or MLFLOW_REGISTRY_URI) to the registry that holds the model, "
            "then check the name and version."
        )
    hint = f"Check the name and version, and that MLFLOW_TRACKING_URI ({_redact(tracking or '')}) holds them."
    if tracking and (tracking.startswith("file:") or "://" not in tracking) and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
        hint += " A file store also needs MLFLOW_ALLOW_FILE_STORE=true."
    return hint


_IMPORT_LOCK = threading.Lock()
_MLFLOW_READY = False


def import_mlflow() -> Any:
    """``mlflow`` with ``mlflow.pyfunc`` and ``mlflow.models``, set up by one thread at a time.

    Two threads importing mlflow at once (a model loading in a worker thread while a request
    reads another model's metadata) can each see the other's half-initialised modules and fail
    with an ``ImportError``; and MLflow fills its table of model-registry stores on first use,
    where another thread can find it without ``file:`` yet ("Model Registry features are not
    supported by the store with URI 'file://...'"). Both happen here, once, under a lock.
    """
    global _MLFLOW_READY
    with _IMPORT_LOCK:
        import mlflow

        if not _MLFLOW_READY:
            import mlflow.models
            import mlflow.pyfunc

            try:
                from mlflow.tracking._model_registry.utils import _get_store_registry
            except ImportError:  # pragma: no cover - another MLflow version: nothing to fill in advance
                pass
            else:
                _get_store_registry()
            _MLFLOW_READY = True
    return mlflow


def load_pyfunc_model(uri: str) -> Any:
    """``mlflow.pyfunc.load_model(uri)``, once per process; ``SystemicEndpointError`` if it cannot be loaded."""
    try:
        mlflow = import_mlflow()
    except ImportError as exc:
        raise SystemicEndpointError(
            f"MLflow model {uri!r} needs the mlflow package, which is not installed: pip install mlflow-skinny"
        ) from exc
    key = (uri, mlflow.get_registry_uri() if uri.startswith("models:/") else "")
    with _MODELS_LOCK:
        lock = _LOAD_LOCKS.setdefault(key, threading.Lock())
    with lock:  # one thread loads, the others wait for it
        if key not in _MODELS:
            try:
                _MODELS[key] = mlflow.pyfunc.load_model(uri)
            except Exception as exc:  # MlflowException, OSError, a model's own import errors, ...
                detail = redact(" ".join(str(exc).split()))[:_MESSAGE_LIMIT]
                raise SystemicEndpointError(
                    f"cannot load MLflow model {uri!r} ({type(exc).__name__}: {detail}). {_registry_hint(uri)}"
                ) from exc
        return _MODELS[key]


_CONTRACTS: dict[str, ModelContract] = {}


def model_contract(entity: ServedEntity) -> ModelContract | None:
    """The signature contract of an MLflow served entity (read from its MLmodel file, without
    loading the model; once per URI), for checks on the driver; ``None`` for other kinds."""
    if not entity.is_mlflow:
        return None
    uri = MLflowModelRef(model_uri=entity.model_uri, entity_name=entity.entity_name, entity_version=entity.entity_version).uri
    if uri not in _CONTRACTS:
        try:
            import_mlflow()
            from mlflow.models import get_model_info

            info = get_model_info(uri)
        except ImportError as exc:
            raise SystemicEndpointError(f"MLflow model {uri!r} needs the mlflow package, which is not installed: pip install mlflow-skinny") from exc
        except Exception as exc:  # noqa: BLE001 - MlflowException, OSError: the message names the model and the fix
            detail = redact(" ".join(str(exc).split()))[:_MESSAGE_LIMIT]
            raise SystemicEndpointError(f"cannot read MLflow model {uri!r} ({type(exc).__name__}: {detail}). {_registry_hint(uri)}") from exc
        _CONTRACTS[uri] = ModelContract.of(info)
    return _CONTRACTS[uri]


@dataclass
class _Row:
    value: Any
    prompt_text: str
    future: asyncio.Future[ModelResponse]


@dataclass
class _Queue:
    """Rows waiting for a predict call, per event loop, request kind (record or prompt) and parameter set."""

    rows: dict[tuple[bool, tuple[tuple[str, Any], ...]], list[_Row]] = field(default_factory=dict)
    running: bool = False
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


@dataclass(frozen=True)
class _InputStyle:
    kind: str  # "messages" | "column" | "list"
    column: str | None
    params: frozenset[str]
    contract: ModelContract = ModelContract()


class MLflowPyfuncBackend(BackendBase):
    """Runs an MLflow pyfunc model in this process; the client calls ``invoke`` instead of HTTP.

    ``max_batch_size=1`` turns micro-batching off; one predict call runs at a time per event loop,
    in a worker thread.
    """

    capabilities = Capabilities(limiter="aimd", in_process=True, needs_start=True)

    @classmethod
    def for_entity(cls, entity: ServedEntity) -> Backend:
        ref = MLflowModelRef(model_uri=entity.model_uri, entity_name=entity.entity_name, entity_version=entity.entity_version)
        backend = cls(entity.name, ref, entity.task)
        backend.entity = entity
        return backend  # type: ignore[return-value]

    def __init__(self, entity_name_for_messages: str, ref: MLflowModelRef, task: str, *, max_batch_size: int = 64,
                 batch_wait_s: float = 0.0) -> None:
        if task not in TASKS:
            raise ConfigError(f"MLflow model {ref.uri!r}: task is {task!r}; use one of {', '.join(TASKS)}")
        if max_batch_size < 1:
            raise ConfigError(f"MLflow provider: max_batch_size must be >= 1, got {max_batch_size}")
        if not 0.0 <= batch_wait_s <= 1.0 or not math.isfinite(batch_wait_s):
            raise ConfigError(f"MLflow provider: batch_wait_s must be between 0 and 1 second, got {batch_wait_s}")
        self.name = entity_name_for_messages
        self.ref = ref
        self.task = task
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self._model: Any = None
        self._style: _InputStyle | None = None
        self._load_error: SystemicEndpointError | None = None
        self._load_lock: asyncio.Lock | None = None
        self._queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Queue] = weakref.WeakKeyDictionary()
        self.load_seconds: float | None = None
        """Seconds the first ``invoke`` in this process waited for the model (0 when already cached)."""
        self.predict_calls = 0
        self.rows_predicted = 0
        self.isolations = 0
        """Batches split in two because ``predict`` raised, to find the rows that make it fail."""

    def __getstate__(self) -> dict[str, Any]:  # shipped to executors without the model or loop state
        return {k: self.__dict__[k] for k in ("name", "ref", "task", "max_batch_size", "batch_wait_s")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state.pop("name"), state.pop("ref"), state.pop("task"), **state)  # type: ignore[misc]

    # -- loading ---------------------------------------------------------------------------

    def load(self) -> Any:
        """Load (or take from the process cache) the model, blocking; ``SystemicEndpointError`` if impossible."""
        if self._model is None:
            started = time.perf_counter()
            model = load_pyfunc_model(self.ref.uri)
            self._style = _input_style(model)
            self._model = model
            self.load_seconds = time.perf_counter() - started
        return self._model

    async def start(self) -> None:
        """Load the model in this process (a server warms its endpoints with this)."""
        await self._ensure_loaded()

    async def _ensure_loaded(self) -> Any:
        if self._model is not None:
            return self._model
        if self._load_error is not None:
            raise self._load_error
        if self._load_lock is None:
            self._load_lock = asyncio.Lock()
        async with self._load_lock:  # the first row loads, the rows behind it wait
            if self._model is None and self._load_error is None:
                try:
                    await asyncio.to_thread(self.load)
                except SystemicEndpointError as exc:
                    self._load_error = exc
            if self._load_error is not None:
                raise self._load_error
        return self._model

    # -- the client's entry point ----------------------------------------------------------

    async def invoke(
        self, task: str, value: Any, params: ModelParameters, response_format: Mapping[str, Any] | None, prompt_text: str
    ) -> ModelResponse:
        """One row through the model (possibly inside a micro-batch)."""
        await self._ensure_loaded()
        assert self._style is not None
        values = dict(params.values)
        if response_format is not None:
            values["response_format"] = dict(response_format)
        try:
            check_params(values, self._style.params, repr(self.ref.uri), llm_names=(*_PARAMETER_TYPES, "response_format"))
        except ArgumentError as exc:
            raise PermanentEndpointError(str(exc)) from None
        declared = tuple(sorted((k, _hashable(v)) for k, v in values.items() if k in self._style.params))
        loop = asyncio.get_running_loop()
        queue = self._queues.get(loop)
        if queue is None:
            queue = self._queues[loop] = _Queue()
        future: asyncio.Future[ModelResponse] = loop.create_future()
        queue.rows.setdefault((isinstance(value, Mapping), declared), []).append(_Row(value, prompt_text, future))
        if not queue.running:
            queue.running = True
            runner = loop.create_task(self._drain(queue, task))
            queue.tasks.add(runner)
            runner.add_done_callback(queue.tasks.discard)
        return await future

    async def _drain(self, queue: _Queue, task: str) -> None:
        """Predict queued rows, batch after batch, until none are left."""
        try:
            if self.batch_wait_s > 0 and self.max_batch_size > 1 and sum(map(len, queue.rows.values())) < self.max_batch_size:
                await asyncio.sleep(self.batch_wait_s)  # let the rows sent together arrive together
            while queue.rows:
                key = next(iter(queue.rows))
                waiting = queue.rows[key]
                batch, rest = waiting[: self.max_batch_size], waiting[self.max_batch_size :]
                if rest:
                    queue.rows[key] = rest
                else:
                    del queue.rows[key]
                batch = [row for row in batch if not row.future.done()]  # cancelled rows are skipped
                if batch:
                    await self._run_batch(task, dict(key[1]), batch)
        finally:
            queue.running = False

    async def _run_batch(self, task: str, params: dict[str, Any], batch: list[_Row]) -> None:
        try:
            outputs = await asyncio.to_thread(self._predict, task, [row.value for row in batch], params)
        except SystemicEndpointError as exc:
            for row in batch:
                _settle(row, exc)
            return
        except Exception as exc:  # noqa: BLE001 - the model's own failure: find the rows that cause it
            if len(batch) == 1:
                detail = redact(" ".join(str(exc).split()))[:_MESSAGE_LIMIT] or "(no message)"
                _settle(batch[0], PermanentEndpointError(f"MLflow model {self.ref.uri!r} failed on this row: {type(exc).__name__}: {detail}"))
                return
            # Bisect: one bad row in 64 costs 12 more predicts, not 64.
            self.isolations += 1
            half = len(batch) // 2
            await self._run_batch(task, params, batch[:half])
            await self._run_batch(task, params, batch[half:])
            return
        for row, output in zip(batch, outputs):
            try:
                result: ModelResponse | BaseException = (
                    _record_response(output, row.prompt_text, self.ref.uri) if isinstance(row.value, Mapping)
                    else _response(task, output, row.prompt_text, self.ref.uri))
            except PermanentEndpointError as exc:
                result = exc
            except Exception as exc:  # noqa: BLE001 - an output of a shape nobody expected: that row's error
                result = PermanentEndpointError(
                    f"MLflow model {self.ref.uri!r} returned an output that cannot be read for this row "
                    f"({type(exc).__name__}: {exc}): {redact(str(output)[:2000])[:200]}"
                )
            _settle(row, result)

    def _predict(self, task: str, values: list[Any], params: dict[str, Any]) -> list[Any]:
        """One predict call (in a worker thread): model input from the signature, one output per input."""
        style = self._style
        assert style is not None and self._model is not None
        if values and isinstance(values[0], Mapping):  # struct requests: one record of input features each
            import pandas as pd

            data: Any = pd.DataFrame([typed_record(v, style.contract) for v in values])
        elif style.kind == "list":
            data = [_text(v) for v in values]
        else:
            import pandas as pd

            column = [_messages(v) for v in values] if style.kind == "messages" else [_text(v) for v in values]
            data = pd.DataFrame({style.column: column})
        self.predict_calls += 1
        self.rows_predicted += len(values)
        output = self._model.predict(data, params=params) if params else self._model.predict(data)
        outputs = _per_row(output, len(values), task, records=bool(values) and isinstance(values[0], Mapping))
        if len(outputs) != len(values):
            raise SystemicEndpointError(
                f"MLflow model {self.ref.uri!r} returned {len(outputs)} outputs for {len(values)} inputs: its predict "
                "must return one output per input row (a list, Series or one-column DataFrame)"
            )
        return outputs


def _settle(row: _Row, result: ModelResponse | BaseException) -> None:
    if row.future.done():  # the caller gave up on this row (cancelled)
        return
    if isinstance(result, BaseException):
        row.future.set_exception(result)
    else:
        row.future.set_result(result)


def _hashable(value: Any) -> Any:
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, default=str)
    return value


def _input_style(model: Any) -> _InputStyle:
    signature = getattr(getattr(model, "metadata", None), "signature", None)
    inputs = getattr(signature, "inputs", None)
    names = [n for n in (inputs.input_names() if inputs is not None else []) if isinstance(n, str)]
    contract = ModelContract.of(getattr(model, "metadata", None))
    params = frozenset(contract.params)
    if "messages" in names:
        return _InputStyle("messages", "messages", params, contract)
    if names:
        return _InputStyle("column", "prompt" if "prompt" in names else names[0], params, contract)
    return _InputStyle("list", None, params, contract)


def _messages(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, list):
        return [dict(m) if isinstance(m, Mapping) else {"role": "user", "content": str(m)} for m in value]
    return [{"role": "user", "content": value if isinstance(value, str) else str(value)}]


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, Mapping) for m in value):
        return "\n\n".join(str(m.get("content", "")) for m in value)
    return str(value)


@dataclass(frozen=True)
class _ColumnValue:
    """One row of a one-column DataFrame a custom model returned: the column's value (the row's
    ``value``, typed like the column) and the record MLflow's scoring server answers for it."""

    value: Any
    record: dict[str, Any]


def _per_row(output: Any, n: int, task: str, *, records: bool = False) -> list[Any]:
    """Split what predict returned into one output per input row (``records``: struct requests)."""
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas comes with mlflow
        pd = None
    if pd is not None and isinstance(output, pd.DataFrame):
        if output.shape[1] == 1:
            values = output.iloc[:, 0].tolist()
            if records:
                return [_ColumnValue(v, r) for v, r in zip(values, output.to_dict("records"))]
            return values
        return output.to_dict("records")
    if pd is not None and isinstance(output, pd.Series):
        return output.tolist()
    if hasattr(output, "tolist") and hasattr(output, "ndim"):  # numpy
        if task == "llm/v1/embeddings" and output.ndim == 1 and n == 1:
            return [output.tolist()]
        return output.tolist()
    if isinstance(output, Mapping):
        if isinstance(output.get("predictions"), list):
            return list(output["predictions"])
        if task == "llm/v1/embeddings" and isinstance(output.get("data"), list) and len(output["data"]) == n and n != 1:
            return [{"data": [item]} for item in output["data"]]
        return [output]
    if isinstance(output, str):
        return [output]
    if isinstance(output, (list, tuple)):
        if task == "llm/v1/embeddings" and n == 1 and output and all(isinstance(x, (int, float)) for x in output):
            return [list(output)]
        return list(output)
    return [output]


def _response(task: str, output: Any, prompt_text: str, uri: str) -> ModelResponse:
    """One row's output as a ``ModelResponse``; ``PermanentEndpointError`` if it has no usable value."""
    if output is None:
        raise PermanentEndpointError(f"MLflow model {uri!r} returned no output (None) for this row")
    if task == "llm/v1/embeddings":
        return _embedding(output, prompt_text, uri)
    if isinstance(output, str):
        return ModelResponse(value=output, usage=Usage.estimate(prompt_text, output))
    if isinstance(output, Mapping) and isinstance(output.get("choices"), list):
        try:
            choice = output["choices"][0]
            text = choice["message"]["content"] if "message" in choice else choice["text"]
        except (IndexError, KeyError, TypeError) as exc:
            raise PermanentEndpointError(
                f"MLflow model {uri!r} returned choices without a message content or text for this row: {str(output)[:200]}"
            ) from exc
        text = "" if text is None else text if isinstance(text, str) else json.dumps(text, default=str)
        return ModelResponse(
            value=text,
            usage=Usage.from_payload(output.get("usage"), prompt_text, text),
            model=output.get("model") if isinstance(output.get("model"), str) else None,
            request_id=output.get("id") if isinstance(output.get("id"), str) else None,
            finish_reason=choice.get("finish_reason") if isinstance(choice, Mapping) else None,
            raw=dict(output),
        )
    if hasattr(output, "item") and not isinstance(output, (list, dict)):
        output = output.item()  # a numpy scalar
    text = json.dumps(output, default=str, ensure_ascii=False)
    usage = output.get("usage") if isinstance(output, Mapping) else None
    return ModelResponse(value=text, usage=Usage.from_payload(usage, prompt_text, text))


def _record_response(output: Any, prompt_text: str, uri: str) -> ModelResponse:
    """A custom model's output for one record: the value itself (JSON-native), typed by Spark later."""
    prediction = None
    if isinstance(output, _ColumnValue):
        output, prediction = output.value, json_value(output.record)
    if output is None:
        raise PermanentEndpointError(f"MLflow model {uri!r} returned no output (None) for this row")
    value = json_value(output)
    text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
    usage = output.get("usage") if isinstance(output, Mapping) else None
    return ModelResponse(value=value, usage=Usage.from_payload(usage, prompt_text, text), prediction=prediction)


def _embedding(output: Any, prompt_text: str, uri: str) -> ModelResponse:
    usage = None
    vector: Any = output
    if isinstance(output, Mapping):
        usage = output.get("usage")
        if isinstance(output.get("data"), list) and output["data"]:
            vector = output["data"][0].get("embedding") if isinstance(output["data"][0], Mapping) else None
        else:
            vector = output.get("embedding")
    if hasattr(vector, "tolist"):
        vector = vector.tolist()
    if not isinstance(vector, Sequence) or isinstance(vector, str) or not vector:
        raise PermanentEndpointError(f"MLflow model {uri!r} returned no embedding (a list of numbers) for this row: {str(output)[:200]}")
    try:
        floats = [float(x) for x in vector]
    except (TypeError, ValueError) as exc:
        raise PermanentEndpointError(f"MLflow model {uri!r} returned an embedding that is not all numbers: {str(vector)[:200]}") from exc
    return ModelResponse(value=floats, usage=Usage.from_payload(usage, prompt_text, ""))
