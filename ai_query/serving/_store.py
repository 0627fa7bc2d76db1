"""Serving endpoints: their records (persisted in a state dir), live deployments and config updates.

An endpoint created through the management API is stored as the JSON body it was created with
(``config``, ``rate_limits``, ``tags``, ...) plus what the server adds (``id``, ``creator``,
timestamps, ``config_version``), in ``<state_dir>/endpoints.json``, written atomically after every
change, so endpoints survive a restart; plaintext credentials in it are sealed (``_sealed.py``).
Endpoints of the registry (built-ins, ``AIQ_ENDPOINTS``, ``--endpoints FILE``) are served too,
read-only: change them in their file.

Every served endpoint has a ``Deployment``: its validated ``EndpointConfig`` and the very
``EndpointClient`` (routes, concurrency limiter, quota, retries) that a Spark task uses. A config
update builds and warms a new deployment (a local model's server started, an MLflow model
loaded) while the old one keeps serving; only then is it swapped in. A second update while one
is in progress is refused.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import time
import uuid
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from .._logging import get_logger
from .._client import AIQueryClient, EndpointClient
from ..config import TASKS, EndpointConfig, EndpointRegistry
from .._errors import AIQueryError, ConfigError, ServingError
from ..backends._mlflow import import_mlflow
from ..process import proc_stat, process_identity
from ..transport import TRANSPORT_KINDS, Transport, make_transport
from ._sealed import CredentialSealer
from ._shared import SharedControl

log = get_logger("ai_query.serving")

_CONFIG_KEYS = ("served_entities", "traffic_config", "auto_capture_config")
HTTP_CLIENTS = TRANSPORT_KINDS
"""The server's transports to backends (``ai-query serve --http-client``); see ``ai_query.transport``."""
_MASK = "********"


def masked(data: Any) -> Any:
    """``data`` with every plaintext credential replaced by ``********`` (references stay)."""
    if isinstance(data, Mapping):
        return {k: (_MASK if k.endswith("_plaintext") and v is not None else masked(v)) for k, v in data.items()}
    if isinstance(data, list):
        return [masked(v) for v in data]
    return data


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class EndpointRecord:
    """One endpoint as the management API knows it."""

    name: str
    spec: dict[str, Any]
    """The create body without ``name``: ``config``, ``rate_limits``, ``tags``, ``client_config``, ..."""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    creator: str = "anonymous"
    creation_timestamp: int = field(default_factory=_now_ms)
    last_updated_timestamp: int = field(default_factory=_now_ms)
    config_version: int = 1
    source: str = "api"
    """``api`` (managed here and persisted) or where a read-only registry endpoint came from."""
    pending_spec: dict[str, Any] | None = None
    update_state: str = "NOT_UPDATING"
    update_message: str = ""
    update_owner: str | None = None
    """The process deploying ``pending_spec`` (``process_identity``): with several workers, any of them."""

    def to_state(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("name", "spec", "id", "creator", "creation_timestamp", "last_updated_timestamp",
                                              "config_version", "pending_spec", "update_state", "update_message", "update_owner")}

    def settle_orphaned_update(self) -> None:
        """An update whose deploying process is gone (a restart, a crashed worker) has failed."""
        if self.update_state == "IN_PROGRESS" and self.update_owner != _me() and not _alive(self.update_owner):
            self.update_state, self.pending_spec, self.update_owner = "UPDATE_FAILED", None, None
            self.update_message = "the server process deploying this config exited before it was ready; send the update again"


def _alive(identity: str | None) -> bool:
    """Whether the process ``identity`` names runs (a zombie or a reused pid does not count)."""
    if not identity:
        return False
    pid = int(str(identity).partition(":")[0])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = proc_stat(pid)
    if stat is not None and stat.state == "Z":
        return False
    return process_identity(pid) == identity


_IDENTITY: dict[int, str] = {}


def _me() -> str:
    """This process's ``process_identity`` (looked up once per pid: a fork gets its own)."""
    pid = os.getpid()
    if pid not in _IDENTITY:
        _IDENTITY[pid] = process_identity(pid)
    return _IDENTITY[pid]


