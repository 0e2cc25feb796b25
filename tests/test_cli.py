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
        (["explain", "{bad}"], "bad.png: cannot identify image file"),
        (["explain", "{good}", "--model", "nope"], "unknown model 'nope'"),
        (["explain", "{good}", "--layer", "block9"], "unknown target layer 'block9'"),
        (["explain", "{good}", "--method", "relevant-features"], "needs fitting"),
        (["explain", "{good}", "--method", "nope"], "unknown method 'nope'"),
        (["explain", "{good}", "--method", "gradcm"], "unknown method 'gradcm' (did you mean"),
        (
            ["explain", "{good}", "--model", "default-classifier", "--target-class", "lily"],
            "--target-class 'lily': expected a class index or a class name (one of [",
        ),
        (
            ["explain", "{good}", "--model", "default-classifier", "--target-class", "48"],
            "target_class must be in [0, 48), got 48",
        ),
        (["explain", "{good}", "--target-class", "0"], "target_class needs a classifier"),
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

    header, row = stdout.splitlines()
    assert header.split("\t") == [
        "# image",
        "label",
        "probability",
        "explained score (logit)",
        "overlay",
    ]
    assert row.split("\t")[1] in CLASS_NAMES


def test_inspect_lists_layers_the_choice_and_the_head(capsys) -> None:
    code, out, _ = run(["inspect", "default-classifier"], capsys)
    assert code == 0
    assert " * block4 " in out and "chosen: block4" in out
    assert "linear: W [48, 64]" in out  # the classifier's 48 x 64 matrix (eq. 16-18)
    code, out, _ = run(["inspect", "default-embedding", "--layer", "block3"], capsys)
    assert "target layer: block3" in out and "jacobian" in out  # block4 + pooling follow it


def test_inspect_an_onnx_file_lists_tensors(tmp_path, capsys) -> None:
    from onnx_helpers import user_export

    from fam_core.models.backbones import conv4

    path = tmp_path / "plain.onnx"
    user_export(conv4(width=0.25).eval(), torch.rand(1, 3, 84, 84), path)
    code, out, _ = run(["inspect", str(path)], capsys)
    assert code == 0
    assert "chosen target tensor: /block4/pool/MaxPool_output_0" in out
    assert "* /block4/pool/MaxPool_output_0  MaxPool  [B, 16, 5, 5]" in out
    assert "global average pooling" in out


def test_inspect_errors_are_one_line(capsys) -> None:
    code, _, err = run(["inspect", "no-such-model"], capsys)
    assert code == 2 and err.count("\n") == 1 and "unknown model 'no-such-model'" in err


def test_fam_alone_prints_the_usage_and_the_commands(capsys) -> None:
    code, out, err = run([], capsys)
    assert code == 2 and out == ""
    assert err.startswith("usage: fam") and "explain" in err and "serve-demo" in err


def test_version(capsys) -> None:
    import fam_core

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"fam-core {fam_core.__version__}"


