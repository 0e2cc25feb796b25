"""TLS on a real server on loopback: a secure call succeeds, a plaintext one does not."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from serving_helpers import loopback, make_model_dir, png_bytes, running_server

from fam_core.pipeline import EncodedImage, ExplainRequest, ModelRegistry, heatmap_from_bytes
from fam_core.server import ServerConfig
from fam_core.server.stubs import fam_pb2, fam_pb2_grpc

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(
    OPENSSL is None, reason="needs the openssl CLI to make a self-signed certificate"
)


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate and key for ``localhost`` and ``127.0.0.1``."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("tls")
    cert, key = self_signed_certificate(root)
    registry = ModelRegistry.from_directory(make_model_dir(root / "models"))
    config = ServerConfig(port=0, tls_cert=cert, tls_key=key, batching=None)
    with running_server(registry, config) as server:
        yield server, cert


def explain_request() -> fam_pb2.ExplainRequest:
    return fam_pb2.ExplainRequest(
        model="default-classifier", images=[fam_pb2.Image(encoded=png_bytes(7))]
    )


def test_secure_call_with_the_certificate_as_root(tls_server) -> None:
    server, cert = tls_server
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    request = ExplainRequest("default-classifier", (EncodedImage(png_bytes(7)),))
    expected = server.pipeline.explain(request).results[0]
    for host in ("localhost", "127.0.0.1"):  # both names are in the certificate
        with grpc.secure_channel(f"{host}:{server.port}", credentials) as channel:
            reply = fam_pb2_grpc.FamServiceStub(channel).Explain(explain_request(), timeout=30)
        (result,) = reply.results
        assert result.prediction.index == expected.prediction.index
        assert list(result.scores) == pytest.approx(expected.scores, abs=1e-6)
        heatmap = heatmap_from_bytes(result.heatmap.data, tuple(result.heatmap.shape))
        assert heatmap.shape == (84, 84)
        assert heatmap.min() == 0.0 and heatmap.max() == 1.0


def test_plaintext_and_untrusted_channels_fail(tls_server, tmp_path) -> None:
    server, _cert = tls_server
    with (
        loopback(server.port) as channel,
        pytest.raises(grpc.RpcError) as caught,
    ):
        fam_pb2_grpc.FamServiceStub(channel).Explain(explain_request(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    other, _key = self_signed_certificate(tmp_path)  # a root that did not sign the server's
    credentials = grpc.ssl_channel_credentials(root_certificates=other.read_bytes())
    with (
        grpc.secure_channel(f"localhost:{server.port}", credentials) as channel,
        pytest.raises(grpc.RpcError) as caught,
    ):
        fam_pb2_grpc.FamServiceStub(channel).Explain(explain_request(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
