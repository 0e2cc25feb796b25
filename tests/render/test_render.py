"""Tests for fam_core.render: colour lookup, overlays, PNG round-trips, figures, validation."""

from __future__ import annotations

import io
import threading

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fam_core.render import colorize, grid, overlay, overlay_figure, save_png, to_png_bytes


def _mpl_rgb(cmap: str, value: float) -> list[int]:
    """matplotlib's own colour for ``value``, as uint8 (x255, rounded)."""
    return np.round(np.array(matplotlib.colormaps[cmap](value)[:3]) * 255).astype(int).tolist()


def _image(h: int = 16, w: int = 20, b: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (3, h, w) if b is None else (b, 3, h, w)
    return torch.rand(shape, generator=g)


def _heatmap(h: int = 16, w: int = 20, b: int | None = None, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (h, w) if b is None else (b, h, w)
    return torch.rand(shape, generator=g)


# --------------------------------------------------------------------------- colorize


@pytest.mark.parametrize("cmap", ["jet", "viridis", "gray", "inferno"])
def test_colorize_endpoints_match_matplotlib(cmap: str) -> None:
    out = colorize(torch.tensor([[0.0, 1.0]]), cmap)
    assert out.dtype == torch.uint8 and out.shape == (1, 2, 3)
    assert out[0, 0].tolist() == _mpl_rgb(cmap, 0.0)
    assert out[0, 1].tolist() == _mpl_rgb(cmap, 1.0)


def test_colorize_clamps_and_batches() -> None:
    out = colorize(torch.tensor([[[-3.0, 7.0]], [[0.0, 1.0]]]), "jet")
    assert out.shape == (2, 1, 2, 3)
    assert torch.equal(out[0], out[1])  # -3 -> 0 and 7 -> 1


@pytest.mark.parametrize("cmap", ["jet", "gray", "viridis"])  # built in, built in, matplotlib
def test_colorize_matches_matplotlib_on_the_lut_grid(cmap: str) -> None:
    values = torch.linspace(0, 1, 256)[None]
    expected = np.round(matplotlib.colormaps[cmap](values.numpy()[0])[:, :3] * 255)
    assert np.array_equal(colorize(values, cmap)[0].numpy(), expected.astype(np.uint8))


# --------------------------------------------------------------------------- overlay


def test_overlay_alpha_zero_is_the_image() -> None:
    image = _image()
    expected = (image.permute(1, 2, 0) * 255).round().to(torch.uint8)
    out = overlay(image, _heatmap(), alpha=0.0)
    assert out.dtype == torch.uint8 and out.shape == (16, 20, 3)
    assert torch.equal(out, expected)


def test_overlay_alpha_one_is_the_colorized_heatmap() -> None:
    heatmap = _heatmap()
    assert torch.equal(
        overlay(_image(), heatmap, alpha=1.0, cmap="magma"), colorize(heatmap, "magma")
    )


def test_overlay_half_blend_value() -> None:
    image = torch.full((3, 2, 2), 1.0)
    out = overlay(image, torch.zeros(2, 2), alpha=0.5, cmap="gray")  # gray(0) is black
    assert (out == 128).all()  # 0.5 * 255 = 127.5 -> rounds to 128


def test_overlay_upsamples_low_res_heatmap_bilinearly() -> None:
    image, low = _image(32, 40), _heatmap(4, 5)
    out = overlay(image, low, alpha=1.0)
    assert out.shape == (32, 40, 3)
    upsampled = F.interpolate(low[None, None], size=(32, 40), mode="bilinear", align_corners=False)
    assert torch.equal(out, colorize(upsampled[0, 0]))


def test_overlay_batched_and_broadcast() -> None:
    images, heatmaps = _image(b=3), _heatmap(8, 10, b=3)
    out = overlay(images, heatmaps, alpha=0.3)
    assert out.shape == (3, 16, 20, 3)
    for i in range(3):
        assert torch.equal(out[i], overlay(images[i], heatmaps[i], alpha=0.3))
    # one image, several heatmaps (e.g. several methods)
    assert overlay(images[0], heatmaps, alpha=0.3).shape == (3, 16, 20, 3)


def test_overlay_tolerates_denormalisation_roundoff() -> None:
    image = _image()
    image[0, 0, 0], image[0, 0, 1] = -1e-6, 1 + 1e-6
    out = overlay(image, _heatmap(), alpha=0.0)
    assert out[0, 0, 0] == 0 and out[0, 1, 0] == 255


# --------------------------------------------------------------------------- PNG


def test_png_bytes_round_trip(tmp_path) -> None:
    rgb = overlay(_image(), _heatmap(4, 4))
    data = to_png_bytes(rgb)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), rgb.numpy())
    assert to_png_bytes(rgb.numpy()) == data  # numpy input gives the same encoding
    path = save_png(rgb, tmp_path / "out.png")
    assert np.array_equal(np.asarray(Image.open(path)), rgb.numpy())


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (torch.zeros(4, 4, 3), TypeError, "uint8"),
        (torch.zeros(4, 4, 4, dtype=torch.uint8), ValueError, r"\[H, W, 3\]"),
        (torch.zeros(2, 4, 4, 3, dtype=torch.uint8), ValueError, r"\[H, W, 3\]"),
        ([[0, 0, 0]], TypeError, "Tensor or np.ndarray"),
    ],
)
def test_png_rejects_bad_input(bad, error, match) -> None:
    with pytest.raises(error, match=match):
        to_png_bytes(bad)


