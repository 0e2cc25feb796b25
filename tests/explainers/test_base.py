"""The explainer bases: every method is an Explainer, the eq.-13 ones ChannelExplainers, no stubs."""

from __future__ import annotations

import ast
import inspect
import textwrap

import pytest
import torch
from serving_helpers import make_model_dir, png_bytes

import fam_core
from fam_core.explainers import EXPLAINERS
from fam_core.explainers.base import ChannelExplainer, Explainer
from fam_core.explainers.cam.cam_common import BatchedExplainer, GradientCAM
from fam_core.explainers.cam.layercam import LayerCAM
from fam_core.images.read import decode_image, resize
from fam_core.pipeline import (
    EncodedImage,
    ExplainRequest,
    ModelRegistry,
    Pipeline,
    heatmap_from_bytes,
)

CHANNEL_METHODS = {
    "fam",
    "gradfam",
    "scorefam",
    "cam",
    "gradcam",
    "gradcam++",
    "xgradcam",
    "layercam",
    "scorecam",
    "ablationcam",
    "eigencam",
    "activation",
    "guided-gradcam",
    "relevancecam",
    "liftcam",
}
"""Methods whose map is ``sum_n w_n A^n`` of the target layer (FAM eq. 13), maybe rectified."""
OTHER_METHODS = {"l2caf", "deconvnet", "guided-backprop", "relevant-features"}
"""Methods whose map is something else: an optimised filter, an input-space signal."""
CLASSES = [0, 3]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, 84, 84, generator=torch.Generator().manual_seed(1))


def test_every_registered_method_is_an_explainer() -> None:
    assert EXPLAINERS, "no method is registered"
    for name, cls in EXPLAINERS.items():
        assert issubclass(cls, Explainer), name


def test_exactly_the_template_methods_are_channel_explainers() -> None:
    channel = {name for name, cls in EXPLAINERS.items() if issubclass(cls, ChannelExplainer)}
    assert channel >= CHANNEL_METHODS
    assert not channel & OTHER_METHODS
    assert set(EXPLAINERS) >= OTHER_METHODS
    for name, cls in EXPLAINERS.items():  # methods added later: the structure decides
        assert hasattr(cls, "channel_weights") == issubclass(cls, ChannelExplainer), name


def test_channel_explainer_is_exported() -> None:
    assert fam_core.ChannelExplainer is ChannelExplainer
    assert "ChannelExplainer" in fam_core.__all__
    assert fam_core.explainers.ChannelExplainer is ChannelExplainer


@pytest.mark.parametrize("name", sorted(EXPLAINERS))
def test_channel_weights_are_real_where_they_exist(name, classifier, images) -> None:
    cls = EXPLAINERS[name]
    if not issubclass(cls, ChannelExplainer):
        assert not hasattr(cls, "channel_weights")
        return
    explainer = cls(classifier, "block4")
    forward = explainer.forward(images)
    target = explainer.resolve_target(CLASSES, forward.outputs)
    with torch.set_grad_enabled(explainer.needs_gradients):
        weights, scores, extras = explainer.channel_weights(forward, target, images)
    assert weights.shape == (2, 16)
    assert torch.isfinite(weights).all()
    assert isinstance(extras, dict)
    with torch.no_grad():
        logits = classifier(images)[[0, 1], CLASSES]
    assert torch.allclose(scores.detach(), logits, atol=1e-5)  # a class target: the logit


def _raises_not_implemented(function: object) -> bool:
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))  # type: ignore[arg-type]
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            raised = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(raised, ast.Name) and raised.id == "NotImplementedError":
                return True
    return False


def test_the_stub_detector_detects_a_stub() -> None:
    class Stub:
        def channel_weights(self, *args: object) -> None:
            raise NotImplementedError("call the explainer")

    assert _raises_not_implemented(Stub.channel_weights)
    assert not _raises_not_implemented(ChannelExplainer.__call__)


@pytest.mark.parametrize("name", sorted(EXPLAINERS))
def test_no_method_of_a_registered_class_is_a_not_implemented_stub(name) -> None:
    for owner in EXPLAINERS[name].__mro__:
        if not owner.__module__.startswith("fam_core."):
            continue
        for attribute, value in vars(owner).items():
            if inspect.isfunction(value):
                assert not _raises_not_implemented(value), f"{owner.__name__}.{attribute}"


