"""The direction of the dependencies, enforced: the core imports no engine, the engines no Spark.

``check_directions`` walks the AST of every module (function-level and ``TYPE_CHECKING``
imports included, relative imports resolved, ``importlib.import_module("...")`` with a literal
name too) and reports every import that breaks a rule of DESIGN.md's layout:

- ``ai_query/`` imports none of ``gpu_workers``, ``spark_udfs``, ``batch_runner``, ``pyspark``, ``vllm``;
- ``gpu_workers/`` imports none of ``spark_udfs``, ``batch_runner``, ``pyspark``, and of ``ai_query``
  only the public API (no module or name that starts with ``_``);
- ``spark_udfs/`` and ``batch_runner/`` reach the engines only through the core's backends (no
  ``gpu_workers``, no ``vllm``), and ``spark_udfs/`` imports no ``batch_runner``.

The mutation tests add one such import to a copy of the tree and expect the checker to fail.
"""

from __future__ import annotations

import ast
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

FORBIDDEN: dict[str, set[str]] = {
    "ai_query": {"gpu_workers", "spark_udfs", "batch_runner", "pyspark", "vllm"},
    "gpu_workers": {"spark_udfs", "batch_runner", "pyspark"},
    "spark_udfs": {"gpu_workers", "batch_runner", "vllm"},
    "batch_runner": {"gpu_workers", "vllm"},
}
PUBLIC_ONLY: dict[str, set[str]] = {"gpu_workers": {"ai_query"}}
"""Packages that may import these others only through their public names."""


def _module_name(root: pathlib.Path, path: pathlib.Path) -> tuple[str, bool]:
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of ``from <level dots><target> import ...`` written in ``module``."""
    if level == 0:
        return target or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, target] if target else base)


def imports_of(root: pathlib.Path, path: pathlib.Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports, as (line, absolute dotted name); ``from m import n`` gives ``m.n``."""
    module, is_package = _module_name(root, path)
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module)
            found += [(node.lineno, f"{base}.{alias.name}" if alias.name != "*" else base) for alias in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
    return found


def check_directions(root: pathlib.Path) -> list[str]:
    """Every import under ``root`` that breaks a rule, as ``path:line: package imports name``."""
    offenders = []
    for package in sorted(FORBIDDEN):
        for path in sorted((root / package).rglob("*.py")):
            for line, name in imports_of(root, path):
                parts = name.split(".")
                where = f"{path.relative_to(root)}:{line}"
                if parts[0] in FORBIDDEN[package]:
                    offenders.append(f"{where}: {package} imports {name}")
                elif parts[0] in PUBLIC_ONLY.get(package, ()) and any(p.startswith("_") and not p.endswith("__") for p in parts[1:]):
                    offenders.append(f"{where}: {package} imports {name}, not part of {parts[0]}'s public API")
    return offenders


def test_the_tree_imports_in_one_direction():
    assert check_directions(ROOT) == []


def test_the_checker_sees_every_file_of_both_packages():
    scanned = {p.relative_to(ROOT).as_posix() for package in FORBIDDEN for p in (ROOT / package).rglob("*.py")}
    assert {"ai_query/_client.py", "ai_query/backends/_registry.py", "ai_query/serving/_app.py",
            "gpu_workers/_offline.py", "gpu_workers/_backends.py"} <= scanned


@pytest.mark.parametrize(
    ("module", "is_package", "level", "target", "expected"),
    [
        ("ai_query.serving._app", False, 2, "backends._mlflow", "ai_query.backends._mlflow"),
        ("ai_query.serving", True, 1, "_store", "ai_query.serving._store"),
        ("ai_query._client", False, 1, None, "ai_query"),
        ("gpu_workers._offline", False, 0, "ai_query", "ai_query"),
    ],
)
def test_relative_imports_resolve_to_absolute_names(module, is_package, level, target, expected):
    assert _resolve(module, is_package, level, target) == expected


MUTATIONS = [
    ("ai_query/_client.py", "def _mutant():\n    import gpu_workers\n", "ai_query imports gpu_workers"),
    ("ai_query/serving/_app.py", "def _mutant():\n    from pyspark.sql import SparkSession\n", "ai_query imports pyspark.sql.SparkSession"),
    ("ai_query/backends/_registry.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import vllm\n", "ai_query imports vllm"),
    ("ai_query/_files.py", "import spark_udfs._udf as _u\n", "ai_query imports spark_udfs._udf"),
    ("ai_query/backends/_openai.py", "def _mutant():\n    import importlib\n    importlib.import_module('batch_runner.cli')\n",
     "ai_query imports batch_runner.cli"),
    ("gpu_workers/_offline.py", "def _mutant():\n    from pyspark import TaskContext\n", "gpu_workers imports pyspark.TaskContext"),
    ("gpu_workers/_backends.py", "import spark_udfs\n", "gpu_workers imports spark_udfs"),
    ("gpu_workers/_pool.py", "def _mutant():\n    from batch_runner import cli\n", "gpu_workers imports batch_runner.cli"),
    ("gpu_workers/_backends.py", "from ai_query._client import shared_client\n", "not part of ai_query's public API"),
    ("gpu_workers/_offline.py", "def _mutant():\n    from ai_query import _config\n", "gpu_workers imports ai_query._config, not part"),
    ("gpu_workers/_backends.py", "from ai_query.backends._http_common import bearer\n", "not part of ai_query's public API"),
    ("spark_udfs/__init__.py", "def _mutant():\n    from gpu_workers._models import model_path\n", "spark_udfs imports gpu_workers._models"),
    ("batch_runner/_plan.py", "def _mutant():\n    import gpu_workers\n", "batch_runner imports gpu_workers"),
]


@pytest.mark.parametrize(("target", "code", "message"), MUTATIONS, ids=[f"{t}:{m}" for t, _, m in MUTATIONS])
def test_one_forbidden_import_fails_the_check(tmp_path, target, code, message):
    for package in FORBIDDEN:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    assert check_directions(tmp_path) == []  # the copy is clean ...
    path = tmp_path / target
    path.write_text(path.read_text() + "\n\n" + code)
    offenders = check_directions(tmp_path)  # ... until one import is added
    assert len(offenders) == 1 and offenders[0].startswith(target + ":") and message in offenders[0], offenders


def test_importing_the_core_loads_no_engine_and_no_spark():
    """`import ai_query` (what executors and the server import) leaves the engines, Spark, torch and mlflow out."""
    code = (
        "import sys, ai_query, ai_query._client, ai_query.backends, ai_query.serving;"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'gpu_workers', 'spark_udfs', 'batch_runner', 'pyspark', 'vllm', 'torch', 'mlflow', 'transformers'});"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""
