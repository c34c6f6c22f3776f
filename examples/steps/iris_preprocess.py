"""Pre-processing step for the iris classifier: four measurements in millimetres, one field each,
become the model's ``features`` vector in centimetres.

Upload it as a python step (see docs/python-steps.md)::

    client.upload_model(
        "iris-prep", "examples/steps/iris_preprocess.py", framework="python",
        input_schema=pa.schema([(name, pa.float64()) for name in FIELDS]),
        output_schema=pa.schema([("features", pa.list_(pa.float32(), 4))]),
    )
"""

import numpy as np

FIELDS = ("sepal_length_mm", "sepal_width_mm", "petal_length_mm", "petal_width_mm")


def process_data(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    columns = [inputs[name] for name in FIELDS]
    for name, column in zip(FIELDS, columns, strict=True):
        # Raising fails the offending records (they go to the errors topic); the others are answered.
        if (column <= 0).any():
            raise ValueError(f"{name} must be positive, got {column.min()}")
    return {"features": (np.stack(columns, axis=1) / 10.0).astype(np.float32)}
