"""Test configuration, the tiny models the explainer tests share, and the serving fixtures.

A serving test module defines a module-scoped ``server`` fixture (a started ``FamServer``,
``serving_helpers.running_server``); ``channel`` and ``stub`` here reach it over loopback, and
``model_dir`` is the default model folder (``serving_helpers.make_model_dir``).

The client scripts that tests run in subprocesses are not test modules.

``tests/helpers/oip_client.py`` imports tritonclient, whose protobuf package ``inference`` clashes with
our generated stubs in one process, so neither it nor the TorchServe gRPC client is imported
by collection (``--doctest-modules`` would import them).
"""

import importlib.util

import pytest
import torch
from torch import nn

from fam_core.models.backbones import conv4

collect_ignore = ["helpers/oip_client.py", "helpers/torchserve_grpc_client.py"]
if importlib.util.find_spec("transformers") is None:  # its doctest imports transformers
    collect_ignore.append("helpers/hf_factories.py")


@pytest.fixture(scope="module")
def classifier() -> nn.Module:
    torch.manual_seed(0)
    return conv4(num_classes=5, width=0.25).eval()


@pytest.fixture(scope="module")
def embedder() -> nn.Module:
    torch.manual_seed(2)
    return conv4(width=0.25, embedding_dim=8).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, 84, 84, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def references() -> torch.Tensor:
    return torch.randn(3, 8, generator=torch.Generator().manual_seed(4))


@pytest.fixture(scope="module")
def ray_session(request):  # type: ignore[no-untyped-def]
    """A local Ray session for a test module, started and ended as a bulk job's own
    (:func:`fam_core.bulk.session.ray_session`: a temporary folder removed at the end, a start
    that timed out tried once more); ``RAY_CPUS`` in the module: its CPUs, default 2 (the actor
    of a job stopped by an exception may hold one a while)."""
    import ray

    from fam_core.bulk.session import ray_session as local_ray

    with local_ray(None, getattr(request.module, "RAY_CPUS", 2)):
        yield ray


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):  # type: ignore[no-untyped-def]
    """A module's folder of the random-init default models."""
    from serving_helpers import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def channel(server):  # type: ignore[no-untyped-def]
    """A plaintext gRPC channel to the module's ``server``."""
    from serving_helpers import loopback

    with loopback(server.port) as opened:
        yield opened


@pytest.fixture(scope="module")
def stub(channel):  # type: ignore[no-untyped-def]
    """A ``fam.v1`` stub on ``channel``."""
    from fam_core.server.stubs import fam_pb2_grpc

    return fam_pb2_grpc.FamServiceStub(channel)