def _serving_part(spec: Mapping[str, Any]) -> dict[str, Any]:
    """What a deployment is built from: everything but the rate limits and tags (they change in place)."""
    return {k: v for k, v in spec.items() if k not in ("rate_limits", "tags")}


@dataclass
class Deployment:
    """What serves an endpoint: its config and the batch path's ``EndpointClient``."""

    config: EndpointConfig
    client: EndpointClient
    ready: bool = False
    error: str | None = None


def _parse(name: str, spec: Mapping[str, Any]) -> EndpointConfig:
    try:
        return EndpointConfig.from_dict({"name": name, **spec}, "endpoint")
    except ConfigError as exc:
        raise ServingError(400, "INVALID_PARAMETER_VALUE", str(exc)) from exc


def infer_mlflow_task(entity: Mapping[str, Any]) -> str:
    """The task of an MLflow served entity that names none (the reference bodies give only
    ``entity_name`` + ``entity_version``): the model's ``metadata.task``, else its signature
    (a ``messages`` input is chat; an array-of-numbers output is embeddings), else completions."""
    uri = entity.get("model_uri") or f"models:/{entity.get('entity_name')}/{entity.get('entity_version')}"
    try:
        import_mlflow()  # not while a model loads in another thread: see import_mlflow
        from mlflow.models import get_model_info

        info = get_model_info(uri)
    except Exception as exc:  # noqa: BLE001 - mlflow raises many kinds; the message says which model
        raise ServingError(400, "INVALID_PARAMETER_VALUE",
                           f"cannot read the MLflow model {uri!r} to find its task ({type(exc).__name__}: {exc}); "
                           "check entity_name / entity_version, MLFLOW_TRACKING_URI, or give \"task\" in the served entity") from None
    task = (info.metadata or {}).get("task")
    if task in TASKS:
        return task
    signature = info.signature
    if signature is not None:
        if "messages" in (signature.inputs.input_names() if signature.inputs is not None else []):
            return "llm/v1/chat"
        outputs = signature.outputs.to_dict() if signature.outputs is not None else []
        if any("double" in str(o) or "float" in str(o) for o in outputs) and any("array" in str(o) or "tensor" in str(o) for o in outputs):
            return "llm/v1/embeddings"
    return "llm/v1/completions"


