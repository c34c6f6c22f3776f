"""Train the example classifiers on scikit-learn's bundled iris data and export them to ONNX.

Each model takes one input, ``features`` (float32, shape [batch, 4]), and returns ``label``
(int64, [batch]) and ``probabilities`` (float32, [batch, 3]), so they can stand in for each other
(shadow challengers, A/B split arms). Nothing is downloaded.

    python examples/train_model.py examples/model/iris.onnx
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from skl2onnx import to_onnx
from sklearn.datasets import load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

HERE = Path(__file__).resolve().parent


def train_and_export(path: Path, kind: str = "forest") -> Path:
    """``kind``: "forest" (a random forest) or "logreg" (a logistic regression)."""
    iris = load_iris()
    x = iris.data.astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, iris.target, test_size=0.3, random_state=7)
    estimators = {
        "forest": lambda: RandomForestClassifier(n_estimators=20, max_depth=5, random_state=7),
        "logreg": lambda: LogisticRegression(max_iter=500),
    }
    model = estimators[kind]().fit(x_train, y_train)
    onnx_model = to_onnx(
        model,
        initial_types=None,
        X=x_train[:1],
        options={id(model): {"zipmap": False}},
        target_opset=17,
    )
    # Give the input a name a record author can guess.
    onnx_model.graph.input[0].name = "features"
    for node in onnx_model.graph.node:
        node.input[:] = ["features" if name == "X" else name for name in node.input]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(onnx_model.SerializeToString())
    print(f"trained on {len(x_train)} rows, test accuracy {model.score(x_test, y_test):.3f}; wrote {path}")
    return path


def make_records(count: int, seed: int = 0) -> list[dict[str, list[float]]]:
    """Input records for the model: iris rows with a little noise, one JSON object each."""
    rng = np.random.default_rng(seed)
    data = load_iris().data
    rows = data[rng.integers(0, len(data), count)] + rng.normal(0, 0.05, (count, data.shape[1]))
    return [{"features": [round(float(v), 3) for v in row]} for row in rows]


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "model" / "iris.onnx"
    train_and_export(target)
    records_path = HERE / "records.json"
    if not records_path.exists():
        records_path.write_text(json.dumps(make_records(20), indent=1) + "\n")
