"""Helpers of the endpoint benchmark: prompts, the simulator sampler, process CPU, the baseline, results.

Nothing here imports pyspark, so ``python bench/endpoints.py --baseline-json ...`` (the baseline
child process) starts fast and pays nothing for Spark.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

FILLER = ("the parcel came on time and the blender works well but the lid is loose and the manual "
          "is short so I would buy it again for the price").split()


def prompts(rows: int, words: tuple[int, int] = (6, 6)) -> list[str]:
    """Deterministic prompts; the i-th has ``words[0] .. words[1]`` filler words (so token counts vary)."""
    low, high = words
    span = high - low + 1
    out = []
    for i in range(rows):
        n = low + (i * 7919) % span
        body = " ".join(FILLER[(i + k) % len(FILLER)] for k in range(n))
        out.append(f"Classify review {i}: {body}")
    return out


# -- the simulator over time -------------------------------------------------------------------


@dataclass
class Sample:
    t: float
    requests: int
    ok: int
    rate_limited: int
    in_flight: int
    admitted: int


class SimSampler:
    """Reads a simulator's counters every ``interval`` seconds on a thread, from ``start()`` to ``stop()``.

    ``t`` is seconds since ``start()``. The counters are read on the simulator's own loop
    (``snapshot()``), so every sample is consistent.
    """

    def __init__(self, sim: Any, interval: float = 0.25) -> None:
        self.sim = sim
        self.interval = interval
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.t0 = 0.0

    def _take(self) -> None:
        s = self.sim.snapshot()
        self.samples.append(Sample(time.monotonic() - self.t0, s["requests"], s["ok"], s["rate_limited"],
                                   s["in_flight"], s["admitted"]))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._take()

    def start(self) -> "SimSampler":
        self.t0 = time.monotonic()
        self._take()
        self._thread = threading.Thread(target=self._run, name="sim-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._take()

    def at(self, t: float) -> Sample:
        """The last sample taken at or before ``t``."""
        best = self.samples[0]
        for s in self.samples:
            if s.t <= t:
                best = s
        return best

    def after(self, t: float, until: float | None = None) -> dict[str, float]:
        """Counts between ``t`` and ``until`` (default: the end): requests, 429s, ok, and the mean in flight."""
        first, last = self.at(t), (self.samples[-1] if until is None else self.at(until))
        inside = [s.in_flight for s in self.samples if first.t <= s.t <= last.t]
        requests = last.requests - first.requests
        limited = last.rate_limited - first.rate_limited
        return {
            "requests": requests,
            "rate_limited": limited,
            "share_429": limited / requests if requests else 0.0,
            "ok": last.ok - first.ok,
            "seconds": last.t - first.t,
            "mean_in_flight": sum(inside) / len(inside) if inside else 0.0,
        }

    def series(self, step: float = 1.0) -> list[tuple[float, int, float]]:
        """(t, in flight at the server, ok/s over the step) at about every ``step`` seconds."""
        out, last = [], None
        for s in self.samples:
            if last is None or s.t - last.t >= step - 1e-6:
                rate = 0.0 if last is None else (s.ok - last.ok) / (s.t - last.t)
                out.append((round(s.t, 2), s.in_flight, round(rate, 1)))
                last = s
        return out


# -- CPU of processes --------------------------------------------------------------------------


def _cpu(proc: Any) -> float:
    try:
        t = proc.cpu_times()
        return t.user + t.system
    except Exception:  # noqa: BLE001 - a process may exit between listing and reading
        return 0.0


class SparkCpu:
    """CPU seconds of the processes of a local Spark: the Python workers, the JVM, and this driver.

    In ``local[N]`` the driver (this process) starts the JVM, which starts ``pyspark.daemon``; the
    daemon forks the Python workers that run the UDF (kept alive between tasks with
    ``spark.python.worker.reuse``). psutil reads each process's user + system time from /proc;
    the deltas around a query are its cost. A worker that exits during the query loses its
    time from the count (none did in our runs: the count of workers is reported).
    """

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self.me = psutil.Process()

    def processes(self) -> tuple[list[Any], list[Any]]:
        """(the JVM's Python descendants: pyspark.daemon and its workers; the JVM processes)."""
        jvms, workers = [], []
        for p in self.me.children():
            try:
                if "java" in p.name():
                    jvms.append(p)
                    workers += [w for w in p.children(recursive=True) if "python" in w.name()]
            except Exception:  # noqa: BLE001 - a process may exit while we look
                continue
        return workers, jvms

    def read(self) -> dict[str, Any]:
        workers, jvms = self.processes()
        return {
            "workers": {p.pid: _cpu(p) for p in workers},
            "jvm": sum(_cpu(p) for p in jvms),
            "driver": _cpu(self.me),
        }

    @staticmethod
    def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
        workers = sum(cpu - before["workers"].get(pid, 0.0) for pid, cpu in after["workers"].items())
        return {
            "workers_cpu_s": workers,
            "worker_processes": len(after["workers"]),
            "jvm_cpu_s": after["jvm"] - before["jvm"],
            "driver_cpu_s": after["driver"] - before["driver"],
        }


class BackgroundLoad:
    """CPU used on this machine by processes that are not ours, in cores, between ``start()`` and ``stop()``.

    The machine is shared (other sessions run test suites), and on 2 cores a busy neighbour halves a
    result: every scenario reports this so a reader can tell a measurement from an accident.
    Ours = this process, its live descendants (the JVM, the Python workers) and reaped children
    (the baseline process, via ``RUSAGE_CHILDREN``).
    """

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self.me = psutil.Process()

    def _busy(self) -> float:
        t = self._psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)

    def _ours(self) -> tuple[float, dict[int, float]]:
        """(this process + its reaped children, {pid: CPU} of its live descendants)."""
        import resource

        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        live = {p.pid: _cpu(p) for p in self.me.children(recursive=True)}
        return _cpu(self.me) + children.ru_utime + children.ru_stime, live

    def start(self) -> "BackgroundLoad":
        self._t0, self._busy0, self._ours0 = time.monotonic(), self._busy(), self._ours()
        return self

    def stop(self) -> float:
        """Cores used by others on average since ``start()``.

        A descendant that exited in between (a Spark worker that idled out) loses its time from
        ours, so this errs towards blaming others, never towards hiding them.
        """
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        (own1, live1), (own0, live0) = self._ours(), self._ours0
        ours = (own1 - own0) + sum(cpu - live0.get(pid, 0.0) for pid, cpu in live1.items())
        return max(0.0, ((self._busy() - self._busy0) - ours) / elapsed)

    @classmethod
    def wait_for_quiet(cls, threshold: float = 0.25, window_s: float = 5.0, max_wait_s: float = 600.0,
                       log: Any = print) -> float:
        """Wait (at most ``max_wait_s``) until others use under ``threshold`` cores over ``window_s``; return the last reading."""
        deadline = time.monotonic() + max_wait_s
        while True:
            meter = cls().start()
            time.sleep(window_s)
            load = meter.stop()
            if load < threshold or time.monotonic() > deadline:
                return load
            log(f"waiting for a quiet machine: others use {load:.2f} cores")