def with_mlflow_tasks(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``spec`` with the task of every MLflow served entity filled in."""
    spec = copy.deepcopy(dict(spec))
    entities = spec.get("config", {}).get("served_entities") if isinstance(spec.get("config"), Mapping) else None
    for entity in entities if isinstance(entities, list) else []:
        if isinstance(entity, dict) and ("entity_name" in entity or "model_uri" in entity) and "task" not in entity:
            entity["task"] = infer_mlflow_task(entity)
    return spec


def _has_external(config: EndpointConfig) -> bool:
    return any(e.external_model is not None for e in config.served_entities)


def needs_warming(client: EndpointClient) -> bool:
    """Whether some entity must be started or loaded before it can answer (external models need not)."""
    return any(r.backend.capabilities.needs_start for r in client.routes)


async def warm(client: EndpointClient) -> None:
    """Make every served entity ready to answer: start local model servers, load MLflow models."""
    for route in client.routes:
        await route.backend.start()


class EndpointStore:
    """The endpoints the server knows, their deployments, and the state dir that keeps them.

    With ``control`` (the workers of ``ai-query serve --workers N``), every change is made under
    its lock on the state file as it is then, and announced through its generation counter;
    ``refresh()`` takes in the changes of the other workers.
    """

    def __init__(self, registry: EndpointRegistry, state_dir: str | os.PathLike[str] | None, *,
                 sources: Mapping[str, str] | None = None, http_client: str = "httptools",
                 control: SharedControl | None = None, share: float = 1.0,
                 state_key_file: str | os.PathLike[str] | None = None) -> None:
        if http_client not in HTTP_CLIENTS:
            raise ConfigError(f"http_client is {http_client!r}; use 'httptools' (least CPU) or 'aiohttp' (as batch tasks do)")
        if control is not None and state_dir is None:
            raise ConfigError("several workers share their endpoints through the state dir: give a state_dir")
        self.registry = registry
        self.http_client = http_client
        self._transport: Transport | None = None
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self._sealer = CredentialSealer(state_key_file)
        self._control = control
        self._generation = control.generation() if control is not None else 0
        # One HTTP client and quota bookkeeping for all; a worker of N takes 1/N of each endpoint's
        # concurrency and quota, as a batch job's workers do.
        self._factory = AIQueryClient(EndpointRegistry(), quota_share=share)
        self._share = share
        self.records: dict[str, EndpointRecord] = {}
        self.deployments: dict[str, Deployment] = {}
        self._latest: dict[str, Deployment] = {}
        self._tasks: set[asyncio.Task] = set()
        for config in registry:
            where = (sources or {}).get(config.name, "registry")
            spec = {k: v for k, v in config.to_dict().items() if k != "name"}
            self.records[config.name] = EndpointRecord(config.name, spec, id=config.name, creator="system", source=where,
                                                       creation_timestamp=0, last_updated_timestamp=0)
        loaded, clear = self._read()
        for data in loaded:
            record = EndpointRecord(**data)
            record.settle_orphaned_update()
            self.records[record.name] = record
        if clear:
            self._seal_clear_credentials()

    # -- persistence ------------------------------------------------------------------------
    @property
    def _state_file(self) -> Path | None:
        return self.state_dir / "endpoints.json" if self.state_dir is not None else None

    def _load(self) -> list[dict[str, Any]]:
        return self._read()[0]

    def _read(self) -> tuple[list[dict[str, Any]], bool]:
        """The state file's records, credentials unsealed, and whether one was found in clear."""
        path = self._state_file
        if path is None or not path.exists():
            return [], False
        try:
            items = list(json.loads(path.read_text())["endpoints"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"cannot read the serving state {path}: {exc}; fix or remove the file") from exc
        return self._sealer.unseal(items, str(path))

    def _save(self) -> None:
        self._write([r.to_state() for r in self.records.values() if r.source == "api"])

    def _write(self, endpoints: list[dict[str, Any]]) -> None:
        path = self._state_file
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"endpoints": self._sealer.seal(endpoints)}
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        # Readable by the owner only (credentials are sealed, but names, URLs and tags are the owner's business).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1)
        os.replace(tmp, path)

    def _seal_clear_credentials(self) -> None:
        """Rewrite a state file written before credentials were sealed, as it is, with them sealed
        (under the workers' lock: each worker may find it so; the first one rewrites it)."""
        with self._control if self._control is not None else nullcontext():
            items, clear = self._read()
            if clear:
                self._write(items)
                log.info("sealed the plaintext credentials of the serving state %s (key file %s)", self._state_file,
                         self._sealer.key_file)

    def refresh(self) -> None:
        """Take in what other workers changed since the last look (one read of shared memory)."""
        control = self._control
        if control is not None and control.generation() != self._generation:
            self._generation = control.generation()  # before reading: a later change is seen next time
            self._merge(self._load())

    @contextmanager
    def _changing(self) -> Iterator[None]:
        """One change at a time over all workers, made on the current state, then saved and announced."""
        control = self._control
        if control is None:
            yield
            self._save()
            return
        with control:
            self.refresh()
            yield
            self._save()
            self._generation = control.bump()

    def _merge(self, data: list[dict[str, Any]]) -> None:
        """Make the records (and deployments) those of the state file another worker wrote."""
        names = set()
        for item in data:
            name = item["name"]
            names.add(name)
            record = self.records.get(name)
            if record is None or record.source != "api":
                record = self.records[name] = EndpointRecord(**item)
                record.settle_orphaned_update()
                self._deploy(name, self.config_of(record))
                continue
            before = (record.config_version, _serving_part(record.spec))
            for key, value in item.items():
                setattr(record, key, value)
            record.settle_orphaned_update()
            if (record.config_version, _serving_part(record.spec)) != before:
                self._deploy(name, self.config_of(record))
            else:
                dep = self.deployments.get(name)
                if dep is not None:  # rate limits or tags: the deployment (and its client) stays
                    dep.config = self.config_of(record)
        for name in [n for n, r in self.records.items() if r.source == "api" and n not in names]:
            del self.records[name]
            self.deployments.pop(name, None)
            self._latest.pop(name, None)

    # -- deployments ------------------------------------------------------------------------
    def _http(self) -> Transport:
        if self._transport is None:
            self._transport = make_transport(self.http_client)  # type: ignore[arg-type]
        return self._transport

    def _new_deployment(self, config: EndpointConfig) -> Deployment:
        factory = self._factory
        return Deployment(config, EndpointClient(config, self._http(), quota=factory._quota(config), share=self._share))

    def _deploy(self, name: str, config: EndpointConfig) -> Deployment:
        """A deployment of ``config`` for ``name``: ready at once, or warmed in the background
        while the current one (if ready) keeps serving."""
        dep = self._new_deployment(config)
        self._latest[name] = dep
        old = self.deployments.get(name)
        if not needs_warming(dep.client):
            dep.ready = True
            self.deployments[name] = dep
        elif old is not None and old.ready:
            self._spawn(self._warm(name, dep))
        else:
            self.deployments[name] = dep
            self._spawn(self._warm(name, dep))
        return dep

    def deployment(self, name: str) -> Deployment:
        """The live deployment of ``name`` (created on first use for registry endpoints)."""
        dep = self.deployments.get(name)
        if dep is None:
            record = self.get(name)
            dep = self._new_deployment(self.config_of(record))
            # Registry endpoints start their local model on first use, exactly as a batch job does.
            dep.ready = record.source != "api" or not needs_warming(dep.client)
            self.deployments[name] = self._latest[name] = dep
            if not dep.ready:
                self._spawn(self._warm(name, dep))
        return dep

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _warm(self, name: str, dep: Deployment) -> None:
        try:
            await warm(dep.client)
            dep.ready = True
        except (AIQueryError, OSError) as exc:
            dep.error = str(exc)
            log.warning("serving endpoint %r failed to deploy: %s", name, exc)
            return
        if self._latest.get(name) is dep and name in self.records:  # not replaced or deleted meanwhile
            self.deployments[name] = dep

    async def start(self) -> None:
        """Deploy the persisted endpoints (warming in the background)."""
        for name, record in self.records.items():
            if record.source == "api":
                self.deployment(name)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._transport is not None:
            await self._transport.aclose()

    def config_of(self, record: EndpointRecord) -> EndpointConfig:
        """The validated config of ``record`` (a registry endpoint's own, with its real credentials)."""
        if record.source != "api":
            return self.registry.get(record.name)
        return _parse(record.name, record.spec)

    # -- management -------------------------------------------------------------------------
    def get(self, name: str) -> EndpointRecord:
        record = self.records.get(name)
        if record is None:
            raise ServingError(404, "RESOURCE_DOES_NOT_EXIST", f"serving endpoint {name!r} does not exist")
        return record

    def _managed(self, name: str) -> EndpointRecord:
        record = self.get(name)
        if record.source != "api":
            raise ServingError(400, "INVALID_PARAMETER_VALUE",
                             f"serving endpoint {name!r} is defined in {record.source} (read-only here); change it in that file")
        return record

    def create(self, body: Mapping[str, Any], creator: str) -> EndpointRecord:
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise ServingError(400, "INVALID_PARAMETER_VALUE", "'name' is required: the serving endpoint's name")
        if name in self.records:
            raise ServingError(409, "RESOURCE_ALREADY_EXISTS", f"serving endpoint {name!r} already exists")
        spec = with_mlflow_tasks({k: v for k, v in body.items() if k != "name"})
        config = _parse(name, spec)
        with self._changing():
            if name in self.records:  # created by another worker meanwhile
                raise ServingError(409, "RESOURCE_ALREADY_EXISTS", f"serving endpoint {name!r} already exists")
            record = EndpointRecord(name, spec, creator=creator)
            self.records[name] = record
        self._deploy(name, config)
        log.info("created serving endpoint %r (%d served entities) for %s", name, len(config.served_entities), creator)
        return record

    def update_config(self, name: str, body: Mapping[str, Any]) -> EndpointRecord:
        record = self._managed(name)
        self._refuse_concurrent_update(record)
        if body.get("name") not in (None, name):
            raise ServingError(400, "INVALID_PARAMETER_VALUE", f"the body names {body.get('name')!r}, the URL {name!r}")
        unknown = sorted(set(body) - {*_CONFIG_KEYS, "name"})
        if unknown:
            raise ServingError(400, "INVALID_PARAMETER_VALUE",
                             f"unknown field(s) {unknown} in the config update; allowed are {', '.join(_CONFIG_KEYS)}")
        old = _parse(name, record.spec)
        spec = copy.deepcopy(record.spec)
        spec["config"] = {k: copy.deepcopy(body[k]) for k in _CONFIG_KEYS if k in body}
        spec = with_mlflow_tasks(spec)
        new = _parse(name, spec)
        if _has_external(old) != _has_external(new):
            what = ("cannot drop its external_model" if _has_external(old) else "was created without an external_model and cannot add one")
            raise ServingError(400, "INVALID_PARAMETER_VALUE", f"serving endpoint {name!r} {what}; create a new endpoint instead")
        with self._changing():
            record = self._managed(name)
            self._refuse_concurrent_update(record)
            record.pending_spec = spec
            record.update_state = "IN_PROGRESS"
            record.update_message = ""
            record.update_owner = _me()
        self._spawn(self._apply_update(record, new))
        return record

    @staticmethod
    def _refuse_concurrent_update(record: EndpointRecord) -> None:
        record.settle_orphaned_update()
        if record.update_state == "IN_PROGRESS":
            raise ServingError(409, "RESOURCE_CONFLICT",
                             f"serving endpoint {record.name!r} has a config update in progress; wait until it finishes")

    async def _apply_update(self, record: EndpointRecord, config: EndpointConfig) -> None:
        dep = self._new_deployment(config)
        spec = record.pending_spec
        try:
            await warm(dep.client)
        except (AIQueryError, OSError) as exc:  # the old config keeps serving
            with self._changing():
                if self._still_updating(record, spec):
                    record.update_state, record.update_message, record.pending_spec = "UPDATE_FAILED", str(exc), None
                    record.update_owner = None
            log.warning("config update of %r failed, the previous config keeps serving: %s", record.name, exc)
            return
        with self._changing():
            if not self._still_updating(record, spec):  # deleted while the new config was warming
                return
            dep.ready = True
            self.deployments[record.name] = self._latest[record.name] = dep
            assert record.pending_spec is not None
            record.spec, record.pending_spec = record.pending_spec, None
            record.config_version += 1
            record.last_updated_timestamp = _now_ms()
            record.update_state, record.update_owner = "NOT_UPDATING", None
        log.info("serving endpoint %r now serves config version %d", record.name, record.config_version)

    def _still_updating(self, record: EndpointRecord, spec: dict[str, Any] | None) -> bool:
        return (self.records.get(record.name) is record and record.update_state == "IN_PROGRESS"
                and record.update_owner == _me() and record.pending_spec == spec)

    def put_rate_limits(self, name: str, body: Mapping[str, Any]) -> list[dict[str, Any]]:
        limits = body.get("rate_limits", [])
        with self._changing():
            record = self._managed(name)
            spec = {**record.spec, "rate_limits": copy.deepcopy(limits)}
            config = _parse(name, spec)  # validates
            record.spec = spec
            record.last_updated_timestamp = _now_ms()
        dep = self.deployments.get(name)
        if dep is not None:  # limits live in the config; the deployment (and its client) stays
            dep.config = config
        return [dict(calls=r.calls, key=r.key, renewal_period=r.renewal_period) for r in config.rate_limits]

    def patch_tags(self, name: str, body: Mapping[str, Any]) -> list[dict[str, str]]:
        add, delete = body.get("add_tags", []), body.get("delete_tags", [])
        if not isinstance(add, list) or not isinstance(delete, list):
            raise ServingError(400, "INVALID_PARAMETER_VALUE", "add_tags must be a list of {key, value}; delete_tags a list of keys")
        with self._changing():
            record = self._managed(name)
            tags = {t["key"]: t.get("value", "") for t in record.spec.get("tags", []) if isinstance(t, Mapping)}
            for key in delete:
                tags.pop(key, None)
            for tag in add:
                if not isinstance(tag, Mapping) or not isinstance(tag.get("key"), str):
                    raise ServingError(400, "INVALID_PARAMETER_VALUE", f"add_tags: {tag!r} is not {{\"key\": ..., \"value\": ...}}")
                tags[tag["key"]] = str(tag.get("value", ""))
            spec = {**record.spec, "tags": [{"key": k, "value": v} for k, v in tags.items()]}
            config = _parse(name, spec)
            record.spec = spec
            record.last_updated_timestamp = _now_ms()
        dep = self.deployments.get(name)
        if dep is not None:
            dep.config = config
        return spec["tags"]

    def delete(self, name: str) -> None:
        with self._changing():
            self._managed(name)
            del self.records[name]
            self.deployments.pop(name, None)
            self._latest.pop(name, None)
        log.info("deleted serving endpoint %r", name)

    # -- rendering ----------------------------------------------------------------------------
    def render(self, record: EndpointRecord, permission_level: str | None) -> dict[str, Any]:
        """The endpoint as the REST API returns it (credentials masked)."""
        record.settle_orphaned_update()
        dep = self.deployments.get(record.name)
        if record.source != "api":
            ready = True
        else:
            ready = dep is not None and dep.ready
        config = self.config_of(record)
        out: dict[str, Any] = {
            "name": record.name,
            "creator": record.creator,
            "creation_timestamp": record.creation_timestamp,
            "last_updated_timestamp": record.last_updated_timestamp,
            "state": {"ready": "READY" if ready else "NOT_READY", "config_update": record.update_state},
            "config": self._render_config(record.spec, config, record, dep),
            "tags": [{"key": k, "value": v} for k, v in config.tags],
            "rate_limits": [dict(calls=r.calls, key=r.key, renewal_period=r.renewal_period) for r in config.rate_limits],
            "id": record.id,
            "permission_level": permission_level,
            "route_optimized": bool(record.spec.get("route_optimized", False)),
            "task": config.task,
            "source": record.source,
        }
        if record.update_message:
            out["state"]["config_update_message"] = record.update_message
        if record.pending_spec is not None:
            pending = _parse(record.name, record.pending_spec)
            out["pending_config"] = self._render_config(record.pending_spec, pending, record, None, pending=True)
        return masked(out)

    @staticmethod
    def _render_config(spec: Mapping[str, Any], config: EndpointConfig, record: EndpointRecord,
                       dep: Deployment | None, pending: bool = False) -> dict[str, Any]:
        raw_entities = spec.get("config", {}).get("served_entities", [])
        entities = []
        for raw, entity in zip(raw_entities, config.served_entities):
            if pending:
                state = {"deployment": "DEPLOYMENT_CREATING", "deployment_state_message": "the new config is being deployed"}
            elif dep is not None and dep.error:
                state = {"deployment": "DEPLOYMENT_FAILED", "deployment_state_message": dep.error}
            elif record.source != "api" or (dep is not None and dep.ready):
                state = {"deployment": "DEPLOYMENT_READY", "deployment_state_message": ""}
            else:
                state = {"deployment": "DEPLOYMENT_CREATING", "deployment_state_message": "starting"}
            entities.append({**copy.deepcopy(dict(raw)), "name": entity.name, "state": state,
                             "creator": record.creator, "creation_timestamp": record.creation_timestamp})
        routes = config.traffic_routes or ((config.served_entities[0].name, 100),)
        return {
            "served_entities": entities,
            "traffic_config": {"routes": [{"served_model_name": n, "served_entity_name": n, "traffic_percentage": p} for n, p in routes]},
            "config_version": record.config_version + (1 if pending else 0),
        }
