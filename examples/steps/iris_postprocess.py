"""Post-processing step for the iris classifier: its ``label`` and ``probabilities`` become a species
name and the model's confidence in it.

Upload it as a python step (see docs/python-steps.md)::

    client.upload_model(
        "iris-post", "examples/steps/iris_postprocess.py", framework="python",
        input_schema={"label": ("int64", (-1,)), "probabilities": ("float32", (-1, 3))},
        output_schema={"species": ("string", (-1,)), "confidence": ("float32", (-1,))},
    )
"""

import numpy as np

SPECIES = np.array(["setosa", "versicolor", "virginica"])


def process_data(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    label = inputs["label"]
    return {"species": SPECIES[label], "confidence": inputs["probabilities"].max(axis=1)}
