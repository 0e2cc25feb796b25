"""Drive a KServe model server's gRPC v2 with tritonclient.grpc; prints one JSON report.

Run in its own process: tritonclient's stubs and fam's declare the same protobuf package
``inference``. Usage: python kserve_grpc_client.py URL IMAGE.png
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException


def _images(*images: bytes) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(list(images), dtype=np.object_))
    return tensor


def main(url: str, image_path: str) -> None:
    client = triton.InferenceServerClient(url)
    image = Path(image_path).read_bytes()
    report: dict[str, object] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready("default-classifier"),
    }
    for model, parameters in (
        ("default-classifier", {"method": "gradcam"}),
        ("default-embedding", {}),
    ):
        result = client.infer(model, [_images(image, image)], parameters=parameters)
        heatmap = result.as_numpy("heatmap")
        report[model] = {
            "label": [x.decode() for x in result.as_numpy("label")],
            "scores": result.as_numpy("scores").tolist(),
            "heatmap_dtype": str(heatmap.dtype),
            "heatmap_shape": list(heatmap.shape),
            "heatmap": base64.b64encode(heatmap.astype("<f2").tobytes()).decode(),
            "method": result.get_response().outputs[-1].parameters["method"].string_param,
        }
    errors = {}
    for name, model, tensor, parameters in (
        ("corrupt", "default-classifier", _images(b"xx"), {}),
        ("unknown_method", "default-classifier", _images(image), {"method": "nope"}),
        ("too_many", "default-classifier", _images(*[image] * 65), {}),
        ("large_corrupt", "default-classifier", _images(b"x" * (9 << 20)), {}),  # > 8 MiB
        ("unknown_model", "nope", _images(image), {}),
    ):
        try:
            client.infer(model, [tensor], parameters=parameters, client_timeout=60)
            errors[name] = "no error"
        except InferenceServerException as error:
            errors[name] = f"{error.status()} {error.message()}"
    report["errors"] = errors
    report["after_errors"] = (
        client.infer("default-classifier", [_images(image)]).as_numpy("label")[0].decode()
    )
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
