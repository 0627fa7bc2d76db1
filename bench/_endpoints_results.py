"""Where ``endpoints.py`` writes its results: ``endpoints.json`` (records merged by scenario) and ``endpoints.md``."""

from __future__ import annotations

import json
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from _common import Record, goal_met, machine, markdown


def code_version() -> str:
    """The commit measured, and the project files that differed from it (others edit the tree while we run)."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    head = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    dirty = [line[3:] for line in git("status", "--porcelain", "--", "ai_query", "spark_udfs").splitlines() if line.strip()]
    return head + (f" + uncommitted changes to {', '.join(dirty)}" if dirty else "")


def write_results(out: Path, records: list[Record], details: dict[str, Any], command: str, wall: float, *, merge: bool,
                  scenarios: dict[str, Any], with_details: bool = False, code: str | None = None) -> None:
    """``endpoints.json`` (records, each with its run's date, machine, command and code) and ``endpoints.md``.

    With ``merge`` (some scenarios re-run) the other scenarios' records are kept as they were,
    with their own run's details, and the markdown lists every run the table draws on.
    """
    out.mkdir(parents=True, exist_ok=True)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = {"date": date, "machine": machine(), "command": command, "code": code or code_version(), "wall_s": round(wall)}
    json_path = out / "endpoints.json"
    rows: list[dict[str, Any]] = []
    if merge and json_path.exists():  # some scenarios re-run: keep the others' records
        rows = [d for d in json.loads(json_path.read_text()) if d["scenario"] not in details]
    setups = {name: {k: d[k] for k in ("rows", "sim", "client_config", "baseline_concurrency")} for name, d in details.items()}
    rows += [{**r.as_dict(), **meta, "setup": setups.get(r.scenario)} for r in records]
    for d in rows:  # records written before a goal was judged get judged now
        if d.get("goal") and d.get("met") is None:
            d["met"] = goal_met(d["value"], d["goal"])
    order = list(scenarios)
    rows.sort(key=lambda d: order.index(d["scenario"]))
    json_path.write_text(json.dumps(rows, indent=1) + "\n")

    table = [Record(**{k: v for k, v in d.items() if k in Record.__dataclass_fields__}) for d in rows]
    runs: dict[tuple, list[str]] = {}
    for d in rows:
        key = (d.get("date"), d.get("command"), d.get("code"), d.get("wall_s"))
        if d["scenario"] not in runs.setdefault(key, []):
            runs[key].append(d["scenario"])
    preamble = []
    if len(runs) > 1:
        preamble.append("- the table draws on several runs:")
        preamble += [f"  - {', '.join(names)}: {run_date}, `{run_command}`, code {run_code}"
                     for (run_date, run_command, run_code, _), names in runs.items()]
    if len(runs) == 1:
        preamble.append(f"- code measured: {rows[0].get('code')} (the Python workers import it once, at the first query)")
    preamble.append("- scenarios (each measured through Spark `local[2]` and beside a raw `openai.AsyncOpenAI` + `asyncio.Semaphore` "
                    "baseline, each on a fresh simulator with the same settings):")
    for sc in scenarios.values():
        first = next((d for d in rows if d["scenario"] == sc.name), None)
        if first is None:
            continue
        setup = first.get("setup") or {"rows": first.get("rows") or sc.rows, "sim": sc.sim, "client_config": sc.client,
                                        "baseline_concurrency": sc.baseline_concurrency}
        preamble.append(f"  - `{sc.name}`: {sc.summary}; {setup['rows']:,} rows; simulator `{json.dumps(setup['sim'])}`; "
                        f"our client_config `{json.dumps(setup['client_config'])}`; baseline semaphore {setup['baseline_concurrency']}")
    latest = max(rows, key=lambda d: d.get("date") or "")
    date, command, wall = latest.get("date", date), latest.get("command", command), latest.get("wall_s", wall)
    (out / "endpoints.md").write_text(markdown(table, date=date, command=command, machine_line=meta["machine"], wall_s=wall,
                                               preamble=preamble))
    if with_details:
        (out / "endpoints.details.json").write_text(json.dumps(details, indent=1, default=str) + "\n")
