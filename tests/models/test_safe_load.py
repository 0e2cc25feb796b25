"""Weights files that are not PyTorch's: named for what they are, in one line, never loaded."""

from __future__ import annotations

import os
import pickle
import struct

import pytest
import torch

from fam_core.models.safe_load import load_weights_only


def _random_bytes() -> bytes:
    data = bytearray(os.urandom(4096))
    # a zip archive or a pickle may be a torch file, left to torch.load
    while data[:4] == b"PK\x03\x04" or data[0] == 0x80 or data[8] == ord("{"):
        data[0] = (data[0] + 1) % 256
        data[8] = 0
    return bytes(data)


def test_random_bytes_are_not_a_pytorch_weights_file(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(_random_bytes())
    with pytest.raises(ValueError) as error:
        load_weights_only(path, "weights")
    message = str(error.value)
    assert message == (
        f"weights: cannot load {path}: not a PyTorch weights file "
        "(neither a torch.save zip archive nor a pickle)"
    )
    assert "Python objects" not in message


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"\x89HDF\r\n\x1a\n" + bytes(64), "an HDF5 file"),
        (b"\x89PNG\r\n\x1a\n" + bytes(64), "a PNG image"),
        (struct.pack("<Q", 2) + b"{}" + bytes(64), "a safetensors file"),
    ],
    ids=["hdf5", "png", "safetensors"],
)
def test_other_formats_are_named(tmp_path, data, kind):
    path = tmp_path / "weights.pt"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=f"not a PyTorch weights file: it is {kind}"):
        load_weights_only(path, "weights")


def test_torch_files_and_pickles_are_still_told_apart(tmp_path):
    state = {"w": torch.arange(3.0)}
    good = tmp_path / "good.pt"
    torch.save(state, good)
    torch.testing.assert_close(load_weights_only(good, "weights")["w"], state["w"])
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(print))  # a global: refused by weights_only, never run
    with pytest.raises(ValueError, match="Python objects other than tensors"):
        load_weights_only(evil, "weights")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_weights_only(truncated, "weights")
