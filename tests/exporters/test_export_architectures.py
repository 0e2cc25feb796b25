"""``fam export`` on architectures built from ``transformers`` configs (random weights, nothing
downloaded): the file's outputs equal the torch explainer's, or the export is refused in one
line that names the operator and what to do instead.

CLIP with projection has a position-embedding lookup, which the ONNX exporter names
``embedding`` like the graph's output; Swin V2's pooler averages a channels-last tensor,
which functionalises to ``as_strided_scatter``, an operator with no ONNX translation.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from fam_core import FAM, GradCAM
from fam_core.cli import main
from fam_core.graphs.onnx_runtime import OnnxExplainer

pytest.importorskip("onnxscript")
transformers = pytest.importorskip("transformers")

import hf_factories  # noqa: E402 - needs transformers
from hf_factories import SIZE  # noqa: E402

from fam_core.exporters.dynamo_program import (  # noqa: E402
    UnsupportedOperatorError,
    as_strided_scatter,
    export_program,
)

FACTORIES = Path(hf_factories.__file__)
MEDIAN_POOLING = '''
import torch
from torch import nn


class MedianPooled(nn.Module):
    """A convolution, then the median over positions: an operator ONNX cannot express."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 8, stride=8)

    def forward(self, images):
        return self.conv(images).flatten(2).median(dim=2).values


def build():
    return MedianPooled().eval()
