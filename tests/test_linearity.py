"""Exact math of the streamed statistics and the scores, on planted data."""

import math

import pytest
import torch

from linearize.capture import PairStats
from linearize.fitting import fit_affine
from linearize.linearity import (
    GramSpectrum,
    anisotropy,
    intrinsic_dimension_twonn,
    linearity_score,
    linearity_score_without_residual,
    summarize_pair,
    top_share,
)


def stream(x, y, batch=97, acc=torch.float32):
    stats = PairStats(x.shape[1], y.shape[1], accumulate_dtype=acc)
    for i in range(0, len(x), batch):
        stats.update(x[i : i + batch], y[i : i + batch])
    return stats


def direct_score(x, y):
    """METHODS.md literally: centre, normalise by Frobenius norm, unconstrained lstsq."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    xt, yt = xc / xc.norm(), yc / yc.norm()
    a = torch.linalg.lstsq(xt, yt, driver="gelsd").solution
    return 1 - (xt @ a - yt).pow(2).sum().item()


def planted(n=3000, d=24, noise=0.05, offset=40.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3, d) + offset
    a = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    y = x + torch.tanh(x @ a) + noise * torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, y


def test_streamed_statistics_equal_direct_computation_despite_large_offset():
    x, y = planted(offset=1000.0)
    x, y = x.float(), y.float()  # the data as a float32 model produces it
    centered = stream(x, y).centered()
    x, y = x.double(), y.double()
    xc, yc = x - x.mean(0), y - y.mean(0)

    def rel_err(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel_err(centered.gram, xc.T @ xc) < 1e-6
    assert rel_err(centered.cross, xc.T @ yc) < 1e-6
    assert centered.y_sq == pytest.approx(yc.pow(2).sum().item(), rel=1e-5)
    assert torch.allclose(centered.mean_x, x.mean(0), rtol=1e-6)


def test_score_equals_direct_lstsq_on_stored_activations():
    x, y = planted()
    expected = direct_score(x, y)
    got = linearity_score(stream(x, y, acc=torch.float64).centered())
    # Tolerance stated on 1 - score, the quantity that carries the information.
    assert (1 - got) == pytest.approx(1 - expected, rel=1e-6)
    got32 = linearity_score(stream(x.float(), y.float()).centered())
    assert (1 - got32) == pytest.approx(1 - expected, rel=2e-3)


def test_score_without_residual_equals_direct_on_update():
    x, y = planted()
    expected = direct_score(x, y - x)
    got = linearity_score_without_residual(stream(x, y, acc=torch.float64).centered())
    assert (1 - got) == pytest.approx(1 - expected, rel=1e-6)


def test_identity_layer_scores_one():
    x, _ = planted()
    stats = stream(x, x.clone(), acc=torch.float64).centered()
    assert linearity_score(stats) == pytest.approx(1.0, abs=1e-12)
    assert linearity_score_without_residual(stats) == 1.0


def test_planted_affine_layer_is_recovered_and_scores_one():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 16, generator=g, dtype=torch.float64) + 3
    a = torch.randn(16, 16, generator=g, dtype=torch.float64)
    b = torch.randn(16, generator=g, dtype=torch.float64)
    stats = stream(x, x @ a + b, acc=torch.float64).centered()
    fitted = fit_affine(stats, ridge=0.0)
    assert torch.allclose(fitted.weight, a, atol=1e-8)
    assert torch.allclose(fitted.bias, b, atol=1e-8)
    assert linearity_score(stats) == pytest.approx(1.0, abs=1e-10)


def test_one_eigendecomposition_gives_the_scores_the_anisotropy_and_the_map():
    """The analysis decomposes G once; every figure matches its own-decomposition form."""
    x, y = planted(offset=20.0)
    stats = stream(x, y, acc=torch.float64)
    separate = stats.centered()
    row = summarize_pair(stats, separate)
    consumed = stream(x, y, acc=torch.float64).centered(consume=True)
    assert torch.equal(consumed.gram, separate.gram) and torch.equal(consumed.cross, separate.cross)
    spectrum = GramSpectrum.of(consumed.gram)
    shared = summarize_pair(stats, consumed, spectrum)
    assert (1 - shared["score"]) == pytest.approx(1 - linearity_score(separate), rel=1e-9)
    assert (1 - shared["score_without_residual"]) == pytest.approx(
        1 - linearity_score_without_residual(separate), rel=1e-9
    )
    assert shared == pytest.approx(row, rel=1e-9)
    for ridge in (0.0, 1e-4, 1e-1):
        by_cholesky = fit_affine(separate, ridge=ridge)
        by_spectrum = fit_affine(consumed, ridge=ridge, spectrum=spectrum)
        assert torch.allclose(by_spectrum.weight, by_cholesky.weight, rtol=1e-8, atol=1e-10)
        assert torch.allclose(by_spectrum.bias, by_cholesky.bias, rtol=1e-8, atol=1e-8)


def test_consumed_statistics_cannot_be_centred_twice():
    x, y = planted()
    stats = stream(x, y, acc=torch.float64)
    stats.centered(consume=True)
    with pytest.raises((TypeError, AttributeError)):
        stats.centered()


def test_merge_equals_single_stream():
    x, y = planted(offset=50.0)
    whole = stream(x, y, acc=torch.float64)
    first, second = (
        stream(x[:1000], y[:1000], acc=torch.float64),
        stream(x[1000:], y[1000:] + 0, acc=torch.float64),
    )
    first.merge(second)
    a, b = whole.centered(), first.centered()
    assert torch.allclose(a.gram, b.gram, rtol=1e-9)
    assert torch.allclose(a.cross, b.cross, rtol=1e-9)
    assert a.y_sq == pytest.approx(b.y_sq, rel=1e-9)


def test_anisotropy_of_known_covariance():
    d = 50
    g = torch.Generator().manual_seed(2)
    scales = torch.ones(d, dtype=torch.float64)
    scales[0] = 10.0  # variance 100 on one axis, 1 on the others
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    x = (torch.randn(200_000, d, generator=g, dtype=torch.float64) * scales) @ q.T
    stats = stream(x, x, batch=10_000, acc=torch.float64).centered()
    assert anisotropy(stats.gram) == pytest.approx(100 / (100 + d - 1), rel=0.02)


def test_twonn_finds_planted_five_dimensional_subspace():
    g = torch.Generator().manual_seed(3)
    latent = torch.rand(2000, 5, generator=g, dtype=torch.float64)
    embed, _ = torch.linalg.qr(torch.randn(576, 5, generator=g, dtype=torch.float64))
    points = latent @ embed.T + 7.0
    assert intrinsic_dimension_twonn(points) == pytest.approx(5, abs=1)


def test_top_share_of_planted_outliers():
    residual = torch.ones(1000, dtype=torch.float64)
    residual[:10] = 99.0  # 1% of tokens carry 990 / 1980 of the residual
    assert top_share(residual, 0.01) == pytest.approx(0.5)
