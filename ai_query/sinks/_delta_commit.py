"""One Delta committer: every idempotent write of the project goes through it.

A Delta app transaction (``app_id``, ``version``) recorded in the same commit as the data makes a
write idempotent: a writer that tries again (a job re-run after a kill, a serving flush whose
reply from the store was lost, a Spark write retried) asks the table which version of its
``app_id`` landed and skips what is already there. Usage tables, batch-job outputs and the Spark
data source's driver commit share this one rule and one answer for what happened:

* ``COMMITTED``: a new table version holds the data and the transaction;
* ``ALREADY_COMMITTED``: the table records ``app_id`` at ``version`` or later, so nothing was
  written (an older version counts as committed: a writer's versions only move forward);
* ``NOTHING_TO_COMMIT``: no change to the table and no transaction to record, so no new version.
  With a transaction an empty write still commits: the version is recorded, in order.

:meth:`DeltaCommitter.committed_version` answers ``None`` when ``app_id`` has no transaction in
the table (or there is no table yet); ``0`` is a real version. Worked example::

    committer = DeltaCommitter("/data/usage")
    txn = AppTransaction("job-42", 7)
    committer.append(rows, txn)    # CommitResult.COMMITTED
    committer.append(rows, txn)    # CommitResult.ALREADY_COMMITTED: the log has one version

The check reads the table before the commit, so two writers racing with one transaction could
both commit; the callers here never run one transaction from two places at once (a job holds its
chunk versions, a serving process its own app id). deltalake is imported inside the methods, so
``import ai_query`` stays light.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._errors import AIQueryError, DeltaCommitError
from .._logging import get_logger
from .. import storage

log = get_logger("ai_query.sinks")

if TYPE_CHECKING:
    import pyarrow as pa


class CommitResult(enum.Enum):
    """What a commit call did to the table."""

    COMMITTED = "committed"
    ALREADY_COMMITTED = "already committed"
    NOTHING_TO_COMMIT = "nothing to commit"


@dataclass(frozen=True)
class AppTransaction:
    """A Delta app transaction: ``app_id`` (a job, a serving process) at ``version`` (a chunk, a batch)."""

    app_id: str
    version: int

    def __post_init__(self) -> None:
        if not isinstance(self.app_id, str) or not self.app_id.strip():
            raise DeltaCommitError(f"an app transaction needs a non-empty app_id, e.g. the job's id; got {self.app_id!r}")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 0:
            raise DeltaCommitError(f"an app transaction's version must be an integer >= 0, got {self.version!r}")


def columns_to_add(table: Any, columns: Sequence[str], allowed: Collection[str], path: str = "") -> list[str]:
    """The ``columns`` the Delta ``table`` lacks, when each is one of ``allowed`` (else none):
    columns a newer version of the writer added (an audit column), which a table written by an
    older one gains in its next commit, NULL in its older rows. Logged when there are some."""
    have = {field.name for field in table.schema().fields}
    missing = [name for name in columns if name not in have]
    if not missing or any(name not in allowed for name in missing):
        return []
    log.info("adding column(s) %s to the Delta table %s (written by an earlier version; its earlier rows read NULL)",
             ", ".join(missing), path or "")
    return missing


class DeltaCommitter:
    """Commits to the Delta table at ``path`` at most once per app transaction."""

    def __init__(self, path: str) -> None:
        self.path = path

    def exists(self) -> bool:
        return storage.is_delta_table(self.path)

    def committed_version(self, app_id: str) -> int | None:
        """The highest version of ``app_id`` the table records (``None``: none, or no table)."""
        if not self.exists():
            return None
        version = storage.delta_transaction_version(self.path, app_id)
        return None if version is None else int(version)

    def is_committed(self, txn: AppTransaction) -> bool:
        """Whether ``txn`` (or a later version of its app id) is in the table."""
        done = self.committed_version(txn.app_id)
        return done is not None and done >= txn.version

    def commit_once(
        self,
        txn: AppTransaction | None,
        write: Callable[[Any], object],
        *,
        changes: bool = True,
        check_committed: bool = True,
        custom_metadata: dict[str, str] | None = None,
    ) -> CommitResult:
        """Run ``write(commit_properties)`` unless ``txn`` already landed or there is nothing to commit.

        ``write`` makes the one Delta commit with the properties it is given (they carry ``txn``).
        ``changes`` says whether the commit would change the table's data or schema; without
        changes and without a transaction there is nothing to commit. ``check_committed=False``
        skips the table read when the caller knows ``txn`` was never tried before.
        """
        from deltalake import CommitProperties, Transaction

        if txn is not None and check_committed and self.is_committed(txn):
            return CommitResult.ALREADY_COMMITTED
        if not changes and txn is None:
            return CommitResult.NOTHING_TO_COMMIT
        txns = [Transaction(app_id=txn.app_id, version=txn.version)] if txn is not None else None
        props = CommitProperties(app_transactions=txns, custom_metadata=custom_metadata)
        try:
            write(props)
        except AIQueryError:
            raise
        except Exception as exc:
            if txn is not None:
                where = f" (app transaction {txn.app_id!r} version {txn.version})"
                fix = "retry it: if this commit landed after all, the retry finds the transaction and skips it"
            else:
                where = ""
                fix = "check the table's history before retrying: without an app transaction a retry may write twice"
            raise DeltaCommitError(f"the Delta commit to {self.path}{where} failed: {exc}; {fix}") from exc
        return CommitResult.COMMITTED

    def _adds_columns(self, target: Any, data: "pa.Table", add_columns: Collection[str]) -> bool:
        """Whether this commit adds columns to the table: ``data`` has columns the table lacks and
        each is one of ``add_columns`` (columns a newer version of the writer added, e.g. an audit
        column, which a table written by an older one gains, NULL in its older rows). Other
        differences are left to delta-rs, as before (an append refuses them)."""
        if not add_columns:
            return False
        table = target if not isinstance(target, str) else storage.delta_table(self.path) if self.exists() else None
        return table is not None and bool(columns_to_add(table, data.column_names, add_columns, self.path))

    def append(self, data: "pa.Table", txn: AppTransaction | None = None, *,
               check_committed: bool = True, add_columns: Collection[str] = ()) -> CommitResult:
        """Append ``data`` (the first write creates the table) in one commit recording ``txn``.

        ``add_columns``: columns of ``data`` the table may gain in this commit if it lacks them."""
        from deltalake import write_deltalake

        def write(props: Any) -> None:
            target = storage.delta_write_target(self.path)
            evolve = self._adds_columns(target, data, add_columns)
            write_deltalake(target, data, mode="append", commit_properties=props, schema_mode="merge" if evolve else None,
                            post_commithook_properties=_hooks(target), storage_options=storage.delta_options(self.path))

        return self.commit_once(txn, write, changes=data.num_rows > 0, check_committed=check_committed)

    def merge(self, data: "pa.Table", keys: Sequence[str], txn: AppTransaction | None = None, *,
              check_committed: bool = True, add_columns: Collection[str] = ()) -> CommitResult:
        """Upsert ``data`` by ``keys`` (matched rows updated, others inserted) in one commit recording ``txn``.

        The first write creates the table with an append: there is nothing to match yet.
        ``add_columns``: columns of ``data`` the table may gain in this commit if it lacks them
        (a merge without them would drop such a column's values without a word).
        """
        if not keys:
            raise DeltaCommitError(f"a merge into {self.path} needs key columns to match rows on; pass keys=[...]")

        def write(props: Any) -> None:
            from deltalake import write_deltalake

            if not self.exists():
                write_deltalake(self.path, data, mode="append", commit_properties=props,
                                storage_options=storage.delta_options(self.path))
                return
            predicate = " AND ".join([*_key_range(data, keys[0]), *(f"t.`{k}` = s.`{k}`" for k in keys)])
            target = storage.delta_write_target(self.path)
            table = storage.delta_table(self.path) if isinstance(target, str) else target
            (table
             .merge(data, predicate, source_alias="s", target_alias="t", commit_properties=props,
                    merge_schema=self._adds_columns(table, data, add_columns), post_commithook_properties=_hooks(target))
             .when_matched_update_all().when_not_matched_insert_all().execute())

        return self.commit_once(txn, write, changes=data.num_rows > 0, check_committed=check_committed)


def _hooks(target: Any) -> Any:
    """The post-commit hooks of a commit through ``target`` (a kept handle, or a path: the defaults).

    delta-rs lists the whole ``_delta_log`` after every commit to clean up expired log files,
    which only a new checkpoint can make expired (the files before it, past the retention).
    With a kept handle the next version is known: the cleanup runs with the commit that writes
    a checkpoint (every ``delta.checkpointInterval`` versions, 100 by default), as Delta on
    Spark does, and the other commits skip that request (a LIST of the whole log, each chunk).
    """
    from deltalake import PostCommitHookProperties

    if isinstance(target, str):
        return None
    interval = int(target.metadata().configuration.get("delta.checkpointInterval") or 100)
    version = target.version() + 1  # the one this commit makes (unless another writer took it)
    if version % interval in (0, interval - 1):  # delta-rs 1.x checkpoints at (version + 1) % interval == 0
        return None  # the defaults: checkpoint, then clean up as the table's configuration says
    return PostCommitHookProperties(create_checkpoint=True, cleanup_expired_logs=False)


def _key_range(data: "pa.Table", key: str) -> list[str]:
    """``t.key >= lo``, ``t.key <= hi``: the range of ``key`` in ``data``, for a merge's predicate.

    A target row that matches a source row has its key in the source's range, so the bounds
    change no match; they let delta-rs skip every target file whose statistics lie outside it.
    Without them a merge reads the whole table (a job merging chunk after chunk read every
    earlier chunk's files again: quadratic, and on an object store a GET each). Integer and
    plain string keys only (their literals are exact); other types merge without bounds.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    column = data.column(key)
    if data.num_rows == 0 or not (pa.types.is_integer(column.type) or pa.types.is_string(column.type)
                                  or pa.types.is_large_string(column.type)):
        return []
    bounds = pc.min_max(column).as_py()
    lo, hi = bounds["min"], bounds["max"]
    if lo is None:
        return []
    if isinstance(lo, str):
        if any(not c.isprintable() or c == "\\" for c in lo + hi):
            return []
        lo, hi = ("'" + v.replace("'", "''") + "'" for v in (lo, hi))
    return [f"t.`{key}` >= {lo}", f"t.`{key}` <= {hi}"]


__all__ = ["AppTransaction", "CommitResult", "DeltaCommitter"]
