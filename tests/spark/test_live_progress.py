"""``spark_udfs.sql(spark, q, progress=True)``: a live bar while the query's action runs, with rows
done, failed, tokens and concurrency (tqdm's text bar here; ``tqdm.auto`` draws a widget in Jupyter).

Exact counts per bar: 40 rows, 4 failed, the tokens the simulator counted for that action. The two
actions run back to back, as ``df.collect(); df.collect()`` in a notebook cell does.

Mutations caught: the session's progress address not set (``state.progress_address = ...`` removed
in ``spark_udfs.sql``): no counts arrive, no bar; the tasks' action not named (``action=action``
removed from ``_batch_context`` in spark_udfs/_udf.py, the counts of every action land under
``None``): one bar of 80 rows, failed=8, twice the tokens (the double count this test was an
xfail for); ``show`` putting the total failed count instead of the counts since the bar opened
(``- base.rows_failed`` removed) only matters for a reopened bar: see tests/unit/test_live_progress.py.
"""

from __future__ import annotations

import io
import re
import time

import pytest

import spark_udfs
from ai_query import EndpointRegistry
from ai_query.testing import ProviderSimulator
from spark_udfs import LiveProgress

QUERY = ("SELECT id, ai_query('live-chat', CONCAT(CASE WHEN id % 10 = 0 THEN '[[status:400]] ' ELSE '' END, q), "
         "failOnError => false) AS a FROM live_rows")


@pytest.fixture(scope="module")
def sim(spark):
    with ProviderSimulator(api_key="sk-sim") as simulator:
        registry = EndpointRegistry.builtin().with_endpoints(EndpointRegistry.from_data([{
            "name": "live-chat", "config": {"served_entities": [{"name": "m", "external_model": {
                "name": "sim-model", "provider": "openai", "task": "llm/v1/chat",
                "openai_config": {"openai_api_key_plaintext": "sk-sim", "openai_api_base": simulator.base_url}}}]}}]))
        spark_udfs.register(spark, registry)
        spark.createDataFrame([(i, f"question {i}") for i in range(40)], "id INT, q STRING").createOrReplaceTempView("live_rows")
        yield simulator


def check_bars(bars: list[str], tokens: list[int]) -> None:
    """One closed bar per action, each with its own exact counts: 40 rows, 4 failed, its tokens."""
    assert all(t > 0 for t in tokens) and len(bars) == len(tokens), (tokens, bars)
    for bar, action_tokens in zip(bars, tokens):
        assert re.search(r"ai_query: 40row ", bar) and "failed=4," in bar and f"tokens={action_tokens}" in bar \
            and "concurrency=live-chat=" in bar, (bar, action_tokens)


def closed_bars(err: str) -> list[str]:
    """The last state of each bar tqdm closed (it redraws with \\r, closes with \\n)."""
    return [line.split("\r")[-1] for line in err.split("\n")[:-1] if "ai_query:" in line]


def test_progress_true_shows_one_bar_per_action_with_its_exact_counts(spark, sim, capsys):
    err = ""
    try:
        sim.reset()
        df = spark_udfs.sql(spark, QUERY, progress=True)
        assert len(df.collect()) == 40
        first = (sim.stats.requests, sim.stats.total_tokens)
        # a second action of the same DataFrame at once (no pause between the two for the bar to
        # notice): a bar of its own, counting from zero again
        assert len(df.collect()) == 40
        both = (sim.stats.requests, sim.stats.total_tokens)
        for _ in range(100):  # the last bar closes once no row arrived for idle_s (2 s)
            err += capsys.readouterr().err
            if len(closed_bars(err)) >= 2:
                break
            time.sleep(0.1)
    finally:
        spark_udfs.sql(spark, "SELECT 1", progress=False)
    bars = closed_bars(err + capsys.readouterr().err)
    # the provider saw each of the 40 requests once per action, 4 of them refused (400)
    assert first[0] == 40 and both[0] == 80 and sim.stats.by_status[400] == 8, (first, both, sim.stats)
    check_bars(bars, [first[1], both[1] - first[1]])


