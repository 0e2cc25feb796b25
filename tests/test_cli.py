"""The ``fam`` command line: one-line errors with exit code 2, overlays written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fam_core.cli import main
from fam_core.render import save_png


def write_image(path: Path, seed: int) -> Path:
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(96, 120, 3, generator=generator) * 255).to(torch.uint8)
    return save_png(pixels, path)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["explain", "missing.png"], "no such image file: missing.png"),
        (["explain", "{bad}"], "cannot decode the image"),
        (["explain", "{good}", "--model", "nope"], "unknown model 'nope'"),
        (["explain", "{good}", "--layer", "block9"], "unknown target layer 'block9'"),
        (["demo", "--count", "0"], "count must be between 1 and 16"),
    ],
)
def test_errors_print_one_line_and_exit_2(argv, message, tmp_path, capsys) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    good = write_image(tmp_path / "good.png", 0)
    argv = [a.format(bad=bad, good=good) for a in argv] + ["--out", str(tmp_path / "out")]
    code, _, err = run(argv, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err


def test_usage_error_is_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_explain_writes_overlays(tmp_path, capsys) -> None:
    images = [write_image(tmp_path / f"query{i}.png", i) for i in range(2)]
    reference = write_image(tmp_path / "reference.png", 9)
    out = tmp_path / "out"
    code, stdout, _ = run(
        ["explain", *map(str, images), "--reference", str(reference), "--out", str(out)], capsys
    )
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["query0_fam.png", "query1_fam.png"]
    assert stdout.count("reference 0") == 2


def test_explain_with_the_classifier_names_a_class(tmp_path, capsys) -> None:
    image = write_image(tmp_path / "x.png", 3)
    code, stdout, _ = run(
        ["explain", str(image), "--model", "default-classifier", "--out", str(tmp_path)], capsys
    )
    assert code == 0
    from fam_core.data.flowers import CLASS_NAMES

    assert stdout.split("\t")[1] in CLASS_NAMES


def test_inspect_lists_layers_the_choice_and_the_head(capsys) -> None:
    code, out, _ = run(["inspect", "default-classifier"], capsys)
    assert code == 0
    assert " * block4 " in out and "chosen: block4" in out
    assert "linear: W [48, 64]" in out  # the classifier's 48 x 64 matrix (eq. 16-18)
    code, out, _ = run(["inspect", "default-embedding", "--layer", "block3"], capsys)
    assert "target layer: block3" in out and "jacobian" in out  # block4 + pooling follow it


def test_inspect_an_onnx_file_lists_tensors(tmp_path, capsys) -> None:
    import io
    import warnings

    from fam_core.models.backbones import conv4

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            conv4(width=0.25).eval(), (torch.rand(1, 3, 84, 84),), buffer, dynamo=False
        )
    path = tmp_path / "plain.onnx"
    path.write_bytes(buffer.getvalue())
    code, out, _ = run(["inspect", str(path)], capsys)
    assert code == 0
    assert "chosen target tensor: /block4/pool/MaxPool_output_0" in out
    assert "* /block4/pool/MaxPool_output_0  MaxPool  [B, 16, 5, 5]" in out
    assert "global average pooling" in out


def test_inspect_errors_are_one_line(capsys) -> None:
    code, _, err = run(["inspect", "no-such-model"], capsys)
    assert code == 2 and err.count("\n") == 1 and "unknown model 'no-such-model'" in err
