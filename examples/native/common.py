"""What every native-model example does once it has saved its model: upload it as it is (the registry
converts it to ONNX and checks the conversion), deploy it, infer held-out rows and compare the served
predictions with the native library's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

import joey

TOLERANCE = 1e-3  # the registry's own check: |served - native| <= 1e-3 + 1e-3 x |native|


def serve_and_compare(
    client: joey.Client,
    name: str,
    path: Path,
    framework: str,
    rows: np.ndarray,
    native: np.ndarray,
    column: str,
    **upload: Any,
) -> float:
    """Upload, deploy, infer ``rows`` and return the largest difference from ``native`` in output
    ``column``; the pipeline is undeployed before returning."""
    model = client.upload_model(name, path, framework=framework, sample_input=rows[:5], **upload)
    print(f"{name} v{model.version}: {model.status}, sha256 {model.sha256[:12]} (ONNX) from {path.name}")
    print("  " + "\n  ".join(model.conversion_log.splitlines()))
    pipeline = client.build_pipeline(f"{name}-pipeline").add_model_step(model)
    pipeline.deploy()
    try:
        served = pipeline.infer([{"input": row.tolist()} for row in rows])
    finally:
        pipeline.undeploy()
    values = np.array(served[f"out.{column}"].tolist(), dtype=np.float64).reshape(native.shape)
    worst = float(np.abs(values - native).max())
    assert np.allclose(values, native, atol=TOLERANCE, rtol=TOLERANCE), f"{name}: served differs by {worst}"
    print(f"  {len(rows)} held-out rows served, at most {worst:.2g} from {framework}'s own predictions")
    return worst
