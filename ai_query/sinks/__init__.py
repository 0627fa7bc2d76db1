"""[5 write] Where results land: usage and payload records, and the one Delta committer.

Every idempotent Delta write (usage tables, batch-job outputs, the Spark data source's driver
commit) goes through :class:`DeltaCommitter`, so "already committed" and "nothing to commit" mean
the same everywhere (:class:`CommitResult`).
"""

from ._delta_commit import AppTransaction, CommitResult, DeltaCommitter
from ._usage_records import INFERENCE_SCHEMA, USAGE_SCHEMA, DeltaAppender, inference_record, usage_record

__all__ = [
    "AppTransaction", "CommitResult", "DeltaAppender", "DeltaCommitter", "INFERENCE_SCHEMA", "USAGE_SCHEMA",
    "inference_record", "usage_record",
]
