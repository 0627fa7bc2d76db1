"""The screenshots of docs/pages/observability.md, made from real runs; re-run it to refresh them.

    .venv/bin/python docs/make_screenshots.py                   # all of them
    .venv/bin/python docs/make_screenshots.py terminal jupyter  # some: terminal, jupyter, plots

They go to docs/pages/img/ (the site's docs_dir is docs/pages: mkdocs serves nothing outside it).

- ``terminal``: a query with ``progress=True`` runs in a child process on a pseudo-terminal of
  100x12 (this script with ``--terminal-demo``, against the provider simulator on 127.0.0.1). The
  bytes it wrote (tqdm's carriage-return redraws, Spark's start-up lines) go through a small
  terminal emulator (``Screen``) and the final screen is drawn with Pillow in DejaVu Sans Mono.
  No screenshot of a desktop: the picture is what a terminal of that size shows at the end.
- ``jupyter``: a small notebook runs in a real Jupyter kernel (nbclient); its cells and outputs are
  drawn the way the classic notebook shows them (stderr on a red tint, a stream's ``\\r`` redraws
  folded as the front end folds them). Without ipywidgets (the case here) ``tqdm.auto`` has no
  widget to draw and the bar is tqdm's text bar on stderr; with ipywidgets the kernel would send a
  widget, which only a browser draws, and the picture would show its ``text/plain`` form.
- ``plots``: matplotlib figures (``image/png`` outputs) of the committed, executed notebooks.
"""

from __future__ import annotations

import base64
import os
import pathlib
import re
import subprocess
import sys
import tempfile
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "pages" / "img"
MONO = "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf"
SANS = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
PLOTS = {  # (notebook, n-th PNG of it) -> file name
    ("endpoints.ipynb", 1): "plot-concurrency-throughput.png",
    ("endpoints.ipynb", 2): "plot-latency-histogram.png",
    ("batch_job.ipynb", 1): "plot-tokens-cost-per-chunk.png",
}
COLS, ROWS = 100, 12
QUERY = ("SELECT id, ai_query('reviews-llm', CONCAT(CASE WHEN id % 25 = 0 THEN '[[status:400]] ' ELSE '' END, "
         "'Summarize review ', id), failOnError => false) AS a FROM reviews")


def demo_session(base_url: str) -> Any:
    """The session of both demos: an OpenAI-style endpoint at the simulator, 400 review ids."""
    import spark_udfs
    from ai_query import EndpointRegistry

    spark = spark_udfs.build_session(app_name="progress-demo")
    spark_udfs.register(spark, EndpointRegistry.builtin().with_endpoints(EndpointRegistry.from_data([{
        "name": "reviews-llm", "config": {"served_entities": [{"name": "m", "external_model": {
            "name": "sim-model", "provider": "openai", "task": "llm/v1/chat",
            "openai_config": {"openai_api_key_plaintext": "sk-demo", "openai_api_base": base_url}}}]}}])))
    spark.range(400).selectExpr("CAST(id AS INT) AS id").createOrReplaceTempView("reviews")
    return spark


def terminal_demo() -> None:
    """What runs on the pseudo-terminal: one query, its bar, a line of results."""
    import spark_udfs
    from ai_query.testing import ProviderSimulator

    with ProviderSimulator(api_key="sk-demo", latency_s=0.2, max_concurrency=24) as sim:
        spark = demo_session(sim.base_url)
        rows = spark_udfs.sql(spark, QUERY, progress=True).collect()
        spark_udfs.sql(spark, "SELECT 1", progress=False)  # draws the bar's last state and closes it
        failed = sum(r.a.errorMessage is not None for r in rows)
        print(f"{len(rows)} rows, {failed} failed; the provider got {sim.stats.requests} requests, "
              f"{sim.stats.by_status[429]} refused (429) and retried")
        spark.stop()