def test_back_to_back_actions_get_a_bar_each_however_long_the_bar_waits_for_a_pause(spark, sim):
    """The bar of an action closes when the next action's rows arrive, not only after a pause: with
    a pause longer than the test (idle_s=3600), counts that did not name their action would make
    one bar of both actions here, whatever the speed of the machine."""
    stream = io.StringIO()
    live = LiveProgress(stream=stream, idle_s=3600)
    try:
        spark_udfs.set_progress_address(spark, live.address)
        sim.reset()
        df = spark_udfs.sql(spark, QUERY)
        tokens = []
        for _ in range(2):
            before = sim.stats.total_tokens
            assert len(df.collect()) == 40
            tokens.append(sim.stats.total_tokens - before)
        for _ in range(100):  # the collector has all 80 rows' datagrams (sent before each task ended)
            if live.collector.snapshot().rows == 80:
                break
            time.sleep(0.05)
    finally:
        spark_udfs.set_progress_address(spark, None)
        live.close()  # draws the open bars' final state and closes them
    assert sim.stats.requests == 80 and live.bars == 2, (sim.stats, stream.getvalue())
    check_bars(closed_bars(stream.getvalue()), tokens)


NOTEBOOK_CELLS = [
    """import spark_udfs
spark = spark_udfs.build_session(app_name="live-progress-notebook")
print("ui:", spark.conf.get("spark.ui.enabled"), spark.sparkContext.uiWebUrl is not None)""",
    """from ai_query import EndpointRegistry
spark_udfs.register(spark, EndpointRegistry.builtin().with_endpoints(EndpointRegistry.from_data([{
    "name": "live-chat", "config": {"served_entities": [{"name": "m", "external_model": {
        "name": "sim-model", "provider": "openai", "task": "llm/v1/chat",
        "openai_config": {"openai_api_key_plaintext": "sk-sim", "openai_api_base": BASE_URL}}}]}}])))
spark.createDataFrame([(i, f"question {i}") for i in range(40)], "id INT, q STRING").createOrReplaceTempView("live_rows")""",
    "print(len(spark_udfs.sql(spark, QUERY).collect()))  # no progress argument: on by default in a notebook",
    "import time; time.sleep(3); print('the next cell')  # longer than idle_s: a bar left open would close here",
]


@pytest.mark.integration
def test_in_a_notebook_the_ui_is_on_and_progress_is_on_by_default_and_ends_in_its_cell(sim, tmp_path):
    """A real Jupyter kernel (nbclient) runs ``build_session()`` and ``spark_udfs.sql`` without
    ``progress``: the Spark UI is on, and the cell that runs the query shows a bar with the
    query's counts, closed in that cell (tqdm's text bar on stderr: ipywidgets is not installed).

    Mutations caught: ``build_session(..., ui=False)`` as the default: ``ui: false False``;
    ``in_notebook`` returning False: no bar; the ``post_run_cell`` hook not registered in
    ``LiveProgress.__init__``: the bar's close lands after its cell (no closed bar in it)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    source = [c.replace("BASE_URL", repr(sim.base_url)).replace("QUERY", repr(QUERY)) for c in NOTEBOOK_CELLS]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in source])
    sim.reset()
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    def text(cell: int, name: str) -> str:
        return "".join(o.get("text", "") for o in nb.cells[cell].outputs if o.get("name") == name)

    assert "ui: true True" in text(0, "stdout"), nb.cells[0].outputs
    assert text(2, "stdout") == "40\n", nb.cells[2].outputs
    assert sim.stats.requests == 40, sim.stats
    bars = closed_bars(text(2, "stderr"))
    check_bars(bars, [sim.stats.total_tokens])
    assert "ai_query:" not in text(3, "stderr") + text(3, "stdout"), nb.cells[3].outputs
