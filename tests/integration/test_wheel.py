"""The built wheel, installed into a fresh venv as a user would, works from outside the checkout.

One venv, three steps, each the way a user brings the project into an environment:
1. the wheel alone (``pip install spark-ai-query``): the engine-free core imports, pulls no Spark,
   pandas, Arrow or serving stack, and answers through the simulator;
2. a different supported pyspark already installed (the low end of the declared range, as on a
   runtime that ships its own): ``pip install 'spark-ai-query[spark]'`` keeps it;
3. a SQL ``ai_query`` query on that pyspark written to a Delta table and read back, run from a temp dir (nothing works only because the
   source tree is on ``sys.path``).

CI pins live in ``.ci/constraints.txt``; the pyspark line is left out of the constraints here, so
the resolver must accept the runtime's pyspark instead of replacing it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ai_query.testing import ProviderSimulator

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]
HIGH_PYSPARK = "4.3.0"  # the newest 4.x on PyPI when the range was last checked
LOW_PYSPARK = "4.1.0"  # the low end of pyproject's "pyspark>=4.1,<5" (arrow_udf came with 4.1)

CORE = r"""
import json, sys
import ai_query
from ai_query import AIQueryClient, EndpointRegistry
heavy = sorted(m for m in ("pyspark", "pandas", "pyarrow", "deltalake", "starlette", "uvicorn", "mlflow", "spark_udfs")
               if m in sys.modules)
registry = EndpointRegistry.from_data([json.loads(sys.argv[1])])
[r] = AIQueryClient(registry).map("smoke", ["hello from the core"], {"max_tokens": 8})
print(json.dumps({"file": ai_query.__file__, "heavy": heavy, "status": r.status, "value": r.value}))
"""

SQL = r"""
import json, os, sys
import pyspark
from pyspark.sql import SparkSession
import spark_udfs
from ai_query import EndpointRegistry
spark = (SparkSession.builder.master("local[1]").config("spark.ui.enabled", "false")
         .config("spark.driver.host", "127.0.0.1").getOrCreate())
spark.sparkContext.setLogLevel("ERROR")
spark_udfs.register(spark, EndpointRegistry.builtin().with_endpoints(EndpointRegistry.from_data([json.loads(sys.argv[1])])))
table = os.path.join(os.getcwd(), "answers")
spark.sql("SELECT id, ai_query('smoke', CONCAT('row ', id)) AS r FROM range(6)").write.format("delta").mode("append").save(table)
rows = spark.read.format("delta").load(table).collect()
print(json.dumps({"pyspark": pyspark.__version__, "file": spark_udfs.__file__,
                  "rows": sorted([r.id, r.r] for r in rows)}))
spark.stop()
"""


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd[:4]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_wheel_in_a_fresh_venv_core_then_spark_keeps_the_runtime_pyspark(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON")}
    env |= {"SPARK_LOCAL_IP": "127.0.0.1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    dist = tmp_path / "dist"
    # The project's own build (setuptools from this venv, no download), exactly what `python -m build` makes.
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), str(ROOT)], tmp_path, env)
    [wheel] = dist.glob("spark_ai_query-*.whl")
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("".join(line + "\n" for line in (ROOT / ".ci/constraints.txt").read_text().splitlines()
                                   if not line.startswith("pyspark")))

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path, env)
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "install", "-q", "-c", str(constraints)]
    env_venv = env | {"PYSPARK_PYTHON": py, "PYSPARK_DRIVER_PYTHON": py}
    work = tmp_path / "elsewhere"
    work.mkdir()

    with ProviderSimulator(api_key="sk-wheel") as sim:
        endpoint = json.dumps({"name": "smoke", "config": {"served_entities": [{"name": "sim", "external_model": {
            "name": "sim-model", "provider": "openai", "task": "llm/v1/chat",
            "openai_config": {"openai_api_key_plaintext": "sk-wheel", "openai_api_base": sim.base_url}}}]}})

        _run([*pip, str(wheel)], work, env)
        core = json.loads(_run([py, "-c", CORE, endpoint], work, env_venv).strip().splitlines()[-1])
        assert core["file"].startswith(str(venv)), core
        assert core["heavy"] == [], f"the core pulled {core['heavy']}"
        assert (core["status"], core["value"]) == ("ok", "echo: hello from the core")

        _run([*pip, f"pyspark=={LOW_PYSPARK}"], work, env)
        _run([*pip, f"{wheel}[spark]"], work, env)
        version = _run([py, "-c", "import pyspark; print(pyspark.__version__)"], work, env_venv).strip()
        assert version == LOW_PYSPARK, f"installing [spark] replaced the runtime's pyspark {LOW_PYSPARK} with {version}"

        out = json.loads(_run([py, "-c", SQL, endpoint], work, env_venv).strip().splitlines()[-1])
        assert out["pyspark"] == LOW_PYSPARK
        assert out["file"].startswith(str(venv)), out
        assert out["rows"] == [[i, f"echo: row {i}"] for i in range(6)]

        # The high end of the range: the runtime upgrades its pyspark under an installed spark-ai-query.
        _run([*pip, f"pyspark=={HIGH_PYSPARK}"], work, env)
        out = json.loads(_run([py, "-c", SQL, endpoint], work, env_venv).strip().splitlines()[-1])
        assert out["pyspark"] == HIGH_PYSPARK
        assert out["rows"] == sorted([[i, f"echo: row {i}"] for i in range(6)] * 2)  # the Delta table holds both runs
