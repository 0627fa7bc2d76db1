"""The benchmarks' pure helpers (bench/_common.py): the alternating schedule, the median of runs,
the load note and the optional table columns. Benchmarks themselves are never run by tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from _common import Record, alternating, load_note, markdown, median  # noqa: E402


def test_alternating_runs_round_by_round():
    """Mutation caught: the loops swapped (a, a, b, b: all runs of one phase back to back)."""
    assert alternating(["raw", "offline", "server"], 2) == [
        ("raw", 0), ("offline", 0), ("server", 0), ("raw", 1), ("offline", 1), ("server", 1)]
    with pytest.raises(ValueError, match="runs=0 must be >= 1"):
        alternating(["raw"], 0)


def test_median_of_two_runs_is_their_mean_and_of_three_the_middle():
    """Mutation caught: the first (or the best) run reported instead of the median."""
    assert median([3.0, 1.0]) == 2.0
    assert median([5.0, 1.0, 2.0]) == 2.0
    with pytest.raises(ValueError, match="at least once"):
        median([])


def test_load_note_flags_the_runs_above_the_threshold():
    """Mutation caught: comparing with >= 0.25 the wrong way round (the quiet run flagged)."""
    assert load_note([0.03, 0.1]) == "others' CPU 0.03, 0.10 cores"
    assert load_note([0.03, 0.41]) == "others' CPU 0.03, 0.41 cores (run 2 above 0.25: not quiet)"


def test_markdown_adds_runs_and_load_columns_only_when_a_record_has_them():
    """Mutation caught: the columns always added (the endpoint results' table changes shape), or
    the values of the runs left out of their column."""
    plain = markdown([Record("s", "m", 1.0, "x")], date="d", command="c", machine_line="m", wall_s=1)
    assert "runs" not in plain and "others' CPU" not in plain
    rich = markdown([Record("s", "m", 2.0, "rows/s", values=[1.5, 2.5], others_cores=[0.01, 0.3]), Record("s", "n", 1.0, "x")],
                    date="d", command="c", machine_line="m", wall_s=1)
    header, rule, first, second = rich.splitlines()[-4:]
    assert header.count("|") == rule.count("|") == first.count("|") == second.count("|")
    assert "| 1.500, 2.500 | 0.01, 0.30 |" in first
