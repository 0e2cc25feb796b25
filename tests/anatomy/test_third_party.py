"""Models nobody here wrote: Hugging Face ``transformers`` architectures built from small
configs with random weights (nothing is downloaded), explained with ``target_layer=None``.

The builders live in ``hf_factories.py`` (shared with the serving tests): transformers'
default init (std 0.02) makes deep CNN activations collapse to a constant, so convolutions
are re-initialised (He) and BatchNorm set to weight 1, bias 0.
"""

from __future__ import annotations

import pytest
import torch
from model_helpers import plain_classifier
from torch import nn

import fam_core
from fam_core import FAM, L2CAF, GradCAM, GradFAM, ScoreFAM
from fam_core.anatomy.discovery import find_layers

transformers = pytest.importorskip("transformers")

from hf_factories import SIZE, build  # noqa: E402

EXPECTED_LAYER = {
    "resnet": "encoder.stages.3",
    "resnet_classifier": "resnet.encoder.stages.3",
    "convnext": "encoder.stages.3",
    "mobilenetv2": "conv_1x1",
    "vit": "layers.1",  # the class token reads the patches through the last block
    "dinov2": "encoder.layer.1",
    "swin": "layernorm",  # mean of the last stage's tokens
}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", sorted(EXPECTED_LAYER))
def test_target_layer_is_found_from_the_dataflow(name: str) -> None:
    model = build(name)
    assert FAM(model).target_layer == EXPECTED_LAYER[name]
    search = find_layers(model, (SIZE, SIZE))
    assert search.chosen == EXPECTED_LAYER[name]
    assert EXPECTED_LAYER[name] in str(search)


@pytest.mark.parametrize("name", ["resnet", "convnext", "vit"])
def test_an_exported_program_gets_the_eager_models_layer(name: str, tmp_path) -> None:
    """``torch.export.unflatten`` rebuilds ModuleLists as containers of children named
    by index, and an encoder that returns its last stage's tensor: the layer keeps the
    eager model's name."""
    from fam_core.models.sources import load_exported_program

    model = build(name)
    batch = torch.export.Dim("batch", min=1, max=8)
    program = torch.export.export(
        model, (torch.rand(2, 3, SIZE, SIZE),), dynamic_shapes=({0: batch},)
    )
    torch.export.save(program, tmp_path / "model.pt2")
    unflattened = load_exported_program(tmp_path / "model.pt2")
    found = find_layers(unflattened, (SIZE, SIZE), output="pooler_output").chosen
    assert found == EXPECTED_LAYER[name]


def test_vit_last_block_patches_do_not_reach_the_class_token() -> None:
    search = find_layers(build("vit"), (SIZE, SIZE))
    by_name = {c.name: c for c in search.candidates}
    assert not by_name["layers.2"].reaches_output  # LayerNorm + class token only
    assert by_name["layers.1"].reaches_output
    assert by_name["layers.1"].layout.prefix == 1 and by_name["layers.1"].layout.grid == (4, 4)


METHODS = [
    (FAM, {}),
    (GradFAM, {}),
    (ScoreFAM, {"batch_size": 256, "top_k": 16}),
    (GradCAM, {}),
    (L2CAF, {"iterations": 10}),
]


@pytest.mark.parametrize("name", sorted(EXPECTED_LAYER))
@pytest.mark.parametrize(("method", "options"), METHODS, ids=lambda m: getattr(m, "__name__", ""))
def test_every_method_runs_and_a_batch_equals_its_items(name, method, options, images) -> None:
    model = build(name)
    explainer = method(model, None, **options)
    if name == "resnet_classifier":
        target = 3 if method is not L2CAF else None
    else:
        target = None if method is L2CAF else explainer.embed(images[:2])
    batch = explainer(images, target=target)
    assert batch.maps.shape == (3, SIZE, SIZE)
    assert float(batch.maps.min()) >= 0 and float(batch.maps.max()) <= 1
    if method is not L2CAF:  # L2-CAF's optimiser sums the losses of the batch
        single = explainer(images[1:2], target=target)
        torch.testing.assert_close(batch.raw[1:2], single.raw, atol=1e-4, rtol=1e-3)


