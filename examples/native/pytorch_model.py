"""A small PyTorch network trained on the bundled iris data, saved as TorchScript (torch.jit.save) and
uploaded with its input schema: a saved module does not say what it takes. An ExportedProgram
(torch.export.save, exported with a dynamic batch dimension) uploads the same way. Needs a running
stack (`joey up --detach`).

    python examples/native/pytorch_model.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from sklearn.datasets import load_iris
from sklearn.model_selection import train_test_split

import joey

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import serve_and_compare  # noqa: E402


class Classifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.layers(x), dim=-1)


def main(client: joey.Client, folder: Path) -> float:
    x, y = load_iris(return_X_y=True)
    x_train, x_test, y_train, _ = train_test_split(x.astype(np.float32), y, test_size=20, random_state=0)
    torch.manual_seed(0)
    model = Classifier()
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    inputs, targets = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for _ in range(200):
        optimiser.zero_grad()
        torch.nn.functional.nll_loss(torch.log(model(inputs)), targets).backward()
        optimiser.step()
    model.eval()
    path = folder / "iris.pt"
    torch.jit.save(torch.jit.script(model), path)
    with torch.no_grad():
        native = model(torch.from_numpy(x_test)).numpy()
    schema = pa.schema([pa.field("input", pa.list_(pa.float32(), 4))])
    return serve_and_compare(
        client, "iris-pytorch", path, "pytorch", x_test, native, "output", input_schema=schema
    )


if __name__ == "__main__":
    with joey.Client() as client, tempfile.TemporaryDirectory() as folder:
        main(client, Path(folder))