class Screen:
    """A terminal's text: printable characters, CR, LF, BS, TAB and the CSI sequences that move
    the cursor or erase (colours are dropped); lines scroll, the last ``rows`` are the screen."""

    CSI = re.compile(r"\x1b\[([0-9;?]*)([@-~])|\x1b\][^\x07]*\x07|\x1b[()][0-9A-Za-z]|\x1b[=>78]")

    def __init__(self, cols: int, rows: int) -> None:
        self.cols, self.rows = cols, rows
        self.lines: list[list[str]] = [[]]
        self.x = self.y = 0

    def _put(self, ch: str) -> None:
        if self.x >= self.cols:
            self._down()
            self.x = 0
        line = self.lines[self.y]
        line.extend(" " * (self.x + 1 - len(line)))
        line[self.x] = ch
        self.x += 1

    def _down(self) -> None:
        self.y += 1
        if self.y == len(self.lines):
            self.lines.append([])

    def feed(self, text: str) -> None:
        i = 0
        while i < len(text):
            match = self.CSI.match(text, i)
            if match:
                self._csi(match.group(1) or "", match.group(2) or "")
                i = match.end()
                continue
            ch = text[i]
            i += 1
            if ch == "\r":
                self.x = 0
            elif ch == "\n":
                self._down()
            elif ch == "\b":
                self.x = max(0, self.x - 1)
            elif ch == "\t":
                self.x = min(self.cols - 1, (self.x // 8 + 1) * 8)
            elif ch >= " ":
                self._put(ch)

    def _csi(self, params: str, final: str) -> None:
        args = [int(p) if p.isdigit() else 0 for p in params.lstrip("?").split(";")] if params else []
        n = max(1, args[0]) if args else 1
        line = self.lines[self.y]
        if final == "A":
            self.y = max(0, self.y - n)
        elif final == "B":
            for _ in range(n):
                self._down()
        elif final == "C":
            self.x = min(self.cols - 1, self.x + n)
        elif final == "D":
            self.x = max(0, self.x - n)
        elif final == "G":
            self.x = min(self.cols - 1, n - 1)
        elif final == "K":
            mode = args[0] if args else 0
            if mode == 0:
                del line[self.x:]
            elif mode == 1:
                line[:self.x] = " " * min(self.x, len(line))
            else:
                line.clear()
        elif final in "Hf":
            top = max(0, len(self.lines) - self.rows)
            self.y = top + (args[0] - 1 if args and args[0] else 0)
            while self.y >= len(self.lines):
                self.lines.append([])
            self.x = (args[1] - 1) if len(args) > 1 and args[1] else 0
        elif final == "J" and (args[0] if args else 0) == 2:
            self.lines, self.x, self.y = [[]], 0, 0

    def text(self) -> list[str]:
        lines = ["".join(line).rstrip() for line in self.lines]
        while lines and not lines[-1]:
            lines.pop()
        return lines[-self.rows:]


def run_on_pty(argv: list[str], cols: int, rows: int, timeout_s: float = 600) -> bytes:
    """Run ``argv`` with a pseudo-terminal of ``cols`` x ``rows`` as its stdin/stdout/stderr; its bytes."""
    import fcntl
    import select
    import struct
    import termios
    import time

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(cols), "LINES": str(rows)}
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT, start_new_session=True)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed its side
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"the terminal demo failed (exit {proc.returncode}):\n{out.decode(errors='replace')[-3000:]}")
    return bytes(out)


def draw_terminal(lines: list[str], title: str, path: pathlib.Path) -> None:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(MONO, 15)
    cw, lh, pad, bar = font.getlength("M"), 20, 14, 30
    img = Image.new("RGB", (int(COLS * cw + 2 * pad), bar + ROWS * lh + 2 * pad), "#1e1e1e")
    d = ImageDraw.Draw(img)
    d.rectangle([0, 0, img.width, bar], fill="#3c3c3c")
    for k, colour in enumerate(("#ff5f56", "#ffbd2e", "#27c93f")):
        d.ellipse([12 + 20 * k, 9, 24 + 20 * k, 21], fill=colour)
    d.text((80, 7), title, font=ImageFont.truetype(SANS, 13), fill="#cccccc")
    for row, line in enumerate(lines):
        d.text((pad, bar + pad + row * lh), line, font=font, fill="#d4d4d4")
    img.save(path)


def make_terminal() -> pathlib.Path:
    raw = run_on_pty([sys.executable, str(pathlib.Path(__file__).resolve()), "--terminal-demo"], COLS, ROWS)
    screen = Screen(COLS, ROWS)
    screen.feed(raw.decode("utf-8", "replace"))
    path = OUT / "progress-terminal.png"
    draw_terminal(screen.text(), f"python docs/make_screenshots.py --terminal-demo   ({COLS}x{ROWS} pseudo-terminal)", path)
    return path


NOTEBOOK = [
    """import spark_udfs
from ai_query.testing import ProviderSimulator
from make_screenshots import QUERY, demo_session

sim = ProviderSimulator(api_key="sk-demo", latency_s=0.2, max_concurrency=24).start()  # an OpenAI-style server
spark = demo_session(sim.base_url)""",
    """rows = spark_udfs.sql(spark, QUERY).collect()   # progress is on by default in a notebook""",
    """failed = sum(r.a.errorMessage is not None for r in rows)
print(f"{len(rows)} rows, {failed} failed; the provider got {sim.stats.requests} requests, "
      f"{sim.stats.by_status[429]} refused (429) and retried")""",
]