# --------------------------------------------------------------------------- figures


def test_overlay_figure_renders_rgb() -> None:
    fig = overlay_figure(_image(), _heatmap(4, 5), title="demo")
    assert fig.dtype == torch.uint8 and fig.dim() == 3 and fig.shape[-1] == 3
    assert fig.shape[0] > 100 and fig.shape[1] > 200
    assert fig.float().std() > 10  # not a blank canvas
    no_bar = overlay_figure(_image(), _heatmap(4, 5), title="demo", colorbar=False)
    assert no_bar.shape[1] < fig.shape[1]
    assert overlay_figure(_image(), _heatmap(), dpi=200).shape[0] > fig.shape[0]


def test_grid_size_grows_with_methods_and_rows() -> None:
    images = _image(b=1)
    maps = _heatmap(4, 5, b=1)
    one = grid(images, {"a": maps})
    three = grid(images, {"a": maps, "b": maps, "c": maps})
    assert one.dtype == torch.uint8 and one.shape[-1] == 3
    assert three.shape[1] > one.shape[1] and three.shape[0] == one.shape[0]
    images2, maps2 = _image(b=2), _heatmap(4, 5, b=2)
    two_rows = grid(images2, {"a": maps2, "b": maps2, "c": maps2}, row_labels=["x", "y"])
    assert two_rows.shape[0] > three.shape[0]


def test_grid_accepts_tensor_and_single_image() -> None:
    out = grid(_image(), _heatmap(4, 5), titles=["fam"], title="summary")
    assert out.dtype == torch.uint8 and out.shape[-1] == 3


