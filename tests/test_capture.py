"""The fast paths of the streamed statistics: half-precision Grams, block-symmetric Grams,
sync-free extras. Each is checked against the plain formulas on the same rows."""

import math

import pytest
import torch

from linearize.architectures import decoder_layers
from linearize.capture import (
    PairStats,
    accumulation_dtype,
    collect_layer_stats,
    gram_fp32,
    paired_sums,
)


def planted(n=3000, d=24, offset=2.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3, d) + offset
    a = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    y = x + torch.tanh(x @ a) + 0.05 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def stream(x, y, acc, batch=97, **kwargs):
    stats = PairStats(x.shape[1], y.shape[1], accumulate_dtype=acc, **kwargs)
    for i in range(0, len(x), batch):
        stats.update(x[i : i + batch], y[i : i + batch])
    return stats


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def legacy_update(stats, x, y):
    """PairStats.update as it was before the fast paths (two full GEMMs, float() per extra)."""
    acc = stats.accumulate_dtype
    if stats.shift_x is None:
        stats._init(x, y)
    xs, ys = x.to(acc) - stats.shift_x, y.to(acc) - stats.shift_y
    stats.n += x.shape[0]
    stats.sum_x += xs.sum(0, dtype=torch.float64)
    stats.sum_y += ys.sum(0, dtype=torch.float64)
    stats.xx += (xs.T @ xs).double()
    stats.xy += (xs.T @ ys).double()
    stats.yy_diag += (ys * ys).sum(0, dtype=torch.float64)
    xf, yf = x.float(), y.float()
    return (
        float((yf - xf).pow(2).sum(dtype=torch.float64)),
        float(xf.pow(2).sum(dtype=torch.float64)),
        float(torch.nn.functional.cosine_similarity(xf, yf, dim=-1).sum()),
    )


def test_update_equals_legacy_numbers_on_float32_rows():
    x, y = planted(offset=300.0, d=37)  # odd d: unequal symmetric blocks
    new = stream(x, y, torch.float32)
    old = PairStats(37, 37)
    extras = torch.zeros(3, dtype=torch.float64)
    for i in range(0, len(x), 97):
        extras += torch.tensor(legacy_update(old, x[i : i + 97], y[i : i + 97]))
    assert torch.equal(new.shift_x, old.shift_x)
    assert torch.equal(new.sum_x, old.sum_x) and torch.equal(new.yy_diag, old.yy_diag)
    assert rel_err(new.xx, old.xx) < 1e-6
    assert rel_err(new.xy, old.xy) < 1e-6
    assert rel_err(new.xx, new.xx.T) < 1e-7  # mirrored blocks; GEMM diagonal blocks ~1e-8
    assert new.sq_update == pytest.approx(extras[0].item(), rel=1e-5)
    assert new.sq_input == pytest.approx(extras[1].item(), rel=1e-6)
    assert new.cos_sum == pytest.approx(extras[2].item(), rel=1e-6)


def test_paired_sums_equal_direct_formulas_including_opposite_and_zero_rows():
    x, y = planted(n=500, d=16, offset=0.0, dtype=torch.float64)
    y[0] = -x[0]  # cos = -1
    x[1] = 0.0  # zero row: cos = 0 as in torch's cosine_similarity
    got = paired_sums(x, y)
    cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
    assert got[0].item() == pytest.approx((y - x).pow(2).sum().item(), rel=1e-12)
    assert got[1].item() == pytest.approx(x.pow(2).sum().item(), rel=1e-12)
    assert got[2].item() == pytest.approx(cos.sum().item(), rel=1e-10)


def test_update_never_reads_values_back_so_never_syncs():
    # Meta tensors have no values: any float()/item()/.cpu() read inside update would raise.
    for acc in (torch.float32, torch.bfloat16):
        x = torch.empty(64, 8, device="meta", dtype=acc)
        stats = PairStats(8, 8, accumulate_dtype=acc)
        stats.update(x, x)
        stats.update(x, x)
        assert stats.n == 128 and stats.extra_sums.device.type == "meta"


