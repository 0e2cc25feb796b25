"""Drive the Open Inference Protocol with tritonclient.grpc; prints one JSON report.

Run in its own process: tritonclient's stubs and the server's declare the same protobuf
symbols (package ``inference``), which one process's descriptor pool cannot hold twice.
Usage: python oip_client.py URL IMAGE.png
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException


def main(url: str, image_path: str) -> None:
    client = triton.InferenceServerClient(url)
    image = Path(image_path).read_bytes()
    report: dict[str, object] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready("default-classifier"),
        "unknown_ready": client.is_model_ready("nope"),
        "server": client.get_server_metadata(as_json=True),
        "metadata": client.get_model_metadata("default-embedding", as_json=True),
    }
    for model in ("default-classifier", "default-embedding"):
        images = triton.InferInput("image", [2], "BYTES")
        images.set_data_from_numpy(np.array([image, image], dtype=np.object_))
        result = client.infer(model, [images], client_timeout=30)
        heatmap = result.as_numpy("heatmap")
        report[model] = {
            "scores": result.as_numpy("scores").tolist(),
            "label": [x.decode() for x in result.as_numpy("label")],
            "embedding_shape": list(result.as_numpy("embedding").shape),
            "heatmap_dtype": str(heatmap.dtype),
            "heatmap_shape": list(heatmap.shape),
            "heatmap": base64.b64encode(heatmap.astype("<f2").tobytes()).decode(),
            "parameters": {
                o.name: {k: v.string_param for k, v in o.parameters.items()}
                for o in result.get_response().outputs
            },
        }
    pixels = triton.InferInput("pixels", [1, 3, 84, 84], "UINT8")
    pixels.set_data_from_numpy(np.zeros((1, 3, 84, 84), dtype=np.uint8))
    only = [triton.InferRequestedOutput("heatmap")]
    result = client.infer(
        "default-classifier", [pixels], outputs=only, parameters={"resolution": "feature"}
    )
    report["feature_heatmap_shape"] = list(result.as_numpy("heatmap").shape)
    report["feature_outputs"] = [o.name for o in result.get_response().outputs]
    one = triton.InferInput("image", [1], "BYTES")
    one.set_data_from_numpy(np.array([image], dtype=np.object_))
    result = client.infer("default-classifier", [one], parameters={"method": "GradCAM"})
    heatmap = next(o for o in result.get_response().outputs if o.name == "heatmap")
    report["method_any_case"] = {k: v.string_param for k, v in heatmap.parameters.items()}
    errors = {}
    for name, model, data, parameters in (
        ("unknown_model", "nope", image, None),
        ("corrupt", "default-classifier", b"xx", None),
        ("unknown_method", "default-classifier", image, {"method": "gradcm"}),
    ):
        bad = triton.InferInput("image", [1], "BYTES")
        bad.set_data_from_numpy(np.array([data], dtype=np.object_))
        try:
            client.infer(model, [bad], parameters=parameters, client_timeout=30)
            errors[name] = "no error"
        except InferenceServerException as error:
            errors[name] = f"{error.status()} {error.message()}"
    report["errors"] = errors
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
