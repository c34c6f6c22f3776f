"""A LightGBM classifier on the bundled wine data, its booster saved with save_model (text) and
uploaded as it is. Needs a running stack (`joey up --detach`).

    python examples/native/lightgbm_model.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import lightgbm
import numpy as np
from sklearn.datasets import load_wine
from sklearn.model_selection import train_test_split

import joey

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import serve_and_compare  # noqa: E402


def main(client: joey.Client, folder: Path) -> float:
    x, y = load_wine(return_X_y=True)
    x_train, x_test, y_train, _ = train_test_split(x.astype(np.float32), y, test_size=20, random_state=0)
    model = lightgbm.LGBMClassifier(n_estimators=30, verbose=-1).fit(x_train, y_train)
    path = folder / "wine.txt"
    model.booster_.save_model(path)
    return serve_and_compare(
        client, "wine-lightgbm", path, "lightgbm", x_test, model.predict_proba(x_test), "probabilities"
    )


if __name__ == "__main__":
    with joey.Client() as client, tempfile.TemporaryDirectory() as folder:
        main(client, Path(folder))
