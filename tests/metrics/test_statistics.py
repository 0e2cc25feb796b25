"""Bootstrap intervals, paired tests and Holm's adjustment: hand-derived values and identities."""

from __future__ import annotations

import math

import pytest
import torch

from fam_core.evaluation.summary import SIGNIFICANCE, summarise
from fam_core.metrics.statistics import bootstrap_interval, holm, paired_bootstrap_test


def test_interval_of_two_values_is_the_two_values() -> None:
    # a resample of [0, 1] has mean 0 (p 1/4), 1/2 (p 1/2) or 1 (p 1/4): the 2.5 % and 97.5 %
    # quantiles of the resampled means are 0 and 1
    mean, low, high = bootstrap_interval(torch.tensor([0.0, 1.0]), resamples=4000)
    assert (mean.item(), low.item(), high.item()) == pytest.approx((0.5, 0.0, 1.0))


def test_interval_of_constant_data_has_zero_width() -> None:
    mean, low, high = bootstrap_interval(torch.full((7,), 0.25))
    assert low.item() == pytest.approx(0.25) and high.item() == pytest.approx(0.25)
    assert mean.item() == pytest.approx(0.25)


def test_interval_contains_the_mean_and_rows_match_single_calls() -> None:
    values = torch.rand(5, 30, generator=torch.Generator().manual_seed(1))
    batched = bootstrap_interval(values, seed=3)
    assert torch.all(batched.low <= batched.mean) and torch.all(batched.mean <= batched.high)
    assert torch.allclose(batched.mean, values.mean(dim=1))
    for row in range(5):  # the same seed resamples the same images in every row
        single = bootstrap_interval(values[row], seed=3)
        assert torch.allclose(single.low, batched.low[row], atol=1e-6)
        assert torch.allclose(single.high, batched.high[row], atol=1e-6)


