"""GPTAQ (asymmetric calibration) in the solver, against a plain float64 reference written here.

The reference quantizes column by column with no blocks, no lazy updates and no Cholesky
reformulation: at column j (in act-order if asked), with F = {j, …, K−1} the columns not yet
quantized and Hf = (H + λI)[F, F] their damped Hessian, it takes the explicit inverse
Ginv = Hf⁻¹ and applies the two closed-form OBS updates of the paper (Li et al., ICML 2025):

  * GPTQ's: w_F −= (w_j − q_j) / Ginv[0, 0] · Ginv[0, :]                 (column j becomes q_j)
  * the asymmetry of input channel j, paired token for token (a = dXXᵀ[j, F] = 2/n·Σ Δx_j·x_F):
    the least-squares answer w_j·a·Ginv to "reproduce w_j·Δx_j with the columns F", minus its
    part along column j itself (fixed by the first update):
        w_F += α · w_j · (a·Ginv − (a·Ginv)[0] / Ginv[0, 0] · Ginv[0, :])

w_j is column j's value just before it is quantized. The solver reaches the same numbers through
P = α·triu₁(dXXᵀ·Uᵀ)·U with U the upper Cholesky factor of (H + λI)⁻¹ and lazy block updates;
in float64 the codes must agree exactly for every blocksize.
"""
from __future__ import annotations

import logging
import math

import pytest
import torch

from gptqkit.quant.gptq import Hessian, gptq_solve
from gptqkit.quant.grid import find_params
from gptqkit.quant.grid import quantize as grid_quantize

DT = torch.float64


