"""The generated stubs, generated first when missing or stale (see :mod:`fam_core.protos`)."""

from __future__ import annotations

from fam_core.protos import ensure_generated

ensure_generated()

from fam_core._generated.fam.v1 import fam_pb2, fam_pb2_grpc  # noqa: E402
from fam_core._generated.inference import grpc_service_pb2, grpc_service_pb2_grpc  # noqa: E402

__all__ = ["fam_pb2", "fam_pb2_grpc", "grpc_service_pb2", "grpc_service_pb2_grpc"]
