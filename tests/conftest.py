"""Test configuration: the client scripts that tests run in subprocesses are not test modules.

``tests/oip_client.py`` imports tritonclient, whose protobuf package ``inference`` clashes with
our generated stubs in one process, so neither it nor the TorchServe gRPC client is imported
by collection (``--doctest-modules`` would import them).
"""

collect_ignore = ["oip_client.py", "torchserve_grpc_client.py"]
