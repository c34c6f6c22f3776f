"""An XGBoost regressor on the bundled diabetes data, saved with save_model (.ubj; .json works too)
and uploaded as it is. Needs a running stack (`joey up --detach`).

    python examples/native/xgboost_model.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import xgboost
from sklearn.datasets import load_diabetes
from sklearn.model_selection import train_test_split

import joey

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import serve_and_compare  # noqa: E402


def main(client: joey.Client, folder: Path) -> float:
    x, y = load_diabetes(return_X_y=True)
    x_train, x_test, y_train, _ = train_test_split(x.astype(np.float32), y, test_size=20, random_state=0)
    model = xgboost.XGBRegressor(n_estimators=50, max_depth=4).fit(x_train, y_train)
    path = folder / "diabetes.ubj"
    model.save_model(path)
    return serve_and_compare(
        client, "diabetes-xgboost", path, "xgboost", x_test, model.predict(x_test), "variable"
    )


if __name__ == "__main__":
    with joey.Client() as client, tempfile.TemporaryDirectory() as folder:
        main(client, Path(folder))