def test_convnext_head_is_the_layernorm_jacobian(images) -> None:
    """Pooling is a functional mean, then LayerNorm: the head is not linear. The default
    (``jacobian``) must equal FAM with the correct head given by hand."""
    model = build("convnext")
    refs = FAM(model).embed(images[:2])
    found = FAM(model)(images, target=refs)
    assert found.extras["head"] == "jacobian"
    by_hand = FAM(model, "encoder.stages.3", head=model.layernorm)(images, target=refs)
    torch.testing.assert_close(found.weights, by_hand.weights, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(found.maps, by_hand.maps, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="not linear"):
        FAM(model, nonlinear_head="error")(images, target=refs)


def test_class_token_fam_is_the_jacobian_of_the_last_block(images) -> None:
    """FAM of a class-token ViT maps eq. 15 weights through the Jacobian of the blocks after
    the target layer: checked against torch.autograd.functional.jacobian."""
    model = build("vit")
    explainer = FAM(model)
    refs = explainer.embed(images[:2])
    explanation = explainer(images[:1], target=refs)
    layer = dict(model.named_modules())["layers.1"]

    def embedding_of(patches: torch.Tensor) -> torch.Tensor:  # patches [16, 32]
        def replace(_module, _inputs, output):  # noqa: ANN001, ANN202
            return torch.cat([output[:, :1], patches.unsqueeze(0)], dim=1)

        handle = layer.register_forward_hook(replace)
        try:
            return model(images[:1]).pooler_output[0]
        finally:
            handle.remove()

    with torch.no_grad():
        tokens = {}
        handle = layer.register_forward_hook(lambda _m, _i, o: tokens.setdefault("x", o))
        embedding = model(images[:1]).pooler_output[0]
        handle.remove()
    jacobian = torch.autograd.functional.jacobian(embedding_of, tokens["x"][0, 1:])  # [D, 16, N]
    cosines = torch.nn.functional.cosine_similarity(embedding.unsqueeze(0), refs)
    per_pair = embedding * refs / (embedding.norm() * refs.norm(dim=1, keepdim=True))
    weights = (per_pair / cosines.abs().unsqueeze(1)).mean(0)  # eq. 15, 11
    expected = torch.einsum("d,dpn->n", weights, jacobian)
    torch.testing.assert_close(
        explanation.extras["channel_contributions"][0], expected, atol=1e-5, rtol=1e-4
    )
    assert explanation.extras["head"] == "jacobian"


class MeanTokenViT(nn.Module):
    """A ViT whose embedding is the mean of its patch tokens after the final LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.vit = build("vit")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit(images).last_hidden_state[:, 1:].mean(dim=1)


def test_token_mean_embedding_follows_eq_11_18_exactly(images) -> None:
    model = MeanTokenViT().eval()
    explainer = FAM(model)
    assert explainer.target_layer == "vit.layernorm"
    refs = explainer.embed(images[:2])
    explanation = explainer(images, target=refs)
    assert explanation.extras["head"] == "identity"  # the embedding is the pooled map
    embedding = model(images)
    per_pair = (
        embedding.unsqueeze(1)
        * refs
        / (embedding.norm(dim=1)[:, None, None] * refs.norm(dim=1)[None, :, None])
    )
    expected = (per_pair / per_pair.sum(2, keepdim=True).abs()).mean(1)  # eq. 15, 11, W = I
    torch.testing.assert_close(explanation.extras["channel_contributions"], expected)


def test_an_identity_head_that_does_not_reproduce_the_output_is_refused(images) -> None:
    model = build("vit")  # the embedding is not the mean of the patches
    with pytest.raises(ValueError, match="does not reproduce"):
        FAM(model, "layers.1", head=None)(images, target=torch.rand(32))


class ChannelLast(nn.Module):
    """timm-Swin style: ``[B, h, w, C]`` features, a mean over the grid, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.patches = nn.Conv2d(3, 8, 8, stride=8)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 6)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.norm(self.patches(images).permute(0, 2, 3, 1))
        return self.fc(features.mean(dim=(1, 2)))


def test_channel_last_features_and_a_functional_mean_head(images) -> None:
    torch.manual_seed(3)
    model = ChannelLast().eval()
    image = torch.rand(2, 3, 48, 64)  # non-square: a 6 x 8 grid
    explainer = FAM(model, input_size=(48, 64))
    assert explainer.target_layer == "norm"
    refs = torch.randn(2, 6)
    explanation = explainer(image, target=refs)
    assert explanation.raw.shape == (2, 6, 8) and explanation.maps.shape == (2, 48, 64)
    assert explanation.extras["head"] == "linear"
    embedding = model(image)
    per_pair = (
        embedding.unsqueeze(1)
        * refs
        / (embedding.norm(dim=1)[:, None, None] * refs.norm(dim=1)[None, :, None])
    )
    weights = (per_pair / per_pair.sum(2, keepdim=True).abs()).mean(1)
    expected = weights @ model.fc.weight  # eq. 18 with the real matrix
    torch.testing.assert_close(
        explanation.extras["channel_contributions"], expected.detach(), atol=1e-5, rtol=1e-4
    )


