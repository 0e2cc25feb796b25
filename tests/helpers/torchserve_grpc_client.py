"""Call TorchServe's own gRPC ``Predictions`` with stubs generated from its ``inference.proto``.

Run in its own process (the stubs and ``google.rpc.status_pb2`` live in a generated folder put
on ``sys.path``). Prints one JSON report: ``Ping``'s health, the decoded prediction body of ``IMAGE.png``, and
the gRPC code and body (or error details) of a request with corrupt image bytes.
Usage: python torchserve_grpc_client.py STUB_DIR ADDRESS MODEL IMAGE.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(stub_dir: str, address: str, model: str, image_path: str) -> None:
    sys.path.insert(0, stub_dir)
    import grpc
    import torchserve_inference_pb2 as messages
    import torchserve_inference_pb2_grpc as services
    from google.protobuf.empty_pb2 import Empty

    image = Path(image_path).read_bytes()
    with grpc.insecure_channel(address) as channel:
        stub = services.InferenceAPIsServiceStub(channel)
        report: dict[str, object] = {"ping": json.loads(stub.Ping(Empty()).health)}
        reply = stub.Predictions(
            messages.PredictionsRequest(model_name=model, input={"data": image}), timeout=60
        )
        report["prediction"] = json.loads(reply.prediction)
        try:
            bad = stub.Predictions(
                messages.PredictionsRequest(model_name=model, input={"data": b"corrupt"}),
                timeout=60,
            )
            report["bad"] = {"code": "OK", "details": bad.prediction.decode()}
        except grpc.RpcError as error:
            report["bad"] = {"code": error.code().name, "details": error.details()}
    print(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:5])