def test_python_m_fam_core_runs_the_cli() -> None:
    import os
    import subprocess
    import sys

    import fam_core

    root = str(Path(fam_core.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, "-m", "fam_core", "--version"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"fam-core {fam_core.__version__}"


def _subparsers(parser):  # type: ignore[no-untyped-def]
    import argparse

    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def test_help_lists_the_methods_and_every_choice() -> None:
    from fam_core.cli import build_parser
    from fam_core.explainers import EXPLAINERS, available_methods

    parser = build_parser()
    commands = _subparsers(parser)
    explain_help = " ".join(commands["explain"].format_help().split())
    runnable = available_methods(runnable_only=True)
    assert runnable and all(method in explain_help for method in runnable)
    eval_help = " ".join(commands["eval"].format_help().split())
    assert all(method in eval_help for method in EXPLAINERS)  # eval fits what needs fitting
    for name, sub in commands.items():
        text = sub.format_help()
        for action in sub._actions:
            for choice in action.choices or ():
                assert str(choice) in text, (name, action.dest, choice)


@pytest.mark.parametrize(
    "argv",
    [
        ["explain", "{good}", "--model", "default-classifier", "--layer", "layer4"],
        ["export", "default-classifier", "--layer", "layer4", "--out", "{tmp}/x.onnx"],
        ["inspect", "default-classifier", "--layer", "layer4"],
    ],
)
def test_an_unknown_layer_gets_close_matches_and_the_inspect_hint(argv, tmp_path, capsys) -> None:
    good = write_image(tmp_path / "good.png", 0)
    code, _, err = run([a.format(good=good, tmp=tmp_path) for a in argv], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "unknown target layer 'layer4'; did you mean 'block4'?" in err
    assert "run `fam inspect default-classifier` to list the layers" in err


def test_a_method_that_needs_fitting_is_refused_in_one_line(tmp_path, capsys) -> None:
    good = write_image(tmp_path / "good.png", 0)
    argv = ["explain", str(good), "--model", "default-classifier", "--method", "relevant-features"]
    code, out, err = run([*argv, "--out", str(tmp_path)], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "method 'relevant-features' needs fitting" in err and "fam eval" in err


def test_the_servers_offer_only_runnable_methods() -> None:
    from fam_core.explainers import available_methods
    from fam_core.explainers.relevant.relevant import RelevantFeatures
    from fam_core.pipeline import NotFound, ServedModel

    assert RelevantFeatures.needs_fitting
    assert "relevant-features" in available_methods()
    served = ServedModel.load("default-classifier")
    assert "relevant-features" not in served.methods
    assert set(served.methods) == set(available_methods(runnable_only=True))
    with pytest.raises(NotFound, match="needs fitting"):
        served.check_method("relevant-features")


def test_eval_fits_what_declares_needs_fitting(monkeypatch) -> None:
    from types import SimpleNamespace

    from fam_core.evaluation.runner import NotApplicable, build_explainer
    from fam_core.explainers import EXPLAINERS, FAM

    class FittedFAM(FAM):
        method = "fitted-fam"
        needs_fitting = True
        fitted_on: int = 0

        def fit(self, images, labels):  # type: ignore[no-untyped-def]
            self.fitted_on = len(labels)
            return self

    monkeypatch.setitem(EXPLAINERS, "fitted-fam", FittedFAM)
    from fam_core.models.store import load_model

    model, config = load_model("default-classifier")
    setting = SimpleNamespace(
        classifier=True,
        fit_images=torch.rand(3, 3, 84, 84),
        fit_labels=torch.tensor([0, 1, 2]),
        loaded=SimpleNamespace(model=model, config=config),
    )
    explainer = build_explainer("fitted-fam", setting)  # type: ignore[arg-type]
    assert isinstance(explainer, FittedFAM) and explainer.fitted_on == 3
    with pytest.raises(NotApplicable, match="needs fitting"):
        build_explainer("fitted-fam", SimpleNamespace(**{**vars(setting), "classifier": False}))  # type: ignore[arg-type]


def test_a_non_image_file_is_named(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("photo.txt").write_text("not a picture")
    code, out, err = run(["explain", "photo.txt"], capsys)
    assert code == 2 and out == ""
    assert err == "fam: error: photo.txt: cannot identify image file\n"


def test_one_score_convention_on_the_original_image(tmp_path, capsys, monkeypatch) -> None:
    import fam_core.render

    drawn: list[tuple[tuple[int, ...], tuple[int, ...], str]] = []
    real = fam_core.render.overlay_figure

    def spy(image, heatmap, *, title=None, **options):  # type: ignore[no-untyped-def]
        drawn.append((tuple(image.shape), tuple(heatmap.shape), title))
        return real(image, heatmap, title=title, **options)

    monkeypatch.setattr(fam_core.render, "overlay_figure", spy)
    image = write_image(tmp_path / "x.png", 3)  # 96 x 120, not the model's 84 x 84
    code, stdout, err = run(
        ["explain", str(image), "--model", "default-classifier", "--out", str(tmp_path)], capsys
    )
    assert code == 0
    _, row = stdout.splitlines()
    _, label, probability, logit, _ = row.split("\t")
    ((image_shape, heatmap_shape, title),) = drawn
    assert image_shape == (3, 96, 120) and heatmap_shape == (96, 120)
    assert title.splitlines()[1] == f"probability {probability}, explained score (logit) {logit}"
    assert float(logit) > 1.0 >= float(probability)  # the logit and the softmax, both named
    assert label in title.splitlines()[0]
    assert err.startswith("fam: note: default-classifier is a demo model trained on")
    assert "synthetic flowers" in err and err.count("\n") == 1


def test_out_naming_a_file_is_refused_in_one_line(tmp_path, capsys) -> None:
    image = write_image(tmp_path / "x.png", 3)
    taken = tmp_path / "overlays"
    taken.write_text("not a folder")
    code, _, err = run(["explain", str(image), "--out", str(taken)], capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"--out {taken} is a file: expected a folder" in err
    assert taken.read_text() == "not a folder"


def test_method_names_match_ignoring_case(tmp_path, capsys) -> None:
    image = write_image(tmp_path / "x.png", 3)
    argv = ["explain", str(image), "--model", "default-classifier", "--out", str(tmp_path)]
    code, stdout, err = run([*argv, "--method", "GradCAM"], capsys)
    assert code == 0, err
    assert stdout.splitlines()[1].endswith("x_gradcam.png")


def test_target_class_by_index_or_name_explains_that_logit(tmp_path, capsys) -> None:
    """A ``transformers`` ResNet classifier (random weights) from a factory config: the
    explained score is the logit of the class asked for, by index or by name, computed here
    from the model on the pipeline's pixels."""
    pytest.importorskip("transformers")
    import shutil

    import hf_factories

    from fam_core.pipeline import EncodedImage, ModelRegistry, Pipeline, ServedModel

    folder = tmp_path / "resnet"
    folder.mkdir()
    shutil.copy(hf_factories.__file__, folder / "hf_factories.py")
    names = ["ant", "bee", "cat", "dog", "eel"]
    (folder / "config.yaml").write_text(
        "name: resnet\ntask: classifier\nfactory: hf_factories:resnet_classifier\n"
        f"input_size: {hf_factories.SIZE}\nclass_names: [{', '.join(names)}]\n"
    )
    image = write_image(tmp_path / "x.png", 3)
    served = ServedModel.load(str(folder / "config.yaml"))
    pixels = Pipeline(ModelRegistry([served]), batching=None).pixels(
        "resnet", (EncodedImage(image.read_bytes()),)
    )
    mean = torch.tensor(served.config.mean).view(1, 3, 1, 1)
    std = torch.tensor(served.config.std).view(1, 3, 1, 1)
    with torch.no_grad():
        (logits,) = hf_factories.resnet_classifier()((pixels - mean) / std).logits
    predicted = int(logits.argmax())
    other = (predicted + 2) % len(names)
    base = ["explain", str(image), "--model", str(folder / "config.yaml"), "--out", str(tmp_path)]
    rows = {}
    for target in (None, str(other), names[other]):
        code, stdout, err = run([*base, *(["--target-class", target] if target else [])], capsys)
        assert code == 0, err
        rows[target] = stdout.splitlines()[1].split("\t")
    assert rows[None][1] == names[predicted]
    assert float(rows[None][3]) == pytest.approx(float(logits[predicted]), abs=2e-3)
    for target in (str(other), names[other]):
        assert rows[target][1] == names[predicted]  # the label stays the prediction
        assert float(rows[target][3]) == pytest.approx(float(logits[other]), abs=2e-3)
