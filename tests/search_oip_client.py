"""Search a gallery index over the Open Inference Protocol with tritonclient.grpc; prints one
JSON report.

Run in its own process (see ``oip_client.py``: tritonclient's stubs and the server's declare
the same protobuf symbols). Usage:
``python search_oip_client.py URL MODEL PLAIN_MODEL IMAGE.png [IMAGE.png ...]``: ``MODEL`` has
an index, ``PLAIN_MODEL`` has none.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

TOP_K = 3


def encoded(array: np.ndarray) -> dict[str, object]:
    return {
        "dtype": str(array.dtype),
        "shape": list(array.shape),
        "data": base64.b64encode(array.tobytes()).decode(),
    }


def images_input(images: list[bytes]) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    return tensor


def main(url: str, model: str, plain: str, paths: list[str]) -> None:
    client = triton.InferenceServerClient(url)
    images = [Path(path).read_bytes() for path in paths]
    metadata = client.get_model_metadata(model, as_json=True)
    result = client.infer(
        model,
        [images_input(images)],
        parameters={"top_k": TOP_K, "explain": "both"},
        client_timeout=60,
    )
    response = result.get_response()
    report: dict[str, object] = {
        "model_ready": client.is_model_ready(model),
        "outputs_metadata": {o["name"]: o["datatype"] for o in metadata["outputs"]},
        "outputs": [o.name for o in response.outputs],
        "neighbour_ids": [[x.decode() for x in row] for row in result.as_numpy("neighbour_ids")],
        "neighbour_labels": [
            [x.decode() for x in row] for row in result.as_numpy("neighbour_labels")
        ],
        "neighbour_scores": encoded(result.as_numpy("neighbour_scores")),
        "heatmaps": encoded(result.as_numpy("heatmaps")),
        "reference_heatmaps": encoded(result.as_numpy("reference_heatmaps")),
        "parameters": {
            o.name: {k: v.string_param for k, v in o.parameters.items()} for o in response.outputs
        },
    }
    only_ids = client.infer(
        model,
        [images_input(images[:1])],
        outputs=[triton.InferRequestedOutput("neighbour_ids")],
        parameters={"top_k": 2, "explain": "none"},
        client_timeout=60,
    )
    report["only_ids"] = [o.name for o in only_ids.get_response().outputs]
    report["only_ids_shape"] = list(only_ids.as_numpy("neighbour_ids").shape)
    errors = {}
    for name, target, parameters, outputs in (
        ("top_k", model, {"top_k": 10_000}, None),
        ("explain", model, {"explain": "maybe"}, None),
        ("filter", model, {"filter": "label =="}, None),
        ("no_index", plain, {}, ["neighbour_ids"]),
        ("mixed", model, {}, ["neighbour_ids", "heatmap"]),
    ):
        try:
            client.infer(
                target,
                [images_input(images[:1])],
                parameters=parameters,
                outputs=None
                if outputs is None
                else [triton.InferRequestedOutput(output) for output in outputs],
                client_timeout=60,
            )
            errors[name] = "no error"
        except InferenceServerException as error:
            errors[name] = f"{error.status()} {error.message()}"
    report["errors"] = errors
    report["still_answering"] = list(
        client.infer(model, [images_input(images[:1])], client_timeout=60)
        .as_numpy("neighbour_ids")
        .shape
    )
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
