"""Round-to-nearest baseline and the QuantResult it returns."""
from __future__ import annotations

import pytest
import torch

from gptqkit.quant.grid import find_params
from gptqkit.quant.rtn import group_index, rtn_solve

DT = torch.float64


def weights(seed=0, n=10, k=80):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=gen, dtype=DT) * 0.1


def test_group_index():
    assert group_index(10, -1).tolist() == [0] * 10
    assert group_index(10, 4).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert group_index(10, 4).dtype == torch.int32


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("gs", [-1, 32, 48])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_matches_per_group_nearest(bits, gs, sym):
    W = weights(bits)
    N, K = W.shape
    maxq = 2 ** bits - 1
    r = rtn_solve(W, bits, gs, sym=sym)
    g = K if gs == -1 else gs
    G = -(-K // g)
    assert r.method == "rtn" and r.loss == 0.0
    assert r.q.shape == (N, K) and r.q.dtype == torch.int32
    assert r.scales.shape == (G, N) and r.scales.dtype == torch.float32
    assert r.zeros.shape == (G, N) and r.zeros.dtype == torch.int32
    assert torch.equal(r.g_idx, (torch.arange(K) // g).to(torch.int32))
    assert int(r.q.min()) >= 0 and int(r.q.max()) <= maxq
    if sym:
        assert (r.zeros == 2 ** (bits - 1)).all()
    for gi in range(G):
        cols = slice(gi * g, min((gi + 1) * g, K))
        s, z = find_params(W[:, cols], bits, sym)
        assert torch.equal(r.scales[gi], s.float())
        assert torch.equal(r.zeros[gi], z.to(torch.int32))
        # each code is the nearest grid point (ties aside) within the clamp range
        for c in range(cols.start, cols.stop):
            exact = W[:, c] / s + z
            expect = torch.clamp(torch.round(exact), 0, maxq).to(torch.int32)
            assert torch.equal(r.q[:, c], expect)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_result_dequantize_matches_formula(bits):
    W = weights(5 + bits)
    r = rtn_solve(W, bits, 32, sym=False)
    Wq = r.dequantize()
    assert Wq.dtype == torch.float32 and Wq.shape == W.shape
    for c in range(W.shape[1]):
        gi = int(r.g_idx[c])
        torch.testing.assert_close(Wq[:, c], r.scales[gi] * (r.q[:, c] - r.zeros[gi]).float(), rtol=0, atol=0)
    # rounding the zero point (and the scale to fp16) shifts the grid's ends by up to half a
    # step, so extremes may be one step off; everything else is within half a step
    step = r.scales[r.g_idx.long()].T.to(DT)
    err = (Wq.to(DT) - W).abs()
    assert (err <= step * (1 + 1e-3)).all()
    assert (err <= step / 2 * (1 + 1e-3)).float().mean() > 0.95


def test_result_dequantize_with_permuted_g_idx():
    W = weights(3, n=4, k=16)
    r = rtn_solve(W, 4, 4, sym=False)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    r.g_idx = r.g_idx[perm]
    Wq = r.dequantize()
    for c in range(16):
        gi = int(r.g_idx[c])
        torch.testing.assert_close(Wq[:, c], r.scales[gi] * (r.q[:, c] - r.zeros[gi]).float(), rtol=0, atol=0)


def test_zero_min_and_half_inputs():
    W = weights(9).abs() + 0.01  # all positive: asymmetric zeros would be 0
    assert int(rtn_solve(W, 4, 32, sym=False).zeros.min()) == 0
    r = rtn_solve(W, 4, 32, sym=False, zero_min=1)
    assert int(r.zeros.min()) >= 1
    rh = rtn_solve(W.half(), 4, 32, sym=False)
    assert rh.q.dtype == torch.int32 and torch.isfinite(rh.dequantize()).all()


def test_mse_rtn_not_worse_in_clip_norm():
    W = weights(11)
    W[:, 5] *= 8
    a, b = rtn_solve(W, 3, 32, sym=False), rtn_solve(W, 3, 32, sym=False, mse=True)

    def err(r):
        return (r.dequantize().to(DT) - W).abs().pow(2.4).sum(dim=1)

    assert (err(b) <= err(a) * (1 + 1e-6)).all()
    assert (err(b) < err(a)).any()
