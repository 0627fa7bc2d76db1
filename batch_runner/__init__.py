"""Batch jobs over Delta tables: job specs, incremental runs, plans, status, schedules and the ``ai-query`` CLI."""

from ._cron import Cron, CronError
from ._job_state import JobRunReport, JobStatus, job_status
from ._jobs import run_incremental
from ._plan import JobPlan, plan_job
from ._runner import RunSummary, explain_error, flatten_audit, run_job
from ._sample import sample_reviews, write_sample_reviews
from ._spec import JobSpec

__all__ = [
    "Cron",
    "CronError",
    "JobPlan",
    "JobRunReport",
    "JobSpec",
    "JobStatus",
    "RunSummary",
    "explain_error",
    "flatten_audit",
    "job_status",
    "plan_job",
    "run_incremental",
    "run_job",
    "sample_reviews",
    "write_sample_reviews",
]
