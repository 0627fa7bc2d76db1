"""A merge's key range: the bounds change no match, and delta-rs skips the files outside them."""

from __future__ import annotations

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from ai_query.sinks import AppTransaction, DeltaCommitter
from ai_query.sinks._delta_commit import _key_range


def _merge_metrics(path) -> dict:
    return DeltaTable(str(path)).history(1)[0]["operationMetrics"]


def test_a_merge_reads_only_the_files_whose_key_range_it_touches(tmp_path):
    path = tmp_path / "out"
    committer = DeltaCommitter(str(path))
    for chunk in range(6):  # six chunks of keys 100 apart: six files with disjoint id ranges
        committer.merge(pa.table({"id": list(range(chunk * 100, chunk * 100 + 100)), "v": ["a"] * 100}), ["id"],
                        AppTransaction("job", chunk + 1))
    metrics = _merge_metrics(path)
    assert metrics["num_target_files_scanned"] == 0 and metrics["num_target_files_skipped_during_scan"] == 5
    # a merge whose range reaches into one earlier file: that file is read, its rows updated
    committer.merge(pa.table({"id": [250, 600], "v": ["b", "b"]}), ["id"], AppTransaction("job", 7))
    rows = {r["id"]: r["v"] for r in DeltaTable(str(path)).to_pyarrow_table().to_pylist()}
    assert len(rows) == 601 and rows[250] == "b" and rows[600] == "b" and rows[249] == "a"
    assert DeltaTable(str(path)).to_pyarrow_table().num_rows == 601  # updated, not duplicated
    assert _merge_metrics(path)["num_target_files_skipped_during_scan"] >= 2


@pytest.mark.parametrize("keys", [["it's", "b\"q", "ünï", "a b"], ["x", "y"]])
def test_string_keys_with_quotes_and_unicode_match_exactly(tmp_path, keys):
    path = tmp_path / "out"
    committer = DeltaCommitter(str(path))
    committer.merge(pa.table({"k": keys, "n": [1] * len(keys)}), ["k"])
    committer.merge(pa.table({"k": keys, "n": [2] * len(keys)}), ["k"])
    rows = DeltaTable(str(path)).to_pyarrow_table().to_pylist()
    assert sorted((r["k"], r["n"]) for r in rows) == sorted((k, 2) for k in keys)


def test_the_range_is_of_the_first_key_and_only_for_exact_literals():
    assert _key_range(pa.table({"a": [3, 1, 2], "b": ["x", "y", "z"]}), "a") == ["t.`a` >= 1", "t.`a` <= 3"]
    assert _key_range(pa.table({"a": ["o'k", "b"]}), "a") == ["t.`a` >= 'b'", "t.`a` <= 'o''k'"]
    assert _key_range(pa.table({"a": [1.5, 2.5]}), "a") == []  # floats: no exact literal, no bounds
    assert _key_range(pa.table({"a": ["a\\b", "c"]}), "a") == []  # a backslash: no bounds
    assert _key_range(pa.table({"a": pa.array([None, None], pa.int64())}), "a") == []
    assert _key_range(pa.table({"a": pa.array([], pa.int64())}), "a") == []


def test_a_multi_column_key_merges_by_all_columns(tmp_path):
    path = tmp_path / "out"
    committer = DeltaCommitter(str(path))
    committer.merge(pa.table({"a": [1, 1, 2], "b": ["x", "y", "x"], "n": [1, 1, 1]}), ["a", "b"])
    committer.merge(pa.table({"a": [1, 3], "b": ["y", "x"], "n": [2, 2]}), ["a", "b"])
    rows = sorted((r["a"], r["b"], r["n"]) for r in DeltaTable(str(path)).to_pyarrow_table().to_pylist())
    assert rows == [(1, "x", 1), (1, "y", 2), (2, "x", 1), (3, "x", 2)]