def test_rendering_is_thread_safe() -> None:
    results: list[torch.Tensor] = []

    def work() -> None:
        results.append(grid(_image(b=2), {"a": _heatmap(b=2), "b": _heatmap(b=2)}))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(torch.equal(r, results[0]) for r in results)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("image", "heatmap", "kwargs", "match"),
    [
        (torch.rand(16, 20), torch.rand(16, 20), {}, r"image must have shape \[3, H, W\]"),
        (torch.rand(1, 1, 3, 4, 4), torch.rand(4, 4), {}, r"image must have shape \[3, H, W\]"),
        (torch.rand(4, 16, 20), torch.rand(16, 20), {}, "3 \\(RGB\\) channels.*got 4"),
        (torch.rand(3, 16, 20), torch.rand(16, 20), {"alpha": 2.0}, r"alpha must be in \[0, 1\]"),
        (torch.rand(3, 16, 20) * 255, torch.rand(16, 20), {}, r"image values must lie in \[0, 1\]"),
        (torch.rand(3, 16, 20) - 0.5, torch.rand(16, 20), {}, r"image values must lie in \[0, 1\]"),
        (torch.rand(3, 16, 20), torch.rand(1, 1, 16, 20), {}, r"heatmap must have shape \[H, W\]"),
        (torch.rand(2, 3, 8, 8), torch.rand(3, 8, 8), {}, "batch sizes differ"),
        (torch.rand(3, 8, 8), torch.full((8, 8), float("nan")), {}, "NaN"),
        (torch.rand(3, 8, 8), torch.rand(8, 8), {"cmap": "nope"}, "unknown colormap 'nope'"),
    ],
)
def test_overlay_rejects_bad_input(image, heatmap, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        overlay(image, heatmap, **kwargs)


def test_type_errors_name_the_expectation() -> None:
    with pytest.raises(TypeError, match="floating-point"):
        overlay(torch.zeros(3, 4, 4, dtype=torch.uint8), torch.rand(4, 4))
    with pytest.raises(TypeError, match="floating-point"):
        colorize(torch.zeros(4, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        colorize(np.zeros((4, 4)))
    with pytest.raises(TypeError, match="alpha must be a real number"):
        overlay(torch.rand(3, 4, 4), torch.rand(4, 4), alpha="0.5")


def test_figure_functions_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="use grid\\(\\) for batches"):
        overlay_figure(_image(b=2), _heatmap(b=2))
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        overlay_figure(torch.rand(4, 8, 8), torch.rand(8, 8))
    with pytest.raises(ValueError, match="dpi must be a positive int"):
        overlay_figure(_image(), _heatmap(), dpi=0)
    with pytest.raises(ValueError, match=r"heatmaps\['a'\] must have shape \[2, h, w\]"):
        grid(_image(b=2), {"a": _heatmap(b=3)})
    with pytest.raises(ValueError, match="one title per method"):
        grid(_image(b=2), {"a": _heatmap(b=2)}, titles=["x", "y"])
    with pytest.raises(ValueError, match="one label per image"):
        grid(_image(b=2), {"a": _heatmap(b=2)}, row_labels=["x"])
    with pytest.raises(ValueError, match="at least one method"):
        grid(_image(b=2), {})
    with pytest.raises(ValueError, match=r"images values must lie in \[0, 1\]"):
        grid(_image(b=2) * 2 + 1, {"a": _heatmap(b=2)})


def test_image_grid_places_tiles_row_by_row_and_blanks_none():
    from fam_core.render import image_grid

    red = torch.zeros(3, 8, 8)
    red[0] = 1.0
    blue = torch.zeros(3, 8, 8)
    blue[2] = 1.0
    out = image_grid([red, blue, None, red], 2, 2, titles=["a", "b"], dpi=40)
    assert out.dtype == torch.uint8 and out.shape[-1] == 3
    is_red = (out[..., 0] == 255) & (out[..., 1] == 0) & (out[..., 2] == 0)
    is_blue = (out[..., 0] == 0) & (out[..., 1] == 0) & (out[..., 2] == 255)
    by, bx = is_blue.nonzero(as_tuple=True)  # the top-right tile
    top, bottom, left = int(by.min()), int(by.max()), int(bx.min())
    assert is_red[top : bottom + 1, :left].sum() > 20  # top-left: red
    assert is_red[bottom + 1 :, left:].sum() > 20  # bottom-right: red
    assert is_red[bottom + 1 :, :left].sum() == 0 and is_blue[bottom + 1 :].sum() == 0  # blank
    assert is_blue[:, :left].sum() == 0
    with pytest.raises(ValueError, match="rows \\* cols = 4"):
        image_grid([red], 2, 2)
    with pytest.raises(ValueError, match="one title per column"):
        image_grid([red, blue], 1, 2, titles=["a"])
    with pytest.raises(ValueError, match=r"tiles\[0\] values must lie in \[0, 1\]"):
        image_grid([red * 2.0], 1, 1)


# --------------------------------------------------------------------------- unseen pixels, sizes


def test_overlay_dims_pixels_the_model_never_saw() -> None:
    image = torch.full((3, 2, 4), 1.0)
    seen = torch.tensor([[False, True, True, False]] * 2)
    out = overlay(image, torch.zeros(2, 4), alpha=0.5, cmap="gray", seen=seen)
    assert out[:, 1:3].eq(128).all()  # seen: blended with gray(0)
    assert out[:, [0, 3]].eq(128).all()  # unseen: the image at half brightness, no colour
    out = overlay(image, torch.ones(2, 4), alpha=0.5, cmap="gray", seen=seen)
    assert out[:, 1:3].eq(255).all() and out[:, [0, 3]].eq(128).all()
    with pytest.raises(ValueError, match="seen must be"):
        overlay(image, torch.ones(2, 4), seen=torch.ones(3, 3, dtype=torch.bool))


def test_overlay_figure_grows_with_the_image_up_to_a_limit() -> None:
    small = overlay_figure(_image(84, 84), _heatmap(8, 8))
    photo = overlay_figure(_image(400, 300), _heatmap(8, 8))
    huge = overlay_figure(_image(2000, 1500), _heatmap(8, 8))
    assert small.shape[0] < photo.shape[0] <= huge.shape[0]
    assert photo.shape[0] >= 400 and huge.shape[0] < 800  # own resolution, capped at 6 in
