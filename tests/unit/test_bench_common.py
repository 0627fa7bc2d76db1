"""The benchmarks' pure logic (bench/_common.py, bench/vllm_pool.py's records): the alternating schedule, the median of runs,
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


def _run(elapsed: float, rows: int = 100, tokens: int = 3000, others: float = 0.0, **extra) -> dict:
    return {"elapsed_s": elapsed, "rows": rows, "ok": rows, "completion_tokens": tokens, "startup_s": 5.0, "others": others,
            "texts": ["a"] * rows, **extra}


def test_vllm_pool_records_are_medians_of_alternating_runs_with_round_by_round_ratios():
    """bench/vllm_pool.py's records from two runs per mode. Mutations caught: the ratio of the first
    runs instead of the medians; per-round ratios paired wrongly; tokens/s missing beside rows/s;
    the prefix ratio inverted (ungrouped over grouped)."""
    import argparse

    from vllm_pool import build_records

    args = argparse.Namespace(rows=100, max_tokens=32, dtype="bfloat16", replicas=2, server_replicas=1, prefix_docs=64,
                              prefix_questions=3, kv_blocks=64)
    results = {"raw": [_run(10.0), _run(5.0, others=0.4)], "offline": [_run(12.5), _run(5.0)], "pool": []}
    prefix = {"startup_s": 9.0, "runs": [_run(20.0, 192, 700, prompt_tokens=192 * 330, arm="ungrouped", run=0, layout="prefix"),
                                        _run(10.0, 192, 700, prompt_tokens=192 * 330, arm="grouped", run=0, layout="prefix"),
                                        _run(20.0, 192, 700, prompt_tokens=192 * 330, arm="ungrouped", run=0, layout="random"),
                                        _run(16.0, 192, 700, prompt_tokens=192 * 330, arm="grouped", run=0, layout="random"),
                                        _run(30.0, 192, 700, prompt_tokens=192 * 330, arm="ungrouped", run=1, layout="prefix"),
                                        _run(15.0, 192, 700, prompt_tokens=192 * 330, arm="grouped", run=1, layout="prefix"),
                                        _run(30.0, 192, 700, prompt_tokens=192 * 330, arm="ungrouped", run=1, layout="random"),
                                        _run(24.0, 192, 700, prompt_tokens=192 * 330, arm="grouped", run=1, layout="random")]}
    records = {(r.scenario, r.metric): r for r in build_records(results, prefix, args)}
    raw = records[("raw_vllm", "rows_per_s")]
    assert raw.value == 15.0 and raw.values == [10.0, 20.0] and raw.others_cores == [0.0, 0.4]
    assert "run 2 above 0.25" in raw.notes
    assert records[("raw_vllm", "completion_tokens_per_s")].values == [300.0, 600.0]
    over = records[("offline_sql", "over_raw_vllm")]
    assert over.value == round(14.0 / 15.0, 3) and over.values == [0.8, 1.0] and over.met is True
    assert not any(scenario == "server_pool_sql" for scenario, _ in records)
    prefix_ratio = records[("shared_prefix_offline", "grouped_over_ungrouped")]
    assert prefix_ratio.value == round(((19.2 + 12.8) / 2) / ((9.6 + 6.4) / 2), 3) and prefix_ratio.values == [2.0, 2.0]
    assert prefix_ratio.met is True and "no cache pressure" not in prefix_ratio.notes
    assert prefix_ratio.goal == ">= 1.3" and "repartitionByRange" in prefix_ratio.notes
    # the layout without the recipe: its own scenario, the same arithmetic, no goal
    random = records[("shared_prefix_offline_random_partitions", "grouped_over_ungrouped")]
    assert random.value == 1.25 and random.values == [1.25, 1.25] and random.goal is None and random.met is None
