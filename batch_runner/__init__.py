"""Batch jobs over Delta tables: job specs, incremental runs, plans, status, schedules and the
``ai-query run / plan / status / schedule`` commands (``batch_runner.cli``).

The names below load on first use: ``ai-query --help`` imports ``batch_runner.cli``, and the job
modules import Spark, which a help text must not wait for.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_HOMES = {
    "Cron": "._cron",
    "CronError": "._cron",
    "JobPlan": "._plan",
    "JobRunningError": "._job_lock",
    "JobRunReport": "._job_state",
    "JobSpec": "._spec",
    "JobStatus": "._job_state",
    "RunSummary": "._runner",
    "explain_error": "._runner",
    "flatten_audit": "._runner",
    "job_status": "._job_state",
    "plan_job": "._plan",
    "run_incremental": "._jobs",
    "run_job": "._runner",
    "sample_reviews": "._sample",
    "use_storage_options": "._preflight",
    "write_sample_reviews": "._sample",
}

__all__ = sorted(_HOMES)

if TYPE_CHECKING:
    from ._cron import Cron, CronError
    from ._job_state import JobRunReport, JobStatus, job_status
    from ._job_lock import JobRunningError
    from ._jobs import run_incremental
    from ._plan import JobPlan, plan_job
    from ._runner import RunSummary, explain_error, flatten_audit, run_job
    from ._sample import sample_reviews, write_sample_reviews
    from ._spec import JobSpec
    from ._preflight import use_storage_options


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(home, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
