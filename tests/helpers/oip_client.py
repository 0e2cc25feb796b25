"""Drive the Open Inference Protocol over gRPC with tritonclient.grpc; prints one JSON report.

Run in its own process: tritonclient's stubs and the server's declare the same protobuf
symbols (package ``inference``), which one process's descriptor pool cannot hold twice.
``serving_helpers.oip_client_report`` runs it. Usage, one scenario a call:

- ``python oip_client.py fam URL IMAGE.png``: fam's gRPC server, metadata, outputs, errors;
- ``python oip_client.py kserve URL IMAGE.png``: a KServe model server, explain and errors;
- ``python oip_client.py search URL MODEL PLAIN_MODEL IMAGE.png [IMAGE.png ...]``: a gallery
  search, ``MODEL`` with an index, ``PLAIN_MODEL`` without one.
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

SEARCH_TOP_K = 3


def images_input(*images: bytes) -> triton.InferInput:
    """The ``image`` input: encoded images as one BYTES tensor."""
    tensor = triton.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(list(images), dtype=np.object_))
    return tensor


def encoded(array: np.ndarray) -> dict[str, object]:
    """An array as JSON: its dtype, shape and base64 bytes."""
    return {
        "dtype": str(array.dtype),
        "shape": list(array.shape),
        "data": base64.b64encode(array.tobytes()).decode(),
    }


def heatmap_fields(heatmap: np.ndarray) -> dict[str, object]:
    """A heatmap output as JSON: its dtype, shape and base64 little-endian float16 bytes."""
    return {
        "heatmap_dtype": str(heatmap.dtype),
        "heatmap_shape": list(heatmap.shape),
        "heatmap": base64.b64encode(heatmap.astype("<f2").tobytes()).decode(),
    }


def output_parameters(result: triton.InferResult) -> dict[str, dict[str, str]]:
    """The string parameters of each output of ``result``."""
    return {
        o.name: {k: v.string_param for k, v in o.parameters.items()}
        for o in result.get_response().outputs
    }


def status_of(call: Callable[..., object], *args: object, **kwargs: object) -> str:
    """``"no error"``, or the status and message of the error that ``call(*args, **kwargs)``
    raised."""
    try:
        call(*args, **kwargs)
        return "no error"
    except InferenceServerException as error:
        return f"{error.status()} {error.message()}"


def server_state(client: triton.InferenceServerClient) -> dict[str, object]:
    return {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready("default-classifier"),
    }


def fam_report(client: triton.InferenceServerClient, image: bytes) -> dict[str, object]:
    report: dict[str, object] = {
        **server_state(client),
        "unknown_ready": client.is_model_ready("nope"),
        "server": client.get_server_metadata(as_json=True),
        "metadata": client.get_model_metadata("default-embedding", as_json=True),
    }
    for model in ("default-classifier", "default-embedding"):
        result = client.infer(model, [images_input(image, image)], client_timeout=30)
        report[model] = {
            "scores": result.as_numpy("scores").tolist(),
            "label": [x.decode() for x in result.as_numpy("label")],
            "embedding_shape": list(result.as_numpy("embedding").shape),
            **heatmap_fields(result.as_numpy("heatmap")),
            "parameters": output_parameters(result),
        }
    pixels = triton.InferInput("pixels", [1, 3, 84, 84], "UINT8")
    pixels.set_data_from_numpy(np.zeros((1, 3, 84, 84), dtype=np.uint8))
    only = [triton.InferRequestedOutput("heatmap")]
    result = client.infer(
        "default-classifier", [pixels], outputs=only, parameters={"resolution": "feature"}
    )
    report["feature_heatmap_shape"] = list(result.as_numpy("heatmap").shape)
    report["feature_outputs"] = [o.name for o in result.get_response().outputs]
    result = client.infer(
        "default-classifier", [images_input(image)], parameters={"method": "GradCAM"}
    )
    report["method_any_case"] = output_parameters(result)["heatmap"]
    report["errors"] = {
        name: status_of(
            client.infer, model, [images_input(data)], parameters=parameters, client_timeout=30
        )
        for name, model, data, parameters in (
            ("unknown_model", "nope", image, None),
            ("corrupt", "default-classifier", b"xx", None),
            ("unknown_method", "default-classifier", image, {"method": "gradcm"}),
        )
    }
    return report


def kserve_report(client: triton.InferenceServerClient, image: bytes) -> dict[str, object]:
    report = server_state(client)
    for model, parameters in (
        ("default-classifier", {"method": "gradcam"}),
        ("default-embedding", {}),
    ):
        result = client.infer(model, [images_input(image, image)], parameters=parameters)
        report[model] = {
            "label": [x.decode() for x in result.as_numpy("label")],
            "scores": result.as_numpy("scores").tolist(),
            **heatmap_fields(result.as_numpy("heatmap")),
            "method": result.get_response().outputs[-1].parameters["method"].string_param,
        }
    report["errors"] = {
        name: status_of(client.infer, model, [tensor], parameters=parameters, client_timeout=60)
        for name, model, tensor, parameters in (
            ("corrupt", "default-classifier", images_input(b"xx"), {}),
            ("unknown_method", "default-classifier", images_input(image), {"method": "nope"}),
            ("too_many", "default-classifier", images_input(*[image] * 65), {}),
            ("large_corrupt", "default-classifier", images_input(b"x" * (9 << 20)), {}),  # > 8 MiB
            ("unknown_model", "nope", images_input(image), {}),
        )
    }
    report["after_errors"] = (
        client.infer("default-classifier", [images_input(image)]).as_numpy("label")[0].decode()
    )
    return report


def search_report(
    client: triton.InferenceServerClient, model: str, plain: str, images: list[bytes]
) -> dict[str, object]:
    metadata = client.get_model_metadata(model, as_json=True)
    result = client.infer(
        model,
        [images_input(*images)],
        parameters={"top_k": SEARCH_TOP_K, "explain": "both"},
        client_timeout=60,
    )
    report: dict[str, object] = {
        "model_ready": client.is_model_ready(model),
        "outputs_metadata": {o["name"]: o["datatype"] for o in metadata["outputs"]},
        "outputs": [o.name for o in result.get_response().outputs],
        "neighbour_ids": [[x.decode() for x in row] for row in result.as_numpy("neighbour_ids")],
        "neighbour_labels": [
            [x.decode() for x in row] for row in result.as_numpy("neighbour_labels")
        ],
        "neighbour_scores": encoded(result.as_numpy("neighbour_scores")),
        "heatmaps": encoded(result.as_numpy("heatmaps")),
        "reference_heatmaps": encoded(result.as_numpy("reference_heatmaps")),
        "parameters": output_parameters(result),
    }
    only_ids = client.infer(
        model,
        [images_input(images[0])],
        outputs=[triton.InferRequestedOutput("neighbour_ids")],
        parameters={"top_k": 2, "explain": "none"},
        client_timeout=60,
    )
    report["only_ids"] = [o.name for o in only_ids.get_response().outputs]
    report["only_ids_shape"] = list(only_ids.as_numpy("neighbour_ids").shape)
    report["errors"] = {
        name: status_of(
            client.infer,
            target,
            [images_input(images[0])],
            parameters=parameters,
            outputs=None
            if outputs is None
            else [triton.InferRequestedOutput(output) for output in outputs],
            client_timeout=60,
        )
        for name, target, parameters, outputs in (
            ("top_k", model, {"top_k": 10_000}, None),
            ("explain", model, {"explain": "maybe"}, None),
            ("filter", model, {"filter": "label =="}, None),
            ("no_index", plain, {}, ["neighbour_ids"]),
            ("mixed", model, {}, ["neighbour_ids", "heatmap"]),
        )
    }
    report["still_answering"] = list(
        client.infer(model, [images_input(images[0])], client_timeout=60)
        .as_numpy("neighbour_ids")
        .shape
    )
    return report


def main(scenario: str, url: str, *args: str) -> None:
    client = triton.InferenceServerClient(url)
    if scenario == "search":
        model, plain, *paths = args
        report = search_report(client, model, plain, [Path(p).read_bytes() for p in paths])
    else:
        report = {"fam": fam_report, "kserve": kserve_report}[scenario](
            client, Path(args[0]).read_bytes()
        )
    print(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
