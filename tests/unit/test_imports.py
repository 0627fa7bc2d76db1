import subprocess
import sys


def test_core_import_stays_light():
    """`import ai_query` must not pull in pyspark, vllm, torch or mlflow (executors and the server import it)."""
    code = (
        "import sys, ai_query, ai_query._client, ai_query._providers;"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in {'pyspark', 'vllm', 'torch', 'mlflow', 'transformers'});"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_core_sources_never_import_pyspark_or_vllm():
    import pathlib

    import ai_query

    root = pathlib.Path(ai_query.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import ", "from ")) and any(
                f" {mod}" in stripped.replace("from ", " ").replace("import ", " ") for mod in ("pyspark", "vllm")
            ):
                offenders.append(f"{path.name}: {stripped}")
    assert offenders == []
