"""A job's counters pushed to an MLflow run (``ai-query run --mlflow-run``, or ``[mlflow]`` in the spec).

The counters are the run log's (``runs.jsonl``: rows, tokens, cost, ``per_endpoint`` with requests
and attempts), which are in turn the usage table's sums for the run, the
batch counterparts of ``ai-query serve``'s ``/metrics``. So an MLflow run and ``ai-query status``
never disagree: both read what the job committed, not a live estimate.

What is logged: params (job, endpoints, served models, rows pending, output path, our run id),
metrics (rows ok/failed, prompt/completion tokens, cost, requests, attempts, retries (429 waits
included: a row's attempts are committed, the status of each attempt is not), rows/s, wall time;
per endpoint ``endpoint.<name>.<counter>``), and the
run's summary JSON (the ``--json`` document of the job) as the artifact ``ai_query/summary.json``.

MLflow is a side channel: a tracking server that is down or refuses must not fail a job whose
rows are committed. One warning says why and the command goes on (later jobs of the same command
are not pushed, so the warning is not repeated). MLflow's own HTTP client retries a dead server
for minutes, so an ``http(s)`` tracking URI is first probed once with a short timeout (any HTTP
answer, even 404, counts as reachable). Every param value passes ``redact`` (a path or a name
holding a key shape or a known secret becomes ``[REDACTED]``), and credentials in the tracking
URI are never printed.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Mapping

from ai_query import ConfigError, get_logger
from ai_query._redact import redact

log = get_logger("batch_runner")

SUMMARY_ARTIFACT = "ai_query/summary.json"
_PROBE_TIMEOUT_S = 5.0
_KEYS = ("experiment", "run_id", "tracking_uri")
_METRIC_NAME = re.compile(r"[^A-Za-z0-9_\-. /]")


@dataclass(frozen=True)
class MlflowTarget:
    """Where a job's counters go: a new run in ``experiment`` (default: ``MLFLOW_EXPERIMENT_NAME`` /
    ``_ID``, else MLflow's default experiment), or the existing run ``run_id``; ``tracking_uri``
    defaults to ``MLFLOW_TRACKING_URI``."""

    run_id: str | None = None
    experiment: str | None = None
    tracking_uri: str | None = None

    @classmethod
    def from_spec(cls, raw: Any, where: str = "job spec") -> "MlflowTarget":
        """``[mlflow]`` of a job spec: ``experiment``, ``run_id``, ``tracking_uri`` (all optional)."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}: [mlflow] must be a table, e.g. [mlflow] experiment = \"nightly-jobs\"")
        unknown = sorted(set(raw) - set(_KEYS))
        if unknown:
            raise ConfigError(f"{where}: [mlflow] has unknown key(s) {', '.join(unknown)}; allowed are {', '.join(_KEYS)}")
        for key in _KEYS:
            if key in raw and (not isinstance(raw[key], str) or not raw[key]):
                raise ConfigError(f"{where}: mlflow.{key} must be a non-empty string, got {raw[key]!r}")
        return cls(run_id=raw.get("run_id"), experiment=raw.get("experiment"), tracking_uri=raw.get("tracking_uri"))


def job_metrics(result: Any) -> dict[str, float]:
    """The counters of a run (``JobRunReport`` or ``RunSummary``) as MLflow metrics."""
    seconds = float(result.seconds)
    out: dict[str, float] = {
        "rows": result.rows, "rows_ok": result.rows_ok, "rows_failed": result.rows_failed,
        "rows_deduplicated": result.rows_deduplicated,
        "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
        "total_tokens": result.total_tokens, "seconds": round(seconds, 3),
        "rows_per_s": result.rows / seconds if seconds > 0 else 0.0,
    }
    if result.cost_usd is not None:
        out["cost_usd"] = result.cost_usd
    per_endpoint: Mapping[str, Mapping[str, Any]] = getattr(result, "per_endpoint", {}) or {}
    if per_endpoint or not hasattr(result, "requests"):  # incremental runs: the run log's counters (usage table sums)
        totals = {"requests": 0, "attempts": 0}
        for name, e in sorted(per_endpoint.items()):
            counters = {"requests": int(e["rows"]), "attempts": int(e.get("attempts", e["rows"])), "tokens": int(e["tokens"])}
            counters["retries"] = counters["attempts"] - counters["requests"]
            if e.get("cost") is not None:
                counters["cost_usd"] = float(e["cost"])
            for status, count in sorted((e.get("by_status") or {}).items()):  # the last attempt's HTTP status
                counters[f"status_{_METRIC_NAME.sub('_', str(status))}"] = int(count)
            for counter, value in counters.items():
                out[f"endpoint.{_METRIC_NAME.sub('_', name)}.{counter}"] = value
            for counter in totals:
                totals[counter] += counters[counter]
        out.update(totals, retries=totals["attempts"] - totals["requests"])
    elif hasattr(result, "requests"):  # one-shot runs: counted from the output table's audit columns
        out.update(requests=result.requests, attempts=result.attempts, retries=result.attempts - result.requests)
    if getattr(result, "pending_after", None) is not None and hasattr(result, "pending_before"):
        out["rows_pending_after"] = result.pending_after
    return {k: float(v) for k, v in out.items()}