'''


def write_config(folder: Path, factory: str, task: str, output: str | None = None) -> Path:
    folder.mkdir()
    shutil.copy(FACTORIES, folder / FACTORIES.name)
    lines = [f"name: {folder.name}", f"task: {task}", f"factory: {factory}", f"input_size: {SIZE}"]
    if output is not None:
        lines.append(f"output: {output}")
    (folder / "config.yaml").write_text("\n".join(lines) + "\n")
    return folder / "config.yaml"


def images(count: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def close(actual: torch.Tensor, expected: torch.Tensor, what: str, tolerance: float) -> None:
    """Within ``tolerance`` of the expected values' largest magnitude (at least 1)."""
    assert actual.shape == expected.shape, f"{what}: {actual.shape} != {expected.shape}"
    scale = max(1.0, float(expected.abs().max()))
    difference = float((actual.float() - expected.float()).abs().max()) / scale
    assert difference <= tolerance, f"{what}: max |difference| / {scale:.3g} = {difference:.2e}"


def export(config: Path, out: Path, method: str, capsys) -> tuple[int, str, str]:
    code = main(["export", str(config), "--method", method, "--out", str(out)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_clip_with_projection_exports_and_matches_torch(tmp_path, capsys) -> None:
    config = write_config(
        tmp_path / "clip", "hf_factories:clip_with_projection", "embedding", "image_embeds"
    )
    out = tmp_path / "clip.onnx"
    code, stdout, stderr = export(config, out, "fam", capsys)
    assert code == 0, stderr
    assert f"wrote {out} (fam" in stdout
    runner = OnnxExplainer(out)
    assert runner.input_names == ["image", "references"]
    model = hf_factories.clip_with_projection()
    explainer = FAM(model, runner.target_layer, output="image_embeds", input_size=SIZE)
    batch = images()
    references = explainer.embed(images(4, seed=2))
    expected = explainer(batch, target=references)
    actual = runner(batch, references=references)
    with torch.no_grad():
        embedding = model(batch).image_embeds
    close(actual.extras["embedding"], embedding, "embedding", 1e-4)
    close(actual.scores, expected.scores, "explained score", 1e-4)
    close(actual.raw, expected.raw, "heatmap_lowres", 1e-3)
    close(actual.maps, expected.maps, "heatmap", 1e-3)


def test_swinv2_classifier_exports_gradcam_and_matches_torch(tmp_path, capsys) -> None:
    config = write_config(tmp_path / "swinv2", "hf_factories:swinv2_classifier", "classifier")
    out = tmp_path / "swinv2.onnx"
    code, _, stderr = export(config, out, "gradcam", capsys)
    assert code == 0, stderr
    runner = OnnxExplainer(out)
    model = hf_factories.swinv2_classifier()
    explainer = GradCAM(model, runner.target_layer, task="classifier", input_size=SIZE)
    batch = images()
    actual = runner(batch)
    with torch.no_grad():
        logits = model(batch).logits
    close(actual.extras["logits"], logits, "logits", 1e-4)
    classes = actual.extras["class_index"]
    assert classes.tolist() == logits.argmax(dim=1).tolist()
    expected = explainer(batch, target=classes.tolist())
    close(actual.scores, logits.gather(1, classes[:, None]).squeeze(1), "explained logit", 1e-4)
    close(actual.weights, expected.weights, "weights", 1e-3)
    close(actual.maps, expected.maps, "heatmap", 1e-3)


def test_an_operator_without_onnx_form_is_refused_in_one_line(tmp_path, capsys) -> None:
    folder = tmp_path / "median"
    config = write_config(folder, "median_pooling:build", "embedding")
    (folder / "median_pooling.py").write_text(MEDIAN_POOLING)
    code, _, stderr = export(config, tmp_path / "median.onnx", "fam", capsys)
    assert code == 2
    assert stderr.count("\n") == 1, stderr
    assert "aten.median" in stderr and "exported_program:" in stderr
    assert not (tmp_path / "median.onnx").exists()


def test_as_strided_scatter_equals_torchs() -> None:
    generator = torch.Generator().manual_seed(0)
    for shape, size, stride, offset in [
        ((6, 5), (2, 3), (5, 1), 4),
        ((4, 8), (4, 8), (8, 1), 0),
        ((3, 4, 1, 1), (3, 4, 1, 1), (4, 1, 4, 4), 0),
        ((10,), (3, 2), (1, 3), 1),  # overlapping rows are not written twice here
    ]:
        source = torch.randn(shape, generator=generator)
        values = torch.randn(size, generator=generator)
        expected = torch.as_strided_scatter(source, values, size, stride, offset)
        torch.testing.assert_close(
            as_strided_scatter(source, values, size, stride, offset), expected
        )
    assert as_strided_scatter(torch.zeros(4, 3).t(), torch.ones(2), [2], [1]) is NotImplemented


class _Lookup(nn.Module):
    """An ``nn.Embedding`` lookup (ONNX exporter node name ``embedding``) plus the input."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(4, 3)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image + self.table(torch.arange(4)).sum(0)


def test_graph_values_named_like_an_output_are_renamed() -> None:
    import onnxruntime

    module = _Lookup().eval()
    image = torch.randn(2, 3)
    proto = export_program(
        module,
        (image,),
        dynamic_shapes=({},),
        input_names=["image"],
        output_names=["embedding"],
        opset=18,
    )
    session = onnxruntime.InferenceSession(proto.SerializeToString())
    assert [value.name for value in session.get_outputs()] == ["embedding"]
    (result,) = session.run(None, {"image": image.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(result), module(image))


def test_export_program_names_the_missing_operator() -> None:
    class Median(nn.Module):
        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return image.median(dim=1).values

    with pytest.raises(UnsupportedOperatorError, match="aten.median") as caught:
        export_program(
            Median(),
            (torch.randn(2, 5),),
            dynamic_shapes=({},),
            input_names=["image"],
            output_names=["embedding"],
            opset=18,
        )
    assert caught.value.operator == "aten.median"


class _MedianCentred(nn.Module):
    """Convolutions with a median over channels between them, then average pooling and a
    linear layer: a linear head (the TorchScript path) after an operator ONNX lacks."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, stride=4)
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8, 6)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.conv1(images)
        maps = self.conv2(maps - maps.median(dim=1, keepdim=True).values)
        return self.fc(maps.mean(dim=(2, 3)))


def test_a_linear_head_after_an_operator_without_onnx_form_is_refused(tmp_path) -> None:
    from fam_core.exporters import export_model

    with pytest.raises(UnsupportedOperatorError) as caught:
        export_model(_MedianCentred().eval(), method="fam", path=tmp_path / "m.onnx", input_size=32)
    message = str(caught.value)
    assert message.startswith("cannot export fam: the ONNX exporter has no translation for ")
    assert "aten::median" in message and "exported_program:" in message and "\n" not in message
    assert not (tmp_path / "m.onnx").exists()
