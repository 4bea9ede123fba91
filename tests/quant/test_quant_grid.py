"""The per-group grid: min-max scale/zero, symmetric zero, zero_min, MSE clip search, rounding."""
from __future__ import annotations

import pytest
import torch

from gptqkit.quant.grid import dequantize, find_params, quantize


def fake_quantize(w, scale, zero, maxq):
    return dequantize(quantize(w, scale, zero, maxq), scale, zero)

DT = torch.float64


def rows(seed=0, n=16, k=48):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=gen, dtype=DT) * torch.linspace(0.01, 2.0, n, dtype=DT)[:, None]


def fp16_exact(t):
    return torch.equal(t, t.half().to(t.dtype))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_zero_is_exactly_half_range(bits):
    w = rows(bits)
    s, z = find_params(w, bits, sym=True)
    assert (z == 2 ** (bits - 1)).all()
    assert z.dtype == w.dtype
    # the scale covers max|w| over 2^b − 1 steps, rounded to fp16 as it will be stored
    amax = w.abs().max(dim=1).values
    expect = (2 * amax / (2 ** bits - 1)).half().to(DT)
    assert torch.equal(s, expect)
    # zero_min has no effect on the symmetric zero
    s1, z1 = find_params(w, bits, sym=True, zero_min=1)
    assert torch.equal(z1, z) and torch.equal(s1, s)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_asymmetric_min_max(bits):
    w = rows(10 + bits)
    w[0] = w[0].abs() + 0.1  # all-positive row: range is stretched to include 0, zero = 0
    w[1] = -w[1].abs() - 0.1  # all-negative row: zero = maxq
    maxq = 2 ** bits - 1
    s, z = find_params(w, bits, sym=False)
    for r in range(w.shape[0]):
        lo = min(float(w[r].min()), 0.0)
        hi = max(float(w[r].max()), 0.0)
        scale = float(torch.tensor((hi - lo) / maxq).half())
        zero = min(max(round(-lo / scale), 0), maxq)
        assert float(s[r]) == scale
        assert float(z[r]) == zero
    assert z[0] == 0 and z[1] == maxq
    assert fp16_exact(s)
    assert torch.equal(z, torch.round(z))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_zero_min_keeps_asymmetric_zeros_at_least_one(bits):
    w = rows(20 + bits)
    w[:4] = w[:4].abs() + 0.05  # these rows would get zero 0
    _, z0 = find_params(w, bits, sym=False)
    assert (z0[:4] == 0).all()
    s, z = find_params(w, bits, sym=False, zero_min=1)
    assert int(z.min()) >= 1
    assert torch.equal(z[4:], z0[4:].clamp(min=1))
    _, zm = find_params(w, bits, sym=False, mse=True, zero_min=1)
    assert int(zm.min()) >= 1


def test_all_zero_row_gets_a_finite_grid():
    w = torch.zeros(3, 16, dtype=DT)
    w[1] = torch.linspace(-1, 1, 16, dtype=DT)
    for sym in (True, False):
        s, z = find_params(w, 4, sym=sym)
        assert torch.isfinite(s).all() and (s > 0).all()
        wq = fake_quantize(w, s[:, None], z[:, None], 15)
        assert torch.isfinite(wq).all()
        assert (wq[0] == 0).all() and (wq[2] == 0).all()


def test_tiny_scale_clamped_to_fp16_normal():
    w = torch.full((2, 8), 1e-9, dtype=DT)
    s, _ = find_params(w, 4, sym=False)
    assert (s >= 2.0 ** -14).all() and fp16_exact(s)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_mse_never_increases_per_row_error(bits, sym):
    w = rows(30 + bits, n=24, k=64)
    gen = torch.Generator().manual_seed(bits)
    # a few outliers make clipping worthwhile on some rows
    idx = torch.randint(0, 64, (24,), generator=gen)
    w[torch.arange(24), idx] *= 6
    maxq = 2 ** bits - 1

    def row_err(s, z, p):
        return (fake_quantize(w, s[:, None], z[:, None], maxq) - w).abs().pow(p).sum(dim=1)

    s0, z0 = find_params(w, bits, sym)
    s1, z1 = find_params(w, bits, sym, mse=True)
    e0, e1 = row_err(s0, z0, 2.4), row_err(s1, z1, 2.4)
    assert (e1 <= e0).all()
    if bits <= 4:
        assert (e1 < e0).any()  # the search really clips somewhere
        assert (s1 < s0).any()
    assert (s1 <= s0 * (1 + 1e-3)).all()  # it only ever shrinks the range
    assert fp16_exact(s1)
    if sym:
        assert (z1 == 2 ** (bits - 1)).all()