def test_gram_fp32_of_bf16_rows_has_exact_products():
    g = torch.Generator().manual_seed(4)
    a = (torch.randn(1, 40, generator=g) * 300).bfloat16()
    b = (torch.randn(1, 50, generator=g) * 1e-3).bfloat16()
    got = gram_fp32(a, b)
    assert got.dtype == torch.float32
    assert torch.equal(got.double(), a.double().T @ b.double())  # one row: only products


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_rows_match_fp64_statistics_of_the_same_values(dtype):
    x, y = planted(n=4000, d=33, dtype=dtype)
    fast = stream(x, y, dtype, batch=512).centered()
    exact = stream(x.double(), y.double(), torch.float64, batch=512).centered()
    assert stream(x, y, dtype).shift_x.abs().sum() == 0  # raw rows: no shift
    # Unshifted fp32 batch sums: error ~ eps32 * (1 + mean^2 / var), here mean^2 / var <= 16.
    assert rel_err(fast.gram, exact.gram) < 3e-6
    assert rel_err(fast.cross, exact.cross) < 3e-6
    assert fast.y_sq == pytest.approx(exact.y_sq, rel=1e-6)
    assert torch.allclose(fast.mean_x, exact.mean_x, rtol=1e-7, atol=1e-9)


def test_merge_of_half_precision_stats_into_shifted_fp32_stats():
    x, y = planted(offset=20.0, dtype=torch.bfloat16)
    whole = stream(x.double(), y.double(), torch.float64).centered()
    first = stream(x[:1200].float(), y[:1200].float(), torch.float32)
    first.merge(stream(x[1200:], y[1200:], torch.bfloat16))
    merged = first.centered()
    assert merged.n == len(x)
    assert rel_err(merged.gram, whole.gram) < 1e-5
    assert rel_err(merged.cross, whole.cross) < 1e-5
    assert merged.y_sq == pytest.approx(whole.y_sq, rel=1e-5)
    total = stream(x, y, torch.bfloat16)
    assert first.cos_sum == pytest.approx(total.cos_sum, rel=1e-5)


def test_accumulation_dtype_keeps_half_precision_and_upcasts_the_rest():
    assert accumulation_dtype(torch.bfloat16, "cuda") == torch.bfloat16
    assert accumulation_dtype(torch.float16, "cpu") == torch.float16
    assert accumulation_dtype(torch.float32, "cuda") == torch.float32
    assert accumulation_dtype(torch.float64, "cpu") == torch.float32


def test_collect_layer_stats_of_a_bf16_model_matches_fp64_statistics():
    from tiny_models import build_tiny_model

    model = build_tiny_model("llama").to(torch.bfloat16)
    layers = decoder_layers(model)
    windows = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(0))
    fast = collect_layer_stats(model, layers, windows, batch_size=2, reservoir_size=50)
    exact = collect_layer_stats(
        model, layers, windows, batch_size=2, reservoir_size=50, accumulate_dtype=torch.float64
    )
    assert fast.tokens == windows.numel() and len(fast.stats) == len(layers)
    for a, b in zip(fast.stats, exact.stats, strict=True):
        assert a.accumulate_dtype == torch.bfloat16 and a.n == b.n == windows.numel()
        ca, cb = a.centered(), b.centered()
        assert rel_err(ca.gram, cb.gram) < 1e-5
        assert rel_err(ca.cross, cb.cross) < 1e-5
        assert a.cos_sum == pytest.approx(b.cos_sum, rel=1e-3)
        assert a.sq_update == pytest.approx(b.sq_update, rel=1e-2)  # bf16 y - x is rounded
    for rows, ref in zip(fast.reservoir, exact.reservoir, strict=True):
        assert rows.dtype == torch.float32 and rows.shape == (50, model.config.hidden_size)
        assert torch.equal(rows, ref)