# -- the baseline: openai.AsyncOpenAI + asyncio.Semaphore ---------------------------------------


def run_baseline(spec: dict[str, Any]) -> dict[str, Any]:
    """The peer: the openai SDK's own client (default httpx2 pool, its default 2 retries) under a semaphore.

    ``spec``: base_url, rows, words, concurrency, max_tokens. Runs in a process of its own, so its
    CPU time is its own (``time.process_time()`` around the batch, imports and set-up excluded).
    """
    import openai

    texts = prompts(spec["rows"], tuple(spec["words"]))

    async def main() -> dict[str, Any]:
        client = openai.AsyncOpenAI(base_url=spec["base_url"], api_key="sk-sim")
        sem = asyncio.Semaphore(spec["concurrency"])
        failures: dict[str, int] = {}
        tokens = [0]

        async def one(text: str) -> bool:
            async with sem:
                try:
                    r = await client.chat.completions.create(
                        model="sim-model", messages=[{"role": "user", "content": text}], max_tokens=spec["max_tokens"])
                    if not r.choices or r.choices[0].message.content is None:
                        raise ValueError("empty answer")
                    tokens[0] += r.usage.total_tokens if r.usage else 0
                    return True
                except Exception as exc:  # noqa: BLE001 - a failed row is what we count
                    kind = type(exc).__name__
                    status = getattr(exc, "status_code", None)
                    key = f"{kind} {status}" if status else kind
                    failures[key] = failures.get(key, 0) + 1
                    return False

        cpu0, t0 = time.process_time(), time.monotonic()
        results = await asyncio.gather(*(one(t) for t in texts))
        elapsed, cpu = time.monotonic() - t0, time.process_time() - cpu0
        await client.close()
        ok = sum(results)
        return {"elapsed_s": elapsed, "rows": len(texts), "ok": ok, "failed": len(texts) - ok,
                "failures": failures, "cpu_s": cpu, "total_tokens": tokens[0]}

    return asyncio.run(main())


# -- results -----------------------------------------------------------------------------------


@dataclass
class Record:
    scenario: str
    metric: str
    value: float | int | None
    unit: str
    goal: str | None = None
    baseline: float | int | None = None
    ratio: float | None = None
    rows: int | None = None
    failed_rows: int | None = None
    met: bool | None = None
    notes: str = ""
    values: list[float] | None = None
    """Each run's value when ``value`` is their median (alternating runs)."""
    others_cores: list[float] | None = None
    """CPU cores other processes used during each run behind ``value`` (see :class:`BackgroundLoad`)."""

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def goal_met(value: float | None, goal: str | None) -> bool | None:
    """``'>= 0.95'``, ``'<= 0.02'`` or ``'== 0'`` against ``value``; None without a goal."""
    if goal is None or value is None:
        return None
    op, _, number = goal.partition(" ")
    target = float(number)
    return {">=": value >= target - 1e-12, "<=": value <= target + 1e-12, "==": abs(value - target) < 1e-12}[op]