@pytest.mark.parametrize("weighted", [False, True])
def test_mse_result_is_best_of_the_shrink_grid(weighted):
    # independent brute force over the same shrink factors: norm 2.4, or with per-column weights
    # the weighted squared error (weights spread over three orders of magnitude)
    w = rows(40, n=6, k=32)
    bits, maxq = 3, 7
    cw = torch.logspace(-1.5, 1.5, 32, dtype=DT)[torch.randperm(32, generator=torch.Generator().manual_seed(3))]
    s, z = find_params(w, bits, sym=False, mse=True, weight=cw if weighted else None)
    xmin = torch.minimum(w.min(1).values, torch.zeros(6, dtype=DT))
    xmax = torch.maximum(w.max(1).values, torch.zeros(6, dtype=DT))
    for r in range(6):
        best = None
        for i in range(80):
            p = 1 - i / 100
            lo, hi = p * float(xmin[r]), p * float(xmax[r])
            sc = float(torch.tensor(max((hi - lo) / maxq, 2.0 ** -14)).half())
            zr = min(max(round(-lo / sc), 0), maxq)
            q = torch.clamp(torch.round(w[r] / sc) + zr, 0, maxq)
            e = sc * (q - zr) - w[r]
            err = float((e.square() * cw).sum()) if weighted else float(e.abs().pow(2.4).sum())
            if best is None or err < best[0]:
                best = (err, sc, zr)
        assert float(s[r]) == best[1] and float(z[r]) == best[2]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantize_rounds_and_clamps(bits):
    maxq = 2 ** bits - 1
    s = torch.tensor([0.5], dtype=DT)
    z = torch.tensor([float(2 ** (bits - 1))], dtype=DT)
    w = torch.tensor([0.0, 0.24, 0.26, -0.26, 1e6, -1e6], dtype=DT)
    q = quantize(w, s, z, maxq)
    zz = 2 ** (bits - 1)
    assert q.tolist() == [zz, zz, zz + 1, zz - 1, maxq, 0]
    assert torch.equal(dequantize(q, s, z), s * (q - z))
    # in-range values are reproduced to within half a step
    w = (torch.rand(100, dtype=DT) - 0.5) * s * (maxq - 1)
    assert ((fake_quantize(w, s, z, maxq) - w).abs() <= s / 2 + 1e-12).all()


def test_dequantize_per_group_formula():
    """With g_idx: row k of q [K, N] takes scale/zero of group g_idx[k] (any order, act-order)."""
    K, N, g = 64, 6, 16
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (K, N), generator=gen, dtype=torch.int32)
    z = torch.randint(0, 16, (K // g, N), generator=gen, dtype=torch.int32)
    s = torch.rand(K // g, N, generator=gen) + 0.1
    g_idx = (torch.randperm(K, generator=gen) // g).to(torch.int32)
    w = dequantize(q, s, z, g_idx)
    assert w.shape == (K, N) and w.dtype == torch.float32
    for k in range(K):
        gi = int(g_idx[k])
        assert torch.equal(w[k], s[gi] * (q[k].float() - z[gi].float()))
    w16 = dequantize(q, s.half(), z, g_idx, dtype=torch.float16)
    assert w16.dtype == torch.float16
    assert torch.equal(w16, (s.half()[g_idx.long()] * (q.half() - z[g_idx.long()].half())))
