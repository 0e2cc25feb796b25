"""Resize policies on tiny images, with expectations computed by hand."""

from __future__ import annotations

import pytest
import torch

from fam_core.images.read import resize
from fam_core.images.resize import RESIZE_POLICIES, as_size, fit_image, map_to_original
from fam_core.models.store import ModelConfig
from fam_core.pipeline.preprocess import preprocess

# [1, 2, 4]: two rows of four columns, values k / 8 (exact in float32)
WIDE = torch.arange(8.0).view(1, 2, 4) / 8


def test_crop_cuts_the_centre_without_resampling_when_the_short_side_fits() -> None:
    # target 2x2: scale max(2/2, 2/4) = 1, no resampling; left = (4 - 2) // 2 = 1
    assert fit_image(WIDE, (2, 2), "crop").tolist() == [[[1 / 8, 2 / 8], [5 / 8, 6 / 8]]]


def test_crop_of_a_wide_image_into_a_wide_target() -> None:
    # target 1x4 from 2x4: scale max(1/2, 4/4) = 1: no resampling, top = (2 - 1) // 2 = 0
    assert fit_image(WIDE, (1, 4), "crop").tolist() == [[[0.0, 1 / 8, 2 / 8, 3 / 8]]]


def test_resize_stretches_with_bilinear_half_pixel_centres() -> None:
    rows = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])
    # output row r samples source row (r + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25 (clamped)
    out = fit_image(rows, (4, 2), "resize")
    assert out[0, :, 0].tolist() == [0.0, 0.25, 0.75, 1.0]
    assert out.shape == (1, 4, 2)


def test_letterbox_pads_with_the_fill_colour_around_the_fitted_image() -> None:
    # 2x4 into 4x4: scale min(4/2, 4/4) = 1, no resampling; top = (4 - 2) // 2 = 1
    out = fit_image(WIDE, (4, 4), "letterbox", fill=(0.5,))
    assert out[0, 0].tolist() == [0.5] * 4 and out[0, 3].tolist() == [0.5] * 4
    assert torch.equal(out[0, 1:3], WIDE[0])
    # 2x4 into 2x8: scale min(2/2, 8/4) = 1; left = (8 - 4) // 2 = 2
    out = fit_image(WIDE, (2, 8), "letterbox", fill=(0.0,))
    assert out[0, 0].tolist() == [0.0, 0.0, 0.0, 1 / 8, 2 / 8, 3 / 8, 0.0, 0.0]


def test_letterbox_in_a_config_pads_with_the_mean_which_normalises_to_zero() -> None:
    config = ModelConfig(
        name="m", task="classifier", backbone="conv4", weights="w.pt",
        input_size=[4, 4], resize="letterbox", mean=(0.2, 0.4, 0.6), std=(0.5, 0.5, 0.5),
    )  # fmt: skip
    pixels, inputs = preprocess([torch.ones(3, 2, 4)], config)
    assert pixels[0, :, 0, 0].tolist() == pytest.approx([0.2, 0.4, 0.6])
    assert inputs[0, :, 0].abs().max() == 0 and inputs[0, :, 3].abs().max() == 0
    assert inputs[0, 0, 1].tolist() == pytest.approx([1.6] * 4)  # (1 - 0.2) / 0.5


def test_default_policy_is_todays_shorter_side_centre_crop() -> None:
    image = torch.rand(3, 50, 70, generator=torch.Generator().manual_seed(0))
    config = ModelConfig(name="m", task="embedding", backbone="conv4", weights="w.pt")
    assert config.resize == "crop" and config.image_size == (84, 84)
    pixels, _ = preprocess([image], config)
    torch.testing.assert_close(pixels[0], resize(image, 84))


def test_sizes_and_policies_are_checked() -> None:
    assert as_size([3, 5]) == (3, 5)
    for bad in (0, [1], [2, -1], "84", [2.5, 3]):
        with pytest.raises(ValueError, match="input size"):
            as_size(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="resize policy must be one of"):
        fit_image(WIDE, 2, "squash")  # type: ignore[arg-type]


@pytest.mark.parametrize("policy", RESIZE_POLICIES)
@pytest.mark.parametrize(("height", "width", "spot"), [(40, 100, (12, 60)), (90, 50, (50, 18))])
def test_a_map_goes_back_onto_the_original_pixels(height, width, spot, policy) -> None:
    # a bright spot in a non-square original; the "heatmap" is the fitted image's brightness,
    # so mapped back it must peak on the spot, at the original's own resolution
    original = torch.zeros(3, height, width)
    y, x = spot
    original[:, y - 3 : y + 4, x - 3 : x + 4] = 1.0
    heatmap = fit_image(original, (32, 32), policy)[0]
    mapped, seen = map_to_original(heatmap, (height, width), (32, 32), policy)
    assert mapped.shape == seen.shape == (height, width)
    peak_y, peak_x = divmod(int(mapped.argmax()), width)
    assert abs(peak_y - y) <= 2 and abs(peak_x - x) <= 2
    if policy == "crop":  # the centre square only: the long side's ends were never seen
        long_side = max(height, width)
        seen_line = seen[height // 2] if width > height else seen[:, width // 2]
        assert not seen_line[0] and not seen_line[-1]
        assert int(seen_line.sum()) == pytest.approx(min(height, width), abs=2)
        assert int(seen_line.sum()) < long_side
        assert float(mapped[~seen].abs().max()) == 0.0
    else:
        assert bool(seen.all())


def test_a_letterboxed_map_loses_its_padding() -> None:
    # a wide original letterboxed into a square: the padding rows carry a hot value that must
    # not reach the original (they are cut off before mapping back)
    heatmap = torch.zeros(32, 32)
    heatmap[:8] = 1.0  # (32 - 13) // 2 = 9 rows of padding on top: all above the image
    mapped, _ = map_to_original(heatmap, (40, 100), (32, 32), "letterbox")
    assert float(mapped.max()) < 0.05