def machine() -> str:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown CPU"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.3f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def markdown(records: Sequence[Record], *, date: str, command: str, machine_line: str, wall_s: float,
             preamble: Iterable[str] = (), title: str = "Endpoint benchmark results") -> str:
    """The results table; ``runs`` and ``others' CPU`` columns appear when a record has them."""
    runs = any(r.values for r in records)
    load = any(r.others_cores for r in records)
    extra_head = ("| runs " if runs else "") + ("| others' CPU (cores) " if load else "")
    extra_rule = ("| --- " if runs else "") + ("| --- " if load else "")
    lines = [
        f"# {title}",
        "",
        f"- date: {date}",
        f"- machine: {machine_line}",
        f"- command: `{command}`",
        f"- wall time of that run: {wall_s:.0f} s",
        *preamble,
        "",
        "| scenario | metric | ours | unit | goal | met | baseline | ours / baseline " + extra_head
        + "| rows | failed rows (ours) | notes |",
        "| --- | --- | ---: | --- | --- | --- | ---: | ---: " + extra_rule + "| ---: | ---: | --- |",
    ]
    for r in records:
        extra = (f"| {', '.join(_fmt(float(v)) for v in r.values or ())} " if runs else "") + \
            (f"| {', '.join(f'{v:.2f}' for v in r.others_cores or ())} " if load else "")
        lines.append(
            f"| {r.scenario} | {r.metric} | {_fmt(r.value)} | {r.unit} | {r.goal or ''} | {_fmt(r.met)} | "
            f"{_fmt(r.baseline)} | {_fmt(r.ratio)} {extra}| {_fmt(r.rows)} | {_fmt(r.failed_rows)} | {r.notes} |"
        )
    return "\n".join(lines) + "\n"


# -- alternating runs on a quiet machine -------------------------------------------------------


def alternating(phases: Sequence[str], runs: int) -> list[tuple[str, int]]:
    """The order to run ``runs`` runs of each phase in: round by round (a, b, c, a, b, c, ...).

    A neighbour that gets busy for a while then hits every phase alike, instead of all the runs
    of the one phase that happened to be running.
    """
    if runs < 1:
        raise ValueError(f"runs={runs!r} must be >= 1 (the benchmarks default to 2: a median and both values)")
    return [(phase, run) for run in range(runs) for phase in phases]


def median(values: Sequence[float]) -> float:
    """The median of the runs' values (of two runs: their mean)."""
    if not values:
        raise ValueError("median of no runs: run each phase at least once")
    return float(statistics.median(values))


def quiet_measure(fn: Any, *, wait_quiet: bool, threshold: float = 0.25, max_wait_s: float = 1800.0,
                  log: Any = print) -> tuple[Any, float, float | None]:
    """``fn()`` timed on a machine others leave alone: (its result, others' cores during it, others' cores before).

    With ``wait_quiet`` nothing is measured while other processes use ``threshold`` cores or
    more: it waits (up to ``max_wait_s``) first. The load measured *during* ``fn`` is returned
    so it goes beside the figure; a caller flags a run whose load went over ``threshold``.
    """
    before = BackgroundLoad.wait_for_quiet(threshold, max_wait_s=max_wait_s, log=log) if wait_quiet else None
    meter = BackgroundLoad().start()
    out = fn()
    return out, meter.stop(), before


def load_note(cores: Sequence[float], threshold: float = 0.25) -> str:
    """``others' CPU 0.03, 0.41 cores (run 2 above 0.25: not quiet)`` for the notes beside a figure."""
    loaded = [str(i + 1) for i, c in enumerate(cores) if c > threshold]
    text = "others' CPU " + ", ".join(f"{c:.2f}" for c in cores) + " cores"
    return text + (f" (run {', '.join(loaded)} above {threshold}: not quiet)" if loaded else "")


def write_results(out: Any, name: str, records: Sequence[Record], runs: list[dict[str, Any]], *, command: str,
                  wall_s: float, title: str, preamble: Iterable[str]) -> tuple[Any, Any]:
    """``<out>/<name>.json`` (every record with the date, machine, command and the runs) and ``<name>.md``; their paths."""
    from datetime import datetime, timezone

    out.mkdir(parents=True, exist_ok=True)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = {"date": date, "machine": machine(), "command": command, "wall_s": round(wall_s)}
    (out / f"{name}.json").write_text(json.dumps([{**r.as_dict(), **meta, "runs": runs} for r in records], indent=1) + "\n")
    (out / f"{name}.md").write_text(markdown(records, date=date, command=command, machine_line=meta["machine"],
                                             wall_s=meta["wall_s"], title=title, preamble=preamble))
    return out / f"{name}.json", out / f"{name}.md"


__all__ = ["BackgroundLoad", "FILLER", "Record", "Sample", "SimSampler", "SparkCpu", "alternating", "goal_met", "load_note",
           "machine", "markdown", "median", "prompts", "quiet_measure", "run_baseline", "write_results"]