def test_interval_covers_the_true_mean_about_95_percent_of_the_time() -> None:
    # 400 data sets of 60 draws from N(0, 1): the true mean 0 should lie in ~95 % of the
    # intervals (the percentile bootstrap slightly under-covers at this size)
    data = torch.randn(400, 60, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    _, low, high = bootstrap_interval(data, resamples=1000)
    coverage = ((low <= 0) & (high >= 0)).double().mean().item()
    assert 0.90 <= coverage <= 0.98
    _, low50, high50 = bootstrap_interval(data, resamples=1000, level=0.5)
    assert ((low50 <= 0) & (high50 >= 0)).double().mean().item() == pytest.approx(0.5, abs=0.08)


def test_nan_values_are_left_out() -> None:
    mean, low, high = bootstrap_interval(torch.tensor([2.0, float("nan"), 2.0, 2.0]))
    assert (mean.item(), low.item(), high.item()) == pytest.approx((2.0, 2.0, 2.0))
    test = paired_bootstrap_test(torch.tensor([1.0, float("nan"), 3.0]), torch.tensor([0, 5, 2.0]))
    assert test.difference.item() == pytest.approx(1.0)  # the pair with a NaN is left out
    assert test.low.item() == pytest.approx(1.0) and test.high.item() == pytest.approx(1.0)


def test_paired_test_p_value_and_interval_by_hand() -> None:
    # differences [1, 1, 1, -1]: a resample holds K ~ Binomial(4, 1/4) copies of -1 and has
    # mean 1 - K / 2, so P(mean <= 0) = P(K >= 2) = 67/256 and P(mean >= 0) = 243/256:
    # p = 2 x 67/256; the 2.5 % quantile is -1/2 (P(K >= 3) = 13/256 > 2.5 % > P(K = 4)),
    # the 97.5 % quantile is 1 (P(K = 0) = 81/256)
    a = torch.tensor([1.0, 1.0, 1.0, 0.0])
    b = torch.tensor([0.0, 0.0, 0.0, 1.0])
    test = paired_bootstrap_test(a, b, resamples=20000, seed=5)
    assert test.difference.item() == pytest.approx(0.5)
    assert test.p_value.item() == pytest.approx(2 * 67 / 256, abs=0.02)
    assert (test.low.item(), test.high.item()) == pytest.approx((-0.5, 1.0))


def test_swapped_pairs_give_the_same_p_value_and_a_mirrored_interval() -> None:
    generator = torch.Generator().manual_seed(2)
    a, b = torch.rand(3, 25, generator=generator), torch.rand(3, 25, generator=generator)
    ab, ba = paired_bootstrap_test(a, b, seed=7), paired_bootstrap_test(b, a, seed=7)
    assert torch.allclose(ab.p_value, ba.p_value)
    assert torch.allclose(ab.difference, -ba.difference, atol=1e-6)
    assert torch.allclose(ab.low, -ba.high, atol=1e-6) and torch.allclose(ab.high, -ba.low)


def test_equal_methods_give_p_one_and_a_constant_gap_the_smallest_p() -> None:
    values = torch.rand(12, generator=torch.Generator().manual_seed(4))
    same = paired_bootstrap_test(values, values.clone(), resamples=999)
    assert same.p_value.item() == 1.0 and same.low.item() == 0.0 and same.high.item() == 0.0
    better = paired_bootstrap_test(values + 0.2, values, resamples=999)
    assert better.p_value.item() == pytest.approx(2 / 1000)
    assert better.low.item() == pytest.approx(0.2, abs=1e-6)


def test_p_value_agrees_with_the_interval() -> None:
    generator = torch.Generator().manual_seed(6)
    a = torch.randn(300, 40, generator=generator, dtype=torch.float64)
    b = a + 0.3 * torch.randn(300, 40, generator=generator, dtype=torch.float64) + 0.05
    test = paired_bootstrap_test(a, b, resamples=2000)
    excludes_zero = (test.low > 0) | (test.high < 0)
    significant = test.p_value < 0.05
    assert 0 < significant.sum() < 300  # both outcomes occur
    assert (excludes_zero == significant).double().mean().item() >= 0.98


def test_holm_by_hand() -> None:
    # sorted 0.01, 0.03, 0.04 -> 3 x 0.01, 2 x 0.03, max(0.06, 1 x 0.04); row 2: 3 x 0.2,
    # min(1, 2 x 0.5), max(1, 0.9)
    adjusted = holm(torch.tensor([[0.01, 0.04, 0.03], [0.5, 0.2, 0.9]]))
    expected = torch.tensor([[0.03, 0.06, 0.06], [1.0, 0.6, 1.0]])
    assert torch.allclose(adjusted, expected)
    with_nan = holm(torch.tensor([0.01, float("nan"), 0.04]))  # two comparisons
    assert with_nan[0].item() == pytest.approx(0.02) and with_nan[2].item() == pytest.approx(0.04)
    assert math.isnan(with_nan[1].item())


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda: bootstrap_interval([1.0, 2.0]), TypeError, "torch.Tensor"),
        (lambda: bootstrap_interval(torch.tensor([1, 2])), TypeError, "floating-point"),
        (lambda: bootstrap_interval(torch.zeros(3, 0)), ValueError, "at least one value"),
        (lambda: bootstrap_interval(torch.zeros(3), level=1.0), ValueError, "level"),
        (lambda: bootstrap_interval(torch.zeros(3), resamples=0), ValueError, "resamples"),
        (lambda: bootstrap_interval(torch.zeros(3), resamples=2.5), TypeError, "resamples"),
        (lambda: paired_bootstrap_test(torch.zeros(3), torch.zeros(4)), ValueError, "same"),
        (lambda: holm(torch.tensor([])), ValueError, "p_values"),
    ],
)
def test_bad_arguments_are_named(call, error, words) -> None:
    with pytest.raises(error, match=words):
        call()


def test_summarise_compares_each_method_with_fam_on_the_same_images() -> None:
    fam = torch.linspace(0.2, 0.8, 20)
    per_image = {
        "fam": {"proportion": fam, "pointing": torch.ones(20)},
        "same": {"proportion": fam.clone(), "pointing": torch.ones(20)},
        "worse": {"proportion": fam - 0.1, "pointing": torch.ones(20)},
        "fewer": {"proportion": fam[:10]},  # other images: an interval, but no paired test
    }
    intervals, comparisons = summarise(per_image, resamples=999)
    assert intervals["fam"]["proportion"]["mean"] == pytest.approx(0.5)
    assert intervals["fewer"]["proportion"]["images"] == 10
    assert intervals["fam"]["pointing"]["low"] == intervals["fam"]["pointing"]["high"] == 1.0
    worse = comparisons["worse"]["proportion"]
    assert worse["difference"] == pytest.approx(-0.1, abs=1e-6)
    assert worse["p_value"] == pytest.approx(2 / 1000)
    assert worse["p_holm"] == pytest.approx(2 * 2 / 1000)  # two methods compared on it
    assert worse["significant"] and worse["p_holm"] < SIGNIFICANCE
    same = comparisons["same"]["proportion"]
    assert same["p_value"] == 1.0 and not same["significant"]
    assert "fam" not in comparisons and "fewer" not in comparisons
    _, without_fam = summarise({"a": {"m": fam}, "b": {"m": fam}})
    assert without_fam == {}