def test_class_index_targets_on_plain_modules() -> None:
    torch.manual_seed(4)
    classifier = plain_classifier()
    image = torch.rand(2, 3, 16, 16)
    explanation = GradCAM(classifier)(image, target=3)
    features = classifier[1](classifier[0](image)).detach()
    weights = classifier[4].weight[3].detach() / 256  # d y_3 / dA, averaged (eq. 3)
    expected = torch.relu(torch.einsum("n,bnhw->bhw", weights, features))
    torch.testing.assert_close(explanation.raw, expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        GradCAM(classifier)(image, target=4)
    with pytest.raises(TypeError, match="classifier"):
        GradCAM(classifier, task="embedding")(image, target=3)


def test_logits_output_means_a_classifier_and_none_is_the_top_class(images) -> None:
    model = build("resnet_classifier")
    explainer = GradCAM(model)
    top = model(images).logits.argmax(dim=1).tolist()
    torch.testing.assert_close(explainer(images).raw, explainer(images, target=top).raw)
    assert explainer.task == "classifier"


def test_output_selection(images) -> None:
    model = build("resnet")
    by_key = FAM(model, output="pooler_output").embed(images)
    assert by_key.shape == (3, 64)
    torch.testing.assert_close(FAM(model).embed(images), by_key)
    by_callable = FAM(model, output=lambda out: out.pooler_output.flatten(1) * 2).embed(images)
    torch.testing.assert_close(by_callable, 2 * by_key)
    with pytest.raises(ValueError, match="no 'embeds'"):
        FAM(model, "encoder.stages.3", output="embeds").embed(images)
    with pytest.raises(TypeError, match="output must be"):
        FAM(model, "encoder.stages.3", output=1.5)


def test_a_1x1_map_is_flagged_not_drawn_as_noise() -> None:
    model = fam_core.models.backbones.resnet18().eval()
    explanation = FAM(model, "layer4")(torch.rand(2, 3, 32, 32), target=torch.rand(512))
    assert explanation.raw.shape[-2:] == (1, 1)
    assert torch.equal(explanation.maps, torch.zeros(2, 32, 32))
    assert explanation.extras["flat"].tolist() == [True, True]


def test_channels_last_memory_and_bfloat16(images) -> None:
    model = build("resnet")
    refs = FAM(model).embed(images[:2])
    plain = FAM(model)(images, target=refs)
    last = FAM(model.to(memory_format=torch.channels_last))(
        images.contiguous(memory_format=torch.channels_last), target=refs
    )
    torch.testing.assert_close(last.maps, plain.maps, atol=1e-5, rtol=1e-4)
    half = FAM(build("resnet").to(torch.bfloat16))(images, target=refs)
    assert half.maps.dtype == torch.float32
    assert float((half.maps - plain.maps).abs().mean()) < 0.05


@pytest.mark.parametrize("name", ["resnet", "vit"])
@pytest.mark.parametrize("method", [FAM, GradFAM])
def test_float16_models_explain_like_float32(name: str, method: type, images) -> None:
    """A half-precision model (as served on a GPU; CPU kernels here) gives float32 maps
    within float16 rounding of the float32 model's, weights in the model's dtype."""
    full = method(build(name))
    references = full.embed(images[:2])
    expected = full(images, target=references)
    half = method(build(name).half())(images, target=references.half())
    assert half.maps.dtype == torch.float32 and half.weights.dtype == torch.float16
    assert float((half.maps - expected.maps).abs().max()) < 0.03
    correlation = torch.corrcoef(torch.stack([half.maps.flatten(), expected.maps.flatten()]))
    assert float(correlation[0, 1]) > 0.999


def test_captum_methods_on_a_model_output_object(images) -> None:
    from captum.attr import IntegratedGradients, LayerGradCam

    from fam_core.captum import GradCAMAttribution, SimilarityForward

    model = build("resnet")
    refs = FAM(model).embed(images[:2])
    forward = SimilarityForward(model, refs, output="pooler_output")
    layer = dict(model.named_modules())["encoder.stages.3"]
    ours = GradCAMAttribution(forward, layer).attribute(images)
    captum = LayerGradCam(forward, layer).attribute(images, relu_attributions=True)
    torch.testing.assert_close(ours, captum, atol=1e-5, rtol=1e-4)
    assert IntegratedGradients(forward).attribute(images[:1], n_steps=4).shape == (1, 3, SIZE, SIZE)
