"""Every registered explainer on a model that sees only the top-left quadrant of its input.

The model zeroes three quadrants of a 32x32 input, then runs a bias-free conv stack whose
first convolution has kernel = stride = 4 (no padding): cell ``(i, j)`` of the 8x8 target
layer sees exactly the input block ``(i, j)``, so the cells outside the top-left 4x4 are
exactly zero and nothing outside the quadrant reaches the output. A map that shows where the
model looks puts its energy (eq. 19 of the FAM paper) in the quadrant.

Three settings: a classifier explained for its top class (``target=None``; class-oblivious for
L2-CAF), the same classifier for the same class given as an index (class-specific for
L2-CAF), and an
embedding model explained against reference embeddings (reference-targeted).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fam_core.explainers.registry import available_methods, get_explainer
from fam_core.metrics.localisation import energy_pointing_proportion

SIZE, HALF = 32, 16
QUADRANT = torch.zeros(SIZE, SIZE, dtype=torch.bool)
QUADRANT[:HALF, :HALF] = True
# pixels beyond the reach of bilinear upsampling from the quadrant's cells (a cell is 4 px,
# its value blends into the next 2 px): the map there carries only what the outside cells do
FAR = torch.ones(SIZE, SIZE, dtype=torch.bool)
FAR[: HALF + 4, : HALF + 4] = False
SHARE = 0.8  # at least 80 % of the map's energy in the quadrant


class KeepQuadrant(nn.Module):
    """Zero every pixel outside the top-left quadrant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros_like(x)
        mask[..., : x.shape[-2] // 2, : x.shape[-1] // 2] = 1
        return x * mask


def quadrant_net(outputs: int, *, classifier: bool, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential()
    net.add_module("quadrant", KeepQuadrant())
    net.add_module("conv1", nn.Conv2d(3, 8, kernel_size=4, stride=4, bias=False))
    net.add_module("act1", nn.ReLU())
    net.add_module("conv2", nn.Conv2d(8, 8, kernel_size=1, bias=False))
    net.add_module("act2", nn.ReLU())  # the target layer: 8x8 at 32x32
    net.add_module("pool", nn.AdaptiveAvgPool2d(1))
    net.add_module("flat", nn.Flatten())
    net.add_module("fc", nn.Linear(8, outputs, bias=False))
    net.is_classifier = classifier
    return net.eval()


CLASSIFIER = quadrant_net(4, classifier=True, seed=0)
EMBEDDER = quadrant_net(6, classifier=False, seed=1)
IMAGES = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
with torch.no_grad():  # references: embeddings of other images, as a match would give
    REFERENCES = EMBEDDER(torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3)))
    TOP_CLASSES = CLASSIFIER(IMAGES).argmax(dim=1)
SETTINGS = {
    "top class": (CLASSIFIER, None),
    "class index": (CLASSIFIER, TOP_CLASSES.tolist()),
    "references": (EMBEDDER, REFERENCES),
}


def build(method: str, model: nn.Module):
    if method == "relevant-features":  # fitted on labelled images first: the model's own labels
        explainer = get_explainer(method)(model)
        images = torch.rand(24, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            labels = model(images).argmax(dim=1)
        return explainer.fit(images, labels, mu=1.0, num_classes=4)
    return get_explainer(method)(model, "act2")


def applicable(method: str, setting: str) -> bool:
    # relevant features explain classes: their channels are selected per class by a mu-Lasso
    # on labelled images (Oramas et al. eq. 1), so reference embeddings are refused
    return not (method == "relevant-features" and setting == "references")


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("method", available_methods())
def test_the_map_is_in_the_quadrant_the_model_sees(method: str, setting: str) -> None:
    if not applicable(method, setting):
        model, target = SETTINGS[setting]
        with pytest.raises(TypeError, match="class indices"):
            build(method, model)(IMAGES, target)
        return
    model, target = SETTINGS[setting]
    explanation = build(method, model)(IMAGES, target)
    maps = explanation.maps
    assert maps.shape == (3, SIZE, SIZE)
    # Every method: nothing outside the quadrant reaches the output, so nothing there can
    # tell one pixel from another: the map is constant far from the quadrant.
    far = maps[:, FAR]
    assert torch.allclose(far.amax(dim=1), far.amin(dim=1), atol=1e-5), method
    if method == "cam":
        # CAM (eq. 1) is a signed sum without ReLU, then min-max: the outside's zero evidence
        # is shown at the level -min / (max - min), mid-grey where some channels weigh
        # negatively, so no energy threshold holds. What must hold: the raw map is exactly
        # zero outside the quadrant's cells, and the map shows 0 there at exactly that level.
        raw = explanation.raw
        assert raw[:, 4:, :].abs().max() == 0 and raw[:, :, 4:].abs().max() == 0
        low, high = raw.flatten(1).amin(dim=1), raw.flatten(1).amax(dim=1)
        torch.testing.assert_close(far.mean(dim=1), -low / (high - low))
        return
    # Every other map is zero where the activations are (ReLU'd or non-negative weights,
    # gradients and filters that carry nothing there), so at least 80 % of its energy lies in
    # the quadrant. A ReLU'd map may be empty (Grad-CAM when every channel lowers a
    # similarity): then it has no energy outside either, but not every map may be empty.
    energy = maps.flatten(1).sum(dim=1)
    share = energy_pointing_proportion(maps, QUADRANT.expand(3, -1, -1))
    assert torch.equal(explanation.extras["flat"], energy == 0), method  # an empty map says so
    if method == "fam-orthogonal" and setting == "references":
        # Its weights z_n * dS/dz_n sum to z . grad cos(z, r) = 0 (the gradient of a cosine is
        # orthogonal to z): on embeddings of random images, nearly parallel here, the few
        # channels weighted up are outweighed at every position, the ReLU'd map is empty
        # and flagged flat (checked above) rather than drawn from noise.
        assert (share[energy > 0] >= SHARE).all(), f"{method}: {share.tolist()}"
        return
    assert (energy > 0).any(), f"{method}: every map is empty"
    assert (share[energy > 0] >= SHARE).all(), f"{method}: {share.tolist()}"
    if method == "l2caf":
        # The min-max of the served map makes any filter whose outside cells are a hair lower
        # look localised (the old targeted loss left the filter uniform to 1e-6 and passed
        # the check above); the filter itself, |f| / ||f||, must hold the energy.
        raw = explanation.raw  # [3, 8, 8]
        filter_share = raw[:, :4, :4].flatten(1).sum(dim=1) / raw.flatten(1).sum(dim=1)
        assert (filter_share >= SHARE).all(), filter_share.tolist()
        assert (explanation.scores < explanation.extras["initial_loss"]).all()
