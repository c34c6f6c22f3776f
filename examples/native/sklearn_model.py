"""A scikit-learn Pipeline (scaling, then a logistic regression) on the bundled breast cancer data,
saved with joblib and uploaded as it is. Needs a running stack (`joey up --detach`).

    python examples/native/sklearn_model.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import joblib
import numpy as np
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import joey

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import serve_and_compare  # noqa: E402


def main(client: joey.Client, folder: Path) -> float:
    x, y = load_breast_cancer(return_X_y=True)
    x_train, x_test, y_train, _ = train_test_split(x.astype(np.float32), y, test_size=20, random_state=0)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x_train, y_train)
    path = folder / "cancer.joblib"
    joblib.dump(model, path)
    return serve_and_compare(
        client, "cancer-sklearn", path, "sklearn", x_test, model.predict_proba(x_test), "probabilities"
    )


if __name__ == "__main__":
    with joey.Client() as client, tempfile.TemporaryDirectory() as folder:
        main(client, Path(folder))