@pytest.mark.parametrize("name", sorted(EXPLAINERS))
def test_every_method_is_built_the_same_way(name, classifier) -> None:
    options = {"similarity": "dot", "task": "classifier", "input_size": 84}
    explainer = EXPLAINERS[name](classifier, target_layer="block4", **options)
    assert explainer.task == "classifier" and explainer.similarity == "dot"
    assert explainer.target_layer == "block4"


@pytest.mark.parametrize("cls", [Explainer, ChannelExplainer, GradientCAM, BatchedExplainer])
def test_abstract_bases_cannot_be_instantiated(cls, classifier) -> None:
    with pytest.raises(TypeError, match="abstract"):
        cls(classifier, "block4")


def test_input_backprop_needs_a_backward_rule(classifier) -> None:
    from fam_core.explainers.backprop.deconvnet import InputBackprop

    with pytest.raises(TypeError, match="no backward rule"):
        InputBackprop(classifier, "block4")


def test_a_method_must_implement_its_abstract_step(classifier) -> None:
    class NoCall(Explainer):
        method = "no-call"

    class NoWeights(ChannelExplainer):
        method = "no-weights"

    with pytest.raises(TypeError, match="__call__"):
        NoCall(classifier, "block4")
    with pytest.raises(TypeError, match="channel_weights"):
        NoWeights(classifier, "block4")


@pytest.mark.parametrize("name", sorted(CHANNEL_METHODS))
def test_call_is_explain_forward_after_the_forward_pass(name, classifier, images) -> None:
    """The front doors' one-pass path (forward, then explain_forward) equals ``__call__``."""
    explainer = EXPLAINERS[name](classifier, "block4")
    assert type(explainer).__call__ is ChannelExplainer.__call__
    called = explainer(images, CLASSES)
    one_pass = explainer.explain_forward(explainer.forward(images), CLASSES, images)
    for field in ("maps", "raw", "weights", "scores"):
        assert torch.allclose(getattr(called, field), getattr(one_pass, field), atol=1e-6), field
    assert called.extras.keys() == one_pass.extras.keys()


def test_pipeline_explains_layercam_from_one_forward_pass(tmp_path) -> None:
    registry = ModelRegistry.from_directory(make_model_dir(tmp_path))
    served = registry.get("default-classifier")
    passes: list[int] = []
    handle = served.model.block1.register_forward_hook(lambda _m, i, _o: passes.append(1))
    pipeline = Pipeline(registry, batching=None)
    images = [png_bytes(1), png_bytes(2)]
    try:
        response = pipeline.explain(
            ExplainRequest(
                "default-classifier", tuple(EncodedImage(b) for b in images), method="layercam"
            )
        )
        assert passes == [1]  # LayerCAM's map needs no second pass for the prediction
        passes.clear()
        pipeline.explain(
            ExplainRequest("default-classifier", (EncodedImage(images[0]),), method="deconvnet")
        )
        assert passes == [1, 1]  # not a channel explainer: a prediction pass, then its own
    finally:
        handle.remove()
        pipeline.close()
    config = served.config
    inputs = config.normalize(
        torch.stack([resize(decode_image(b), config.input_size) for b in images])
    )
    predicted = [result.prediction.index for result in response.results]
    expected = LayerCAM(served.model, config.target_layer)(inputs, predicted)
    for result, expected_map in zip(response.results, expected.maps, strict=True):
        heatmap = heatmap_from_bytes(result.heatmap.data, result.heatmap.shape)
        assert torch.allclose(heatmap, expected_map, atol=1e-3)  # float16 rounding


def test_an_explanation_copies_its_extras_and_marks_flat_maps() -> None:
    from fam_core.explanation import Explanation

    extras: dict = {"head": "linear"}
    maps = torch.stack([torch.zeros(2, 2), torch.eye(2)])
    explanation = Explanation(
        maps, maps, torch.zeros(2, 1), torch.zeros(2), "fam", "layer4", extras
    )
    assert extras == {"head": "linear"}  # the caller's dict is left as it was
    assert explanation.extras["flat"].tolist() == [True, False]


def test_an_unknown_layout_is_refused_when_the_explainer_is_made(classifier) -> None:
    with pytest.raises(ValueError, match="layout must be 'auto'.*got 'nchw'"):
        fam_core.FAM(classifier, layout="nchw")
