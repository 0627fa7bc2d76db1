"""The one Delta committer, on real tables in tmp_path, asserted by reading the real ``_delta_log``."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from ai_query import AIQueryError, DeltaCommitError
from ai_query.sinks import AppTransaction, CommitResult, DeltaCommitter


def _log_versions(path: Path) -> list[int]:
    log = path / "_delta_log"
    return sorted(int(p.stem) for p in log.glob("*.json")) if log.is_dir() else []


def _actions(path: Path, version: int) -> list[dict]:
    text = (path / "_delta_log" / f"{version:020d}.json").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _txns(path: Path, version: int) -> list[tuple[str, int]]:
    return [(a["txn"]["appId"], a["txn"]["version"]) for a in _actions(path, version) if "txn" in a]


def _rows(ids: list[int], answer: str = "a") -> pa.Table:
    return pa.table({"id": pa.array(ids, pa.int64()), "answer": [f"{answer}{i}" for i in ids]})


def test_the_same_app_transaction_commits_once(tmp_path):
    path = tmp_path / "t"
    committer = DeltaCommitter(str(path))
    assert committer.committed_version("job") is None  # no table yet

    assert committer.append(_rows([1, 2]), AppTransaction("job", 0)) is CommitResult.COMMITTED
    assert committer.append(_rows([1, 2]), AppTransaction("job", 0)) is CommitResult.ALREADY_COMMITTED
    assert _log_versions(path) == [0]
    assert _txns(path, 0) == [("job", 0)]
    assert committer.committed_version("job") == 0  # 0 is a real version, not "none"
    assert committer.committed_version("other") is None

    assert committer.append(_rows([3]), AppTransaction("job", 2)) is CommitResult.COMMITTED
    assert committer.append(_rows([9]), AppTransaction("job", 1)) is CommitResult.ALREADY_COMMITTED  # older: done
    assert _log_versions(path) == [0, 1] and _txns(path, 1) == [("job", 2)]
    assert sorted(DeltaTable(str(path)).to_pyarrow_table().column("id").to_pylist()) == [1, 2, 3]


def test_nothing_to_commit_makes_no_version_but_a_transaction_is_recorded(tmp_path):
    path = tmp_path / "t"
    committer = DeltaCommitter(str(path))
    assert committer.append(_rows([])) is CommitResult.NOTHING_TO_COMMIT
    assert _log_versions(path) == [] and not committer.exists()

    assert committer.append(_rows([1])) is CommitResult.COMMITTED
    assert committer.append(_rows([])) is CommitResult.NOTHING_TO_COMMIT
    assert _log_versions(path) == [0]

    assert committer.append(_rows([]), AppTransaction("job", 5)) is CommitResult.COMMITTED
    assert _log_versions(path) == [0, 1]
    assert _txns(path, 1) == [("job", 5)] and not [a for a in _actions(path, 1) if "add" in a]
    assert committer.merge(_rows([]), ["id"]) is CommitResult.NOTHING_TO_COMMIT
    assert _log_versions(path) == [0, 1]


def test_merge_updates_matched_keys_inserts_new_ones_and_commits_once(tmp_path):
    path = tmp_path / "t"
    committer = DeltaCommitter(str(path))
    assert committer.merge(_rows([1, 2]), ["id"], AppTransaction("job", 1)) is CommitResult.COMMITTED  # creates
    assert committer.merge(_rows([2, 3], "b"), ["id"], AppTransaction("job", 2)) is CommitResult.COMMITTED
    assert committer.merge(_rows([2, 3], "c"), ["id"], AppTransaction("job", 2)) is CommitResult.ALREADY_COMMITTED

    assert _log_versions(path) == [0, 1]
    assert _txns(path, 1) == [("job", 2)]
    assert DeltaTable(str(path)).history(1)[0]["operation"] == "MERGE"
    got = sorted(DeltaTable(str(path)).to_pyarrow_table().to_pylist(), key=lambda r: r["id"])
    assert got == [{"id": 1, "answer": "a1"}, {"id": 2, "answer": "b2"}, {"id": 3, "answer": "b3"}]
    with pytest.raises(DeltaCommitError, match="needs key columns"):
        committer.merge(_rows([4]), [])


def test_check_committed_false_trusts_the_caller(tmp_path):
    """The caller knows the transaction was never tried: no table read, the commit just happens."""
    path = tmp_path / "t"
    committer = DeltaCommitter(str(path))
    committer.append(_rows([1]), AppTransaction("srv", 0))
    assert committer.append(_rows([2]), AppTransaction("srv", 0), check_committed=False) is CommitResult.COMMITTED
    assert _log_versions(path) == [0, 1]


def test_a_failed_commit_is_a_typed_error_naming_the_table_the_transaction_and_the_fix(tmp_path):
    path = tmp_path / "t"
    committer = DeltaCommitter(str(path))
    committer.append(_rows([1]))
    wrong = pa.table({"id": pa.array(["not a number"]), "answer": ["x"]})
    with pytest.raises(DeltaCommitError) as caught:
        committer.append(wrong, AppTransaction("job", 3))
    message = str(caught.value)
    assert str(path) in message and "'job' version 3" in message and "retry it" in message
    assert isinstance(caught.value, AIQueryError) and caught.value.__cause__ is not None
    assert _log_versions(path) == [0] and committer.committed_version("job") is None


@pytest.mark.parametrize(("app_id", "version", "text"), [("", 1, "non-empty app_id"), ("job", -1, ">= 0"),
                                                          ("job", True, ">= 0"), ("job", "7", ">= 0")])
def test_app_transactions_are_checked_at_construction(app_id, version, text):
    with pytest.raises(DeltaCommitError, match=text):
        AppTransaction(app_id, version)


def test_a_table_written_before_a_column_was_added_gains_it_and_only_that_column(tmp_path):
    # mutations caught: add_columns ignored (the append is refused; the merge drops the column's
    # values without a word, which is what delta-rs does without merge_schema); any new column added
    code = pa.array([200], pa.int32())
    appended, merged = DeltaCommitter(str(tmp_path / "a")), DeltaCommitter(str(tmp_path / "m"))
    for committer in (appended, merged):
        committer.append(_rows([1, 2]), AppTransaction("job", 0))  # as an earlier version wrote it
    newer = _rows([3]).append_column("aiq_status_code", code)
    assert appended.append(newer, AppTransaction("job", 1), add_columns={"aiq_status_code"}) is CommitResult.COMMITTED
    assert merged.merge(newer, ["id"], AppTransaction("job", 1), add_columns={"aiq_status_code"}) is CommitResult.COMMITTED
    update = _rows([1], "b").append_column("aiq_status_code", pa.array([400], pa.int32()))
    assert merged.merge(update, ["id"], AppTransaction("job", 2), add_columns={"aiq_status_code"}) is CommitResult.COMMITTED
    for committer, codes in ((appended, [None, None, 200]), (merged, [400, None, 200])):
        table = DeltaTable(committer.path).to_pyarrow_table().sort_by("id")
        assert table.column("aiq_status_code").to_pylist() == codes and table.column("id").to_pylist() == [1, 2, 3]
    other = _rows([4]).append_column("surprise", pa.array(["x"]))
    with pytest.raises(DeltaCommitError, match="surprise|fields"):
        appended.append(other, AppTransaction("job", 3), add_columns={"aiq_status_code"})
    assert "surprise" not in DeltaTable(appended.path).to_pyarrow_table().column_names