def job_params(spec: Any, result: Any) -> dict[str, str]:
    """What identifies the run: job, endpoints, served models, pending rows, output; secrets scrubbed."""
    from ai_query import EndpointRegistry

    from ._preflight import job_endpoints

    registry = EndpointRegistry.default(spec.endpoints)
    names = sorted(set(getattr(result, "per_endpoint", {}) or {}) | job_endpoints(spec))
    models = sorted({e.model_name for n in names if n in registry for e in registry.get(n).served_entities if e.model_name})
    params = {"job": spec.name, "endpoints": ",".join(names), "models": ",".join(models),
              "output_path": spec.output_path, "output_mode": spec.output_mode}
    if hasattr(result, "pending_before"):
        params.update(rows_pending=str(result.pending_before), aiq_run_id=result.run_id)
    return {k: redact(str(v))[:500] for k, v in params.items()}  # MLflow caps a param value at 6000 chars


def _shown_uri(uri: str) -> str:
    """A tracking URI without its user info (``https://user:token@host`` -> ``https://host``)."""
    return redact(re.sub(r"(?<=://)[^/@]*@", "", uri))


def _unreachable(uri: str) -> str | None:
    """Why an ``http(s)`` tracking server cannot be reached (one short probe), else None."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        urllib.request.urlopen(urllib.request.Request(uri.rstrip("/") + "/health"), timeout=_PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return None  # it answered: reachable (auth and paths are MLflow's business)
    except (OSError, ValueError) as exc:
        return f"no answer within {_PROBE_TIMEOUT_S:g} s ({getattr(exc, 'reason', exc)})"
    return None


class MlflowPush:
    """Pushes each job of one command to MLflow; after a failure it warns once and stops trying."""

    def __init__(self, target: MlflowTarget | None = None) -> None:
        self.target = target
        self.failed: str | None = None

    def push(self, spec: Any, result: Any, summary: Mapping[str, Any], fallback: MlflowTarget | None = None) -> str | None:
        """Log ``result`` into an MLflow run; the run id, or None (not configured, or it failed: warned).

        ``fallback`` (a spec's ``[mlflow]``) is used when this push was made without a target (the
        command line's ``--mlflow-run`` wins)."""
        target = self.target or fallback
        if target is None or self.failed is not None:
            return None
        uri = target.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
        try:
            why = _unreachable(uri)
            if why is None:
                return self._push(spec, result, summary, target, uri or None)
        except ImportError:
            why = "mlflow is not installed: pip install 'spark-ai-query[mlflow]' (or mlflow-skinny)"
        except Exception as exc:  # noqa: BLE001 - MLflow is a side channel: the job's rows are committed
            why = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
        self.failed = why
        log.warning("job %s: its counters were not pushed to MLflow (tracking URI %s): %s; the job's results and run "
                    "log are complete, and later jobs of this command are not pushed either. Check the tracking "
                    "server or MLFLOW_TRACKING_URI", spec.name, _shown_uri(uri) if uri else "(MLflow's default)", redact(why))
        return None

    def _push(self, spec: Any, result: Any, summary: Mapping[str, Any], target: MlflowTarget, uri: str | None) -> str:
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param

        client = MlflowClient(tracking_uri=uri)
        created = target.run_id is None
        if target.run_id is not None:
            run_id = client.get_run(target.run_id).info.run_id  # fails (and warns) for a run that does not exist
        else:
            run_id = client.create_run(self._experiment_id(client, target), run_name=f"ai-query {spec.name}",
                                       tags={"ai_query.job": spec.name}).info.run_id
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in job_metrics(result).items()],
                         params=[Param(k, v) for k, v in job_params(spec, result).items()])
        client.log_text(run_id, json.dumps(summary, indent=2, default=str), SUMMARY_ARTIFACT)
        if created:
            client.set_terminated(run_id, "FAILED" if getattr(result, "stopped", None) else "FINISHED")
        log.info("job %s: counters logged to MLflow run %s", spec.name, run_id)
        return run_id

    @staticmethod
    def _experiment_id(client: Any, target: MlflowTarget) -> str:
        name = target.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME")
        if name:
            found = client.get_experiment_by_name(name)
            return found.experiment_id if found is not None else client.create_experiment(name)
        return os.environ.get("MLFLOW_EXPERIMENT_ID") or "0"


__all__ = ["MlflowPush", "MlflowTarget", "SUMMARY_ARTIFACT", "job_metrics", "job_params"]
