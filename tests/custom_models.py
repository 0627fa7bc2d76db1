"""Real MLflow pyfunc custom models for the tests: saved with ``mlflow.pyfunc.save_model`` (models
from code) with signatures that name input features, declare params (or none) and an output.

``triage``: inputs ``timestamp`` (datetime), ``sender``, ``text``; param ``threshold`` (double,
0.5); output ``label`` (string), ``score`` (double), ``hour`` (long). It raises unless each column
arrives with its signature's type (a timestamp, not text), so a wrongly fed record fails loudly.
``plain``: the same inputs, no params, output one double (a list). ``column``: the same as a
one-column DataFrame (``length``), which MLflow's scoring server answers as records.
"""

from __future__ import annotations

import textwrap
import warnings
from pathlib import Path

TRIAGE = """
    import mlflow
    import pandas as pd
    from mlflow.pyfunc import PythonModel

    class Triage(PythonModel):
        def predict(self, context, model_input, params=None):
            threshold = (params or {}).get("threshold", 0.5)
            out = []
            for row in model_input.to_dict("records"):
                if not isinstance(row["timestamp"], pd.Timestamp):
                    raise TypeError(f"timestamp arrived as {type(row['timestamp']).__name__}: {row['timestamp']!r}")
                score = min(1.0, len(row["text"]) / 40.0)
                out.append({"label": "long" if score >= threshold else "short", "score": score,
                            "hour": int(row["timestamp"].hour)})
            return out

    mlflow.models.set_model(Triage())
"""

PLAIN = """
    import mlflow
    from mlflow.pyfunc import PythonModel

    class Plain(PythonModel):
        def predict(self, context, model_input, params=None):
            return [float(len(s) + len(t)) for s, t in zip(model_input["sender"], model_input["text"])]

    mlflow.models.set_model(Plain())
"""

COLUMN = """
    import mlflow
    import pandas as pd
    from mlflow.pyfunc import PythonModel

    class Column(PythonModel):
        def predict(self, context, model_input, params=None):
            return pd.DataFrame({"length": [float(len(s) + len(t)) for s, t in zip(model_input["sender"], model_input["text"])]})

    mlflow.models.set_model(Column())
"""


def save_custom_models(root: Path) -> dict[str, str]:
    """Save ``triage``, ``plain`` and ``column`` under ``root``; their paths (model URIs) by name."""
    import mlflow.pyfunc
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("datetime", "timestamp"), ColSpec("string", "sender"), ColSpec("string", "text")])
    signatures = {
        "triage": ModelSignature(inputs=inputs,
                                 outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score"), ColSpec("long", "hour")]),
                                 params=ParamSchema([ParamSpec("threshold", "double", 0.5)])),
        "plain": ModelSignature(inputs=inputs, outputs=Schema([ColSpec("double")])),
        "column": ModelSignature(inputs=inputs, outputs=Schema([ColSpec("double", "length")])),
    }
    paths = {}
    for name, code in (("triage", TRIAGE), ("plain", PLAIN), ("column", COLUMN)):
        source = root / f"{name}.py"
        source.write_text(textwrap.dedent(code))
        path = root / name
        with warnings.catch_warnings():  # mlflow's advice to add an input example
            warnings.simplefilter("ignore")
            mlflow.pyfunc.save_model(path=str(path), python_model=str(source), signature=signatures[name], pip_requirements=[])
        paths[name] = str(path)
    return paths


def custom_endpoints(paths: dict[str, str]) -> list[dict]:
    """Registry entries serving the models in-process (``model_uri``)."""
    return [{"name": name, "config": {"served_entities": [{"name": name, "model_uri": path, "task": "llm/v1/completions"}]}}
            for name, path in paths.items()]