# --------------------------------------------------------------------------- reference
def reference_gptaq(W, H, D, bits, group_size, sym, desc_act, static_groups, damp_percent=0.01,
                    mse=False, zero_min=0, alpha=0.25):
    W = W.to(DT).clone()
    H = H.to(DT).clone()
    D = D.to(DT).clone()
    N, K = W.shape
    maxq = 2 ** bits - 1
    g = K if group_size == -1 else group_size
    G = math.ceil(K / g)
    for j in range(K):
        if H[j, j] == 0:
            H[j, j] = 1
            W[:, j] = 0
            D[:, j] = 0
    W_orig = W
    order = torch.argsort(torch.diag(H), descending=True).tolist() if desc_act else list(range(K))
    W, H, D = W[:, order], H[order][:, order], D[order][:, order]
    Hd = H + damp_percent * torch.mean(torch.diag(H)) * torch.eye(K, dtype=DT)
    # mse=True: the clip search weighs column j (solve order) by 1/[(H_FF)⁻¹]_jj, F = {j, …}: the
    # cost of its rounding error once later columns compensate; "norm": the unweighted search
    wts = None
    if mse and mse != "norm":
        wts = torch.tensor([1 / float(torch.linalg.inv(Hd[j:, j:])[0, 0]) for j in range(K)], dtype=DT)
    pos = {c: j for j, c in enumerate(order)}
    static = [find_params(W_orig[:, c * g:(c + 1) * g], bits, sym, bool(mse), zero_min,
                          weight=None if wts is None else wts[[pos[k] for k in range(c * g, min((c + 1) * g, K))]])
              for c in range(G)] if static_groups else None

    Q = torch.zeros(N, K, dtype=DT)
    scales = torch.zeros(G, N, dtype=DT)
    zeros = torch.zeros(G, N, dtype=DT)
    loss = 0.0
    scale = zero = None
    for j in range(K):
        if static is not None:
            scale, zero = static[order[j] // g]
        elif j % g == 0:
            scale, zero = find_params(W[:, j:min(j + g, K)], bits, sym, bool(mse), zero_min,
                                      weight=None if wts is None else wts[j:min(j + g, K)])
            scales[j // g], zeros[j // g] = scale, zero
        Ginv = torch.linalg.inv(Hd[j:, j:])
        w = W[:, j].clone()
        q = grid_quantize(w, scale, zero, maxq)
        Q[:, j] = q
        wq = scale * (q - zero)
        loss += float(((w - wq) ** 2).sum() / Ginv[0, 0] / 2)
        W[:, j:] -= ((w - wq) / Ginv[0, 0])[:, None] * Ginv[0][None, :]
        t = D[j, j:] @ Ginv
        W[:, j:] += alpha * w[:, None] * (t - t[0] / Ginv[0, 0] * Ginv[0])[None, :]

    if static is not None:
        scales = torch.stack([s for s, _ in static])
        zeros = torch.stack([z for _, z in static])
    inv = torch.argsort(torch.tensor(order))
    g_idx = (inv // g if desc_act and not static_groups else torch.arange(K) // g).to(torch.int32)
    return Q[:, inv].to(torch.int32), scales, zeros.to(torch.int32), g_idx, loss


# --------------------------------------------------------------------------- data
def asym_problem(N, K, n=384, seed=0, noise=0.3):
    """X̃ (float model's inputs, correlated, columns of different energy) and X = X̃ + a
    perturbation (what earlier quantized layers do to the inputs)."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(K, K, generator=gen, dtype=DT) / math.sqrt(K) + 0.3 * torch.eye(K, dtype=DT)
    Xf = torch.randn(n, K, generator=gen, dtype=DT) @ A
    Xf = Xf * torch.linspace(0.2, 3.0, K, dtype=DT)[torch.randperm(K, generator=gen)]
    X = Xf + noise * torch.randn(n, K, generator=gen, dtype=DT) * Xf.std(dim=0)
    W = torch.randn(N, K, generator=gen, dtype=DT) * 0.05
    H = 2 * X.T @ X / n
    D = 2 * (Xf - X).T @ X / n
    return W, H, D, X, Xf


_CACHE: dict = {}


def problem(N, K, seed):
    if (N, K, seed) not in _CACHE:
        _CACHE[(N, K, seed)] = asym_problem(N, K, seed=seed)
    return _CACHE[(N, K, seed)]


def assert_same(res, ref, what):
    q, scales, zeros, g_idx, loss = ref
    assert res.method == "gptaq", what
    assert torch.equal(res.g_idx, g_idx), f"g_idx differs: {what}"
    assert int((res.q != q).sum()) == 0, f"{int((res.q != q).sum())} codes differ: {what}"
    assert torch.equal(res.zeros, zeros), f"zeros differ: {what}"
    assert torch.equal(res.scales.to(DT), scales.to(torch.float32).to(DT)), f"scales differ: {what}"
    assert res.loss == pytest.approx(loss, rel=1e-9), what


# K = 80 / 96 with blocksizes that divide no group size: groups start mid-block, span blocks,
# and the last group is ragged for some sizes
GRID = [(4, 32, True, True, True), (4, 32, False, True, False), (4, 48, True, False, False),
        (3, -1, False, True, False), (2, 32, False, False, False), (8, 64, True, True, True),
        (3, 48, False, False, True), (4, -1, True, False, False)]


@pytest.mark.parametrize("blocksize", [1, 20, 28, 128])
@pytest.mark.parametrize("bits,gs,sym,desc_act,static", GRID)
def test_matches_unblocked_reference(bits, gs, sym, desc_act, static, blocksize):
    K = 80 if bits in (3, 8) else 96
    W, H, D, _, _ = problem(12, K, seed=bits)
    what = f"bits={bits} gs={gs} sym={sym} desc_act={desc_act} static={static} bs={blocksize}"
    res = gptq_solve(W, H, bits, gs, sym=sym, desc_act=desc_act, static_groups=static, blocksize=blocksize,
                     dXXt=D)
    assert_same(res, reference_gptaq(W, H, D, bits, gs, sym, desc_act, static), what)


@pytest.mark.parametrize("alpha", [1.0, 0.1])
@pytest.mark.parametrize("bits,gs,sym,desc_act,static,zero_min", [
    (4, 32, False, True, False, 1), (3, 48, True, False, False, 0), (4, 32, False, True, True, 1)])
def test_mse_zero_min_alpha_match_reference(bits, gs, sym, desc_act, static, zero_min, alpha):
    W, H, D, _, _ = problem(12, 96, seed=30 + bits)
    res = gptq_solve(W, H, bits, gs, sym=sym, desc_act=desc_act, static_groups=static, mse=True, blocksize=20,
                     zero_min=zero_min, dXXt=D, alpha=alpha)
    assert_same(res, reference_gptaq(W, H, D, bits, gs, sym, desc_act, static, mse=True, zero_min=zero_min,
                                     alpha=alpha), f"mse alpha={alpha}")


def test_cross_term_changes_the_solution():
    """Else the comparisons above could pass with the correction never applied."""
    W, H, D, _, _ = problem(12, 96, seed=4)
    a = gptq_solve(W, H, 4, 32, desc_act=True, static_groups=True, blocksize=20, dXXt=D)
    b = gptq_solve(W, H, 4, 32, desc_act=True, static_groups=True, blocksize=20)
    assert int((a.q != b.q).sum()) > 0.05 * a.q.numel()


@pytest.mark.parametrize("dtype", [DT, torch.float32])
@pytest.mark.parametrize("gs,sym,desc_act,static,mse", [(32, True, True, True, False), (48, False, False, False, True),
                                                         (-1, False, True, False, False)])
def test_zero_cross_term_is_gptq(gs, sym, desc_act, static, mse, dtype):
    """dXXᵀ = 0 (or α = 0): exactly GPTQ's codes, scales, zeros, g_idx and loss."""
    W, H, D, _, _ = problem(12, 96, seed=5)
    W, H, D = W.to(dtype), H.to(dtype), D.to(dtype)
    kw = dict(sym=sym, desc_act=desc_act, static_groups=static, mse=mse, blocksize=20)
    base = gptq_solve(W, H, 4, gs, **kw)
    for r in (gptq_solve(W, H, 4, gs, dXXt=torch.zeros_like(H), **kw), gptq_solve(W, H, 4, gs, dXXt=D, alpha=0.0, **kw)):
        assert r.method == "gptaq"
        for f in ("q", "scales", "zeros", "g_idx"):
            assert torch.equal(getattr(r, f), getattr(base, f)), f
        assert r.loss == base.loss


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("desc_act,static", [(True, True), (False, False)])
def test_lowers_the_asymmetric_error(seed, desc_act, static):
    """The objective GPTAQ is for, ||W·X̃ − Q·X||²: lower than GPTQ's solution, and the same
    correction with its sign flipped raises it above GPTQ's (so the sign and the scaling of
    dXXᵀ and P really matter)."""
    W, H, D, X, Xf = asym_problem(16, 64, n=512, seed=40 + seed)
    kw = dict(desc_act=desc_act, static_groups=static, blocksize=16)

    def err(alpha):
        r = gptq_solve(W, H, 4, 32, dXXt=D, alpha=alpha, **kw)
        return float(((Xf @ W.T - X @ r.dequantize().to(DT).T) ** 2).sum())

    gptq, gptaq, flipped = err(0.0), err(0.25), err(-0.25)
    assert gptaq < 0.99 * gptq < 0.98 * flipped, (gptaq, gptq, flipped)
    assert err(1.0) < gptaq  # the full correction lowers this (layer-local) objective further


# --------------------------------------------------------------------------- the accumulator
@pytest.mark.parametrize("rows", [3, 4096])
def test_cross_term_streaming_masks_and_row_blocks(rows, monkeypatch):
    monkeypatch.setattr(Hessian, "ROWS", rows)
    gen = torch.Generator().manual_seed(0)
    K = 16
    xs = [torch.randn(3, 7, K, generator=gen, dtype=DT), torch.randn(1, 5, K, generator=gen, dtype=DT),
          torch.randn(2, 9, K, generator=gen, dtype=DT)]
    fs = [x + 0.1 * torch.randn(x.shape, generator=gen, dtype=DT) for x in xs]
    masks = [torch.rand(3, 7, generator=gen) > 0.3, None, (torch.rand(2, 9, generator=gen) > 0.5).long()]
    h, plain = Hessian(K, dtype=DT, cross=True), Hessian(K, dtype=DT)
    kept_x, kept_f = [], []
    before = [f.clone() for f in fs]
    for x, f, m in zip(xs, fs, masks):
        h.add(x, m, f)
        plain.add(x, m)
        sel = slice(None) if m is None else m.reshape(-1).bool()
        kept_x.append(x.reshape(-1, K)[sel])
        kept_f.append(f.reshape(-1, K)[sel])
    X, F = torch.cat(kept_x), torch.cat(kept_f)
    n = X.shape[0]
    assert h.n == n
    assert all(torch.equal(a, b) for a, b in zip(before, fs))  # the caller's inputs are left alone
    torch.testing.assert_close(h.H, plain.H, rtol=1e-12, atol=1e-12)  # H from its upper triangle
    assert all(torch.equal(h.H[b:, a:b], h.H[a:b, b:].T) for a, b in h._panels())  # mirrored below
    torch.testing.assert_close(h.dXXt, 2 * (F - X).T @ X / n, rtol=1e-12, atol=1e-12)
    h.add(xs[0], torch.zeros(3, 7, dtype=torch.bool), fs[0])  # all masked: nothing changes
    assert h.n == n


def test_cross_term_needs_paired_inputs():
    h = Hessian(8, dtype=DT, cross=True)
    x = torch.randn(2, 5, 8, dtype=DT)
    with pytest.raises(ValueError, match="token for token"):
        h.add(x, None, x[:, :4])
    with pytest.raises(ValueError, match="cross"):
        h.add(x)
    with pytest.raises(ValueError, match="cross"):
        Hessian(8, dtype=DT).add(x, None, x)


@pytest.mark.parametrize("cross_dtype", [torch.float32, torch.bfloat16])
def test_float32_accumulator_keeps_small_differences(cross_dtype):
    """x̃ − x is formed before the product (in float32, also when the product runs in bf16): a
    perturbation 1e-4 of the inputs still gives a cross term accurate to the rounding of the
    difference, not of H."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(512, 32, generator=gen, dtype=DT) * 10
    f = x + 1e-4 * torch.randn(512, 32, generator=gen, dtype=DT)
    h = Hessian(32, cross=True, cross_dtype=cross_dtype)
    h.add(x.float(), None, f.float())
    assert h.dXXt.dtype == torch.float32
    exact = 2 * (f - x).T @ x / 512
    rel = float((h.dXXt.double() - exact).norm() / exact.norm())
    assert rel < 0.05, rel


def test_bf16_cross_product_against_float64():
    """The bf16 product (several row blocks, masks) stays within bf16 rounding of the float64
    sum, and H is untouched by it (float32, the same as with a float32 product)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 700, 48, generator=gen, dtype=DT)
    f = x + 0.05 * torch.randn(x.shape, generator=gen, dtype=DT)
    m = torch.rand(3, 700, generator=gen) > 0.2
    a, b = Hessian(48, cross=True, cross_dtype=torch.bfloat16), Hessian(48, cross=True, cross_dtype=torch.float32)
    for h in (a, b):
        h.ROWS = 256
        h.add(x.float(), m, f.float())
    X, F = x[m], f[m]
    exact = 2 * (F - X).T @ X / X.shape[0]
    rel = float((a.dXXt.double() - exact).norm() / exact.norm())
    assert 1e-5 < rel < 1e-2, rel  # bf16 rounding, not float32's (which would be ~1e-7)
    assert float((b.dXXt.double() - exact).norm() / exact.norm()) < 1e-5
    assert torch.equal(a.H, b.H)


def test_cross_product_dtype_choice(monkeypatch):
    from gptqkit.quant import gptq
    monkeypatch.delenv("GPTQKIT_GPTAQ_BF16", raising=False)
    monkeypatch.setattr(gptq, "native_bf16_cpu", lambda: True)
    assert gptq.cross_product_dtype(torch.float32) == torch.bfloat16
    assert Hessian(8, cross=True).cross_dtype == torch.bfloat16
    assert gptq.cross_product_dtype(torch.float64) == torch.float64  # exact comparisons stay exact
    assert gptq.cross_product_dtype(torch.float32, "cuda") == torch.float32
    monkeypatch.setenv("GPTQKIT_GPTAQ_BF16", "0")
    assert gptq.cross_product_dtype(torch.float32) == torch.float32
    monkeypatch.delenv("GPTQKIT_GPTAQ_BF16")
    monkeypatch.setattr(gptq, "native_bf16_cpu", lambda: False)  # emulated bf16 is slower than fp32
    assert gptq.cross_product_dtype(torch.float32) == torch.float32


# --------------------------------------------------------------------------- robustness
@pytest.mark.parametrize("desc_act", [False, True])
def test_dead_columns(desc_act):
    W, _, _, X, Xf = problem(12, 80, seed=6)
    dead = [3, 17, 40, 79]
    X, Xf = X.clone(), Xf.clone()
    X[:, dead] = 0  # no input reached them in the quantized model; the float one had some
    H = 2 * X.T @ X / X.shape[0]
    D = 2 * (Xf - X).T @ X / X.shape[0]
    W = W.clone()
    W[:, dead] = 5.0
    res = gptq_solve(W, H, 4, 32, sym=False, desc_act=desc_act, blocksize=20, dXXt=D)
    assert torch.isfinite(res.dequantize()).all() and math.isfinite(res.loss)
    assert res.dequantize()[:, dead].abs().max() <= res.scales.max() / 2 + 1e-6
    assert_same(res, reference_gptaq(W, H, D, 4, 32, False, desc_act, False), "dead")


def test_hopeless_hessian_falls_back_to_rtn(caplog):
    from gptqkit.quant.rtn import rtn_solve
    W = torch.randn(6, 32, dtype=DT)
    with caplog.at_level(logging.WARNING, logger="gptqkit.quant.gptq"):
        res = gptq_solve(W, -torch.eye(32, dtype=DT), 4, 16, sym=False, desc_act=True, damp_auto_increment=0.25,
                         dXXt=torch.randn(32, 32, dtype=DT))
    assert res.method == "rtn-fallback"
    assert torch.equal(res.q, rtn_solve(W, 4, 16, sym=False).q)


def test_nan_cross_term_raises():
    from gptqkit.errors import NumericalError
    W, H, D, _, _ = problem(12, 80, seed=0)
    D = D.clone()
    D[1, 2] = float("inf")
    with pytest.raises(NumericalError, match="cross term"):
        gptq_solve(W, H, 4, 32, dXXt=D)


def test_float32_close_to_float64():
    W, H, D, _, _ = problem(12, 96, seed=7)
    r64 = gptq_solve(W, H, 4, 32, desc_act=True, static_groups=True, blocksize=20, dXXt=D)
    r32 = gptq_solve(W.float(), H.float(), 4, 32, desc_act=True, static_groups=True, blocksize=20, dXXt=D.float())
    assert (r32.q != r64.q).float().mean() < 0.05