def fold_cr(text: str) -> str:
    """A stream as Jupyter shows it: each ``\\r`` sends the rest of the line back to its start."""
    out = []
    for line in text.split("\n"):
        shown: list[str] = []
        for part in line.split("\r"):
            shown[:len(part)] = part
        out.append("".join(shown).rstrip())
    return "\n".join(out)


def notebook_blocks(nb: Any) -> list[tuple[str, str, str]]:
    """(prompt, kind, text) of each cell input and output, streams of a name merged and folded."""
    blocks: list[tuple[str, str, str]] = []
    for cell in nb.cells:
        blocks.append((f"In [{cell.execution_count}]:", "code", cell.source))
        merged: list[list[str]] = []
        for o in cell.outputs:
            if o.output_type == "stream":
                if merged and merged[-1][0] == o.name:
                    merged[-1][1] += o.text
                else:
                    merged.append([o.name, o.text])
            elif o.output_type in ("execute_result", "display_data") and "text/plain" in o.data:
                merged.append(["result", o.data["text/plain"]])
        for kind, text in merged:
            prompt = f"Out[{cell.execution_count}]:" if kind == "result" else ""
            blocks.append((prompt, kind, fold_cr(text).strip("\n")))
    return blocks


def draw_notebook(blocks: list[tuple[str, str, str]], path: pathlib.Path) -> None:
    from PIL import Image, ImageDraw, ImageFont

    font, sans = ImageFont.truetype(MONO, 13), ImageFont.truetype(SANS, 13)
    cw, lh, left, pad = font.getlength("M"), 18, 90, 8
    width = int(left + cw * max(len(line) for _, _, text in blocks for line in text.split("\n")) + 3 * pad)
    heights = [len(text.split("\n")) * lh + 2 * pad for _, _, text in blocks]
    img = Image.new("RGB", (max(width, 900), sum(heights) + 10 * len(blocks) + 20), "white")
    d = ImageDraw.Draw(img)
    y = 10
    for (prompt, kind, text), h in zip(blocks, heights):
        if kind == "code":
            d.rectangle([left, y, img.width - 10, y + h], fill="#f7f7f7", outline="#cfcfcf")
        elif kind == "stderr":
            d.rectangle([left, y, img.width - 10, y + h], fill="#fdd")
        d.text((8, y + pad), prompt, font=sans, fill="#303f9f" if kind == "code" else "#d84315")
        for k, line in enumerate(text.split("\n")):
            d.text((left + pad, y + pad + k * lh), line, font=font, fill="#000000")
        y += h + 10
    img.save(path)


def make_jupyter() -> pathlib.Path:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in NOTEBOOK])
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "docs"), os.environ.get("PYTHONPATH", "")])}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits it: `from make_screenshots import ...`
    try:
        with tempfile.TemporaryDirectory(prefix="aiq-shot-") as cwd:
            NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": cwd}}).execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    path = OUT / "progress-jupyter.png"
    draw_notebook(notebook_blocks(nb), path)
    return path


def make_plots() -> list[pathlib.Path]:
    import nbformat

    paths = []
    for (name, nth), file_name in PLOTS.items():
        nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
        pngs = [o.data["image/png"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
                if "image/png" in o.get("data", {})]
        if len(pngs) < nth:
            raise SystemExit(f"notebooks/{name} has {len(pngs)} PNG plot(s), not {nth}: run `make notebooks` first")
        path = OUT / file_name
        path.write_bytes(base64.b64decode(pngs[nth - 1]))
        paths.append(path)
    return paths


def main(argv: list[str]) -> int:
    if argv == ["--terminal-demo"]:
        terminal_demo()
        return 0
    kinds = argv or ["terminal", "jupyter", "plots"]
    unknown = sorted(set(kinds) - {"terminal", "jupyter", "plots"})
    if unknown:
        print(f"make_screenshots: unknown screenshot {unknown[0]!r}; choose among terminal, jupyter, plots", file=sys.stderr)
        return 2
    OUT.mkdir(parents=True, exist_ok=True)
    made: list[pathlib.Path] = []
    if "terminal" in kinds:
        made.append(make_terminal())
    if "jupyter" in kinds:
        made.append(make_jupyter())
    if "plots" in kinds:
        made += make_plots()
    for path in made:
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
