"""Batch jobs over Delta tables: job specs, the runner and the ``ai-query`` CLI."""

from ._runner import RunSummary, explain_error, flatten_audit, run_job
from ._sample import sample_reviews, write_sample_reviews
from ._spec import JobSpec

__all__ = ["JobSpec", "RunSummary", "explain_error", "flatten_audit", "run_job", "sample_reviews", "write_sample_reviews"]
