"""GPTQ solver against a plain, unblocked, column-by-column reference written here in float64.

The reference follows the paper (Frantar et al., 2022, Algorithm 1 without lazy batching):
  * dead columns (H_jj == 0) are zeroed in W and get H_jj = 1;
  * act-order permutes columns by descending diag(H); with solve_order="groups" (static groups
    only) it solves the static groups one after another, by descending sum of their diag(H),
    each group's columns by descending diag(H);
  * U = upper Cholesky factor of (H + λI)⁻¹, λ = damp · mean(diag H), the inverse taken directly;
  * for each column j in (permuted) order: if a group starts at j, its grid is computed from the
    *current* (already error-compensated) weights of the group's columns; q_j = quant(w_j);
    err = (w_j − q_j) / U_jj; every remaining column k > j gets w_k −= err · U_jk immediately;
  * static groups: the grids of all groups are computed from the original weights (after the
    dead-column zeroing) in original column order before any update.
"""
from __future__ import annotations

import itertools
import logging
import math

import pytest
import torch

from gptqkit.quant.gptq import Hessian, gptq_solve
from gptqkit.quant.grid import find_params
from gptqkit.quant.grid import quantize as grid_quantize
from gptqkit.quant.rtn import rtn_solve

DT = torch.float64


# --------------------------------------------------------------------------- reference
def reference_gptq(W, H, bits, group_size, sym, desc_act, static_groups, damp_percent=0.01,
                   mse=False, zero_min=0, solve_order="columns"):
    W = W.to(DT).clone()
    H = H.to(DT).clone()
    N, K = W.shape
    maxq = 2 ** bits - 1
    g = K if group_size == -1 else group_size
    G = math.ceil(K / g)

    for j in range(K):
        if H[j, j] == 0:
            H[j, j] = 1
            W[:, j] = 0

    W_orig = W
    order = list(range(K))
    if desc_act and solve_order == "groups":
        d = torch.diag(H).tolist()
        groups = [list(range(s, min(s + g, K))) for s in range(0, K, g)]
        groups.sort(key=lambda cols: -sum(d[c] for c in cols))
        order = [c for cols in groups for c in sorted(cols, key=lambda c: -d[c])]
    elif desc_act:
        order = torch.argsort(torch.diag(H), descending=True).tolist()
    W = W[:, order]
    H = H[order][:, order]

    lam = damp_percent * torch.mean(torch.diag(H))
    Hinv = torch.linalg.inv(H + lam * torch.eye(K, dtype=DT))
    Hinv = (Hinv + Hinv.T) / 2
    U = torch.linalg.cholesky(Hinv, upper=True)

    # mse=True: the clip search weighs column j (solve order) by 1/U_jj², the cost of its rounding
    # error once later columns compensate; "norm": the unweighted |w - ŵ|^2.4 search
    weight = None if not mse or mse == "norm" else 1 / torch.diag(U) ** 2
    wcol = lambda cols: None if weight is None else weight[cols]  # noqa: E731

    static = None
    if static_groups:
        static = []
        for grp in range(G):
            cols = list(range(grp * g, min((grp + 1) * g, K)))
            static.append(find_params(W_orig[:, cols], bits, sym, bool(mse), zero_min,
                                      weight=wcol([order.index(c) for c in cols])))

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
                                      weight=wcol(list(range(j, min(j + g, K)))))
            scales[j // g], zeros[j // g] = scale, zero
        w = W[:, j].clone()
        q = grid_quantize(w, scale, zero, maxq)
        Q[:, j] = q
        wq = scale * (q - zero)
        d = U[j, j]
        loss += float(((w - wq) ** 2).sum() / d ** 2 / 2)
        err = (w - wq) / d
        W[:, j:] -= err[:, None] * U[j, j:][None, :]

    if static is not None:
        scales = torch.stack([s for s, _ in static])
        zeros = torch.stack([z for _, z in static])
    inv = [0] * K
    for pos, c in enumerate(order):
        inv[c] = pos
    Q_orig = torch.zeros_like(Q)
    g_idx = torch.zeros(K, dtype=torch.int32)
    for c in range(K):
        Q_orig[:, c] = Q[:, inv[c]]
        if desc_act and not static_groups:
            g_idx[c] = inv[c] // g
        else:
            g_idx[c] = c // g
    return Q_orig.to(torch.int32), scales, zeros.to(torch.int32), g_idx, loss


# --------------------------------------------------------------------------- data
def correlated_problem(N, K, n=256, seed=0, scale_spread=True):
    gen = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, K, generator=gen, dtype=DT)
    A = torch.randn(K, K, generator=gen, dtype=DT) / math.sqrt(K)
    A = A + torch.eye(K, dtype=DT) * 0.3
    X = Z @ A
    if scale_spread:  # columns of different energy so act-order really permutes
        X = X * torch.linspace(0.2, 3.0, K, dtype=DT)[torch.randperm(K, generator=gen)]
    W = torch.randn(N, K, generator=gen, dtype=DT) * 0.05
    H = 2 * X.T @ X / n
    return W, H, X


_CACHE: dict = {}


def problem(N, K, seed):
    key = (N, K, seed)
    if key not in _CACHE:
        _CACHE[key] = correlated_problem(N, K, seed=seed)
    return _CACHE[key]


def assert_matches_reference(res, ref, what):
    q, scales, zeros, g_idx, loss = ref
    assert res.method == "gptq", what
    assert res.q.dtype == torch.int32 and res.zeros.dtype == torch.int32, what
    assert torch.equal(res.g_idx.to(torch.int32), g_idx), f"g_idx differs: {what}"
    diff = (res.q != q)
    assert int(diff.sum()) == 0, f"{int(diff.sum())} codes differ: {what}"
    assert torch.equal(res.zeros, zeros), f"zeros differ: {what}"
    torch.testing.assert_close(res.scales.to(DT), scales.to(torch.float32).to(DT), rtol=0, atol=0,
                               msg=f"scales differ: {what}")
    assert res.loss == pytest.approx(loss, rel=1e-9, abs=1e-300), what


# K=80: every group size is ragged (32+32+16, 48+32, 64+16); K=96: 64+32 ragged, 32/48 exact.
# blocksize 20 / 28 divide no group size, so groups start mid-block and span several blocks.
GRID = [
    (bits, gs, sym, desc_act, static)
    for bits in (2, 3, 4, 8)
    for gs in (-1, 32, 48, 64)
    for sym in (True, False)
    for desc_act in (False, True)
    for static in (False, True)
    if not (static and gs == -1)
]


@pytest.mark.parametrize("bits,gs,sym,desc_act,static", GRID)
def test_matches_unblocked_reference(bits, gs, sym, desc_act, static):
    K = 80 if bits in (3, 8) else 96
    blocksize = 20 if K == 80 else 28
    W, H, _ = problem(12, K, seed=bits)
    what = f"bits={bits} gs={gs} sym={sym} desc_act={desc_act} static={static} K={K} bs={blocksize}"
    res = gptq_solve(W, H, bits, gs, sym=sym, desc_act=desc_act, static_groups=static,
                     blocksize=blocksize)
    ref = reference_gptq(W, H, bits, gs, sym, desc_act, static)
    assert_matches_reference(res, ref, what)


@pytest.mark.parametrize("bits,gs,sym,desc_act,static,zero_min", [
    (4, 32, False, True, False, 0),
    (4, 48, True, False, False, 0),
    (3, 64, False, False, True, 1),
    (2, -1, False, True, False, 1),
    (8, 32, True, True, True, 0),
    (3, 48, False, True, False, 1),
])
@pytest.mark.parametrize("mse", [True, "norm"])
def test_mse_and_zero_min_match_reference(bits, gs, sym, desc_act, static, zero_min, mse):
    W, H, _ = problem(12, 80, seed=10 + bits)
    what = f"mse={mse} bits={bits} gs={gs} sym={sym} desc_act={desc_act} static={static} zmin={zero_min}"
    res = gptq_solve(W, H, bits, gs, sym=sym, desc_act=desc_act, static_groups=static,
                     mse=mse, blocksize=20, zero_min=zero_min)
    ref = reference_gptq(W, H, bits, gs, sym, desc_act, static, mse=mse, zero_min=zero_min)
    assert_matches_reference(res, ref, what)
    if zero_min and not sym:
        assert int(res.zeros.min()) >= zero_min


@pytest.mark.parametrize("blocksize", [1, 7, 16, 80, 128])
def test_blocksize_does_not_change_result(blocksize):
    W, H, _ = problem(12, 80, seed=3)
    base = reference_gptq(W, H, 4, 32, False, True, False)
    res = gptq_solve(W, H, 4, 32, sym=False, desc_act=True, blocksize=blocksize)
    assert_matches_reference(res, base, f"blocksize={blocksize}")


def test_damp_percent_is_used():
    W, H, _ = problem(12, 80, seed=4)
    for damp in (0.0, 0.1):
        res = gptq_solve(W, H, 3, 32, sym=False, damp_percent=damp, blocksize=20)
        assert res.damp == damp
        assert_matches_reference(res, reference_gptq(W, H, 3, 32, False, False, False, damp_percent=damp),
                                 f"damp={damp}")


def test_float32_input_close_to_float64():
    W, H, _ = problem(12, 80, seed=5)
    r64 = gptq_solve(W, H, 4, 32, sym=False, desc_act=True, blocksize=20)
    r32 = gptq_solve(W.float(), H.float(), 4, 32, sym=False, desc_act=True, blocksize=20)
    assert r32.q.shape == r64.q.shape
    assert (r32.q != r64.q).float().mean() < 0.05
    assert r32.loss == pytest.approx(r64.loss, rel=0.05)


# --------------------------------------------------------------------------- Hessian accumulator
def test_hessian_streaming_and_mask():
    gen = torch.Generator().manual_seed(0)
    K = 24
    batches = [torch.randn(3, 7, K, generator=gen, dtype=DT), torch.randn(1, 5, K, generator=gen, dtype=DT),
               torch.randn(2, 11, K, generator=gen, dtype=DT)]
    masks = [torch.rand(3, 7, generator=gen) > 0.3, None, torch.rand(2, 11, generator=gen) > 0.5]
    h = Hessian(K, dtype=DT)
    rows = []
    for x, m in zip(batches, masks):
        h.add(x, m)
        flat = x.reshape(-1, K)
        rows.append(flat if m is None else flat[m.reshape(-1)])
    X = torch.cat(rows)
    assert h.n == X.shape[0]
    torch.testing.assert_close(h.H, 2 * X.T @ X / X.shape[0], rtol=1e-12, atol=1e-12)

    # integer (0/1) masks, the way HF attention masks come, select the same rows
    h2 = Hessian(K, dtype=DT)
    for x, m in zip(batches, masks):
        h2.add(x, None if m is None else m.long())
    assert h2.n == h.n
    torch.testing.assert_close(h2.H, h.H, rtol=1e-12, atol=1e-12)

    # an all-masked batch adds nothing
    h.add(torch.randn(2, 3, K, dtype=DT), torch.zeros(2, 3, dtype=torch.bool))
    assert h.n == X.shape[0]


@pytest.mark.parametrize("rows", [1, 4, 5, 1000])
def test_hessian_row_blocks(rows, monkeypatch):
    """Row blocks of any size (ragged last block, masks cut across block boundaries) give the
    reference 2·XᵀX/n over the kept rows."""
    monkeypatch.setattr(Hessian, "ROWS", rows)
    gen = torch.Generator().manual_seed(1)
    K = 12
    x = torch.randn(3, 7, K, generator=gen, dtype=DT)
    m = torch.rand(3, 7, generator=gen) > 0.4
    h = Hessian(K, dtype=DT)
    h.add(x, m)
    h.add(x[:1])
    X = torch.cat([x.reshape(-1, K)[m.reshape(-1)], x[0]])
    assert h.n == X.shape[0]
    torch.testing.assert_close(h.H, 2 * X.T @ X / X.shape[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("K", [5, 12, 24, 37])
def test_hessian_upper_panels_mirrored(K):
    """Only the upper block triangle is accumulated: H read back has its lower blocks mirrored
    exactly from the upper ones and equals the full product, for K that the panels cut unevenly
    (and K < PANELS)."""
    gen = torch.Generator().manual_seed(K)
    h = Hessian(K, dtype=DT)
    xs = [torch.randn(9, K, generator=gen, dtype=DT) for _ in range(3)]
    for x in xs:
        h.add(x)
    X = torch.cat(xs)
    assert all(torch.equal(h.H[b:, a:b], h.H[a:b, b:].T) for a, b in h._panels())
    torch.testing.assert_close(h.H, 2 * X.T @ X / X.shape[0], rtol=1e-12, atol=1e-12)
    h.add(xs[0])  # adding after a read mirrors again
    X = torch.cat(xs + xs[:1])
    assert all(torch.equal(h.H[b:, a:b], h.H[a:b, b:].T) for a, b in h._panels())
    torch.testing.assert_close(h.H, 2 * X.T @ X / X.shape[0], rtol=1e-12, atol=1e-12)


def test_hessian_finite_flags_bad_inputs_only_where_kept():
    x = torch.randn(2, 6, 8, dtype=DT)
    x[1, 4, 3] = float("nan")
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[1, 4] = False
    h = Hessian(8, dtype=DT)
    h.add(x, keep)                 # the NaN sits in a masked (padding) row: left out
    assert h.finite()
    h.add(x)                       # now it is kept
    assert not h.finite()
    g = Hessian(8, dtype=DT)
    g.add(torch.full((3, 8), float("inf"), dtype=DT))
    assert not g.finite()


def test_hessian_float32_default():
    h = Hessian(8)
    x = torch.randn(10, 8)
    h.add(x)
    assert h.H.dtype == torch.float32
    torch.testing.assert_close(h.H, 2 * x.T @ x / 10, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- robustness
@pytest.mark.parametrize("desc_act", [False, True])
def test_dead_columns(desc_act):
    W, H, X = problem(12, 80, seed=6)
    dead = [3, 17, 40, 79]
    X = X.clone()
    X[:, dead] = 0
    H = 2 * X.T @ X / X.shape[0]
    W = W.clone()
    W[:, dead] = 5.0  # large weights on dead inputs must not wreck the grid
    res = gptq_solve(W, H, 4, 32, sym=False, desc_act=desc_act, blocksize=20)
    assert res.method == "gptq"
    Wq = res.dequantize()
    assert torch.isfinite(Wq).all() and torch.isfinite(res.scales).all()
    assert math.isfinite(res.loss)
    assert Wq[:, dead].abs().max() <= res.scales.max() / 2 + 1e-6
    assert_matches_reference(res, reference_gptq(W, H, 4, 32, False, desc_act, False), "dead")


def test_cholesky_failure_raises_damp(caplog):
    gen = torch.Generator().manual_seed(7)
    K = 32
    X = torch.randn(8, 4, generator=gen, dtype=DT) @ torch.randn(4, K, generator=gen, dtype=DT)
    H = 2 * X.T @ X / 8
    H = H - 0.02 * torch.diag(H).mean() * torch.eye(K, dtype=DT)  # indefinite, fixed by damping
    W = torch.randn(6, K, generator=gen, dtype=DT)
    with caplog.at_level(logging.INFO, logger="gptqkit.quant.gptq"):
        res = gptq_solve(W, H, 4, 16, damp_percent=0.001, damp_auto_increment=0.01)
    assert res.method == "gptq"
    assert res.damp > 0.02
    assert res.damp < 0.1
    assert any("damp" in r.getMessage() for r in caplog.records)
    assert torch.isfinite(res.dequantize()).all()


def test_hopeless_hessian_falls_back_to_rtn(caplog):
    gen = torch.Generator().manual_seed(8)
    K = 32
    W = torch.randn(6, K, generator=gen, dtype=DT)
    H = -torch.eye(K, dtype=DT)
    with caplog.at_level(logging.WARNING, logger="gptqkit.quant.gptq"):
        res = gptq_solve(W, H, 4, 16, sym=False, desc_act=True, damp_auto_increment=0.25)
    assert res.method == "rtn-fallback"
    assert res.damp == pytest.approx(1.0)
    assert any(r.levelno >= logging.WARNING for r in caplog.records)
    rtn = rtn_solve(W, 4, 16, sym=False)
    assert torch.equal(res.q, rtn.q) and torch.equal(res.zeros, rtn.zeros)
    assert torch.equal(res.g_idx, rtn.g_idx)


def test_no_infinite_loop_without_auto_increment():
    W = torch.randn(4, 16, dtype=DT)
    res = gptq_solve(W, -torch.eye(16, dtype=DT), 4, 8, damp_auto_increment=0.0)
    assert res.method == "rtn-fallback"


def test_nan_raises():
    from gptqkit.errors import NumericalError
    W, H, _ = problem(12, 80, seed=0)
    W = W.clone()
    W[0, 0] = float("nan")
    with pytest.raises(NumericalError):
        gptq_solve(W, H, 4, 32)


# --------------------------------------------------------------------------- quality
@pytest.mark.parametrize("bits,gs,sym,desc_act,static", [
    (2, 32, False, False, False), (3, -1, True, False, False), (3, 32, False, True, False),
    (4, 64, True, True, True), (4, -1, False, True, False), (8, 32, True, False, False),
])
def test_gptq_beats_rtn_on_correlated_inputs(bits, gs, sym, desc_act, static):
    W, H, X = problem(16, 96, seed=20 + bits)
    res = gptq_solve(W, H, bits, gs, sym=sym, desc_act=desc_act, static_groups=static, blocksize=32)
    rtn = rtn_solve(W, bits, gs, sym=sym)

    def out_err(Wq):
        return float(((X @ W.T - X @ Wq.to(DT).T) ** 2).sum())

    e_gptq, e_rtn = out_err(res.dequantize()), out_err(rtn.dequantize())
    assert e_gptq < 0.9 * e_rtn, (e_gptq, e_rtn)


@pytest.mark.parametrize("damp,desc_act", [(0.0, False), (0.0, True), (0.05, False), (0.05, True)])
def test_loss_is_half_the_damped_quadratic_error(damp, desc_act):
    # exact error compensation makes the summed per-column OBS errors equal the final error
    # ½·tr(ΔᵀHΔ) with Δ = W − Ŵ and H the damped Hessian the solver used
    W, H, _ = problem(12, 80, seed=1)
    res = gptq_solve(W, H, 3, 32, sym=False, desc_act=desc_act, damp_percent=damp, blocksize=20)
    D = W - res.dequantize().to(DT)
    Hd = H + damp * torch.diag(H).mean() * torch.eye(80, dtype=DT)
    assert res.loss == pytest.approx(float(torch.trace(D @ Hd @ D.T)) / 2, rel=1e-9)


def test_dequantize_matches_codes():
    W, H, _ = problem(12, 80, seed=9)
    res = gptq_solve(W, H, 3, 32, sym=False, desc_act=True, blocksize=20)
    Wq = res.dequantize()
    assert Wq.shape == W.shape
    for c in range(W.shape[1]):
        gi = int(res.g_idx[c])
        expect = res.scales[gi] * (res.q[:, c].float() - res.zeros[gi].float())
        torch.testing.assert_close(Wq[:, c], expect, rtol=0, atol=0)
    assert int(res.q.min()) >= 0 and int(res.q.max()) <= 7
    # act-order without static groups: g_idx is a permutation-based, non-monotonic map
    assert sorted(torch.bincount(res.g_idx.long()).tolist()) == [16, 32, 32]
    assert not torch.equal(res.g_idx, torch.sort(res.g_idx).values)


def test_static_groups_with_act_order_keep_monotonic_g_idx():
    W, H, _ = problem(12, 80, seed=9)
    res = gptq_solve(W, H, 4, 32, sym=True, desc_act=True, static_groups=True, blocksize=20)
    assert torch.equal(res.g_idx, (torch.arange(80) // 32).to(torch.int32))
    assert (res.zeros == 8).all()


# --------------------------------------------------------------------------- static group order
@pytest.mark.parametrize("K,g", [(80, 32), (96, 32), (96, 48), (37, 8), (16, 16)])
def test_group_solve_order_keeps_static_groups_contiguous(K, g):
    from gptqkit.quant.gptq import solve_permutation
    gen = torch.Generator().manual_seed(K + g)
    d = torch.rand(K, generator=gen, dtype=DT) * torch.linspace(0.1, 3.0, K, dtype=DT)[torch.randperm(K, generator=gen)]
    perm = solve_permutation(d, g, "groups")
    assert sorted(perm.tolist()) == list(range(K))           # a permutation
    runs, pos = [], 0                                         # consecutive runs of one group each
    while pos < K:
        grp = int(perm[pos]) // g
        size = min(g, K - grp * g)
        run = perm[pos:pos + size]
        assert (run // g == grp).all(), f"group {grp} is not one contiguous run"
        assert (d[run][:-1] >= d[run][1:]).all(), "columns inside a group not by descending diag"
        runs.append(grp)
        pos += size
    assert sorted(runs) == list(range(math.ceil(K / g)))
    sums = [float(d[r * g:(r + 1) * g].sum()) for r in runs]
    assert sums == sorted(sums, reverse=True), "groups not by descending diag sum"
    # the default order is plain act-order, and on these inputs the two differ
    assert torch.equal(solve_permutation(d, g, "columns"), torch.argsort(d, descending=True))
    if K > g:
        assert not torch.equal(perm, solve_permutation(d, g, "columns"))


@pytest.mark.parametrize("bits,gs,sym,mse,blocksize", [
    (4, 32, True, False, 20), (3, 48, False, False, 28), (2, 32, False, True, 7), (4, 64, True, True, 128),
    (8, 32, True, False, 1), (3, 32, False, "norm", 16),
])
def test_group_solve_order_matches_reference(bits, gs, sym, mse, blocksize):
    """solve_order="groups" equals the unblocked reference solving the static groups in turn, for
    ragged groups (K=80), groups cut by the blocks, and the clip search weighted in that order."""
    W, H, _ = problem(12, 80, seed=30 + bits)
    what = f"groups bits={bits} gs={gs} sym={sym} mse={mse} bs={blocksize}"
    res = gptq_solve(W, H, bits, gs, sym=sym, desc_act=True, static_groups=True, mse=mse,
                     blocksize=blocksize, solve_order="groups")
    ref = reference_gptq(W, H, bits, gs, sym, True, True, mse=mse, solve_order="groups")
    assert_matches_reference(res, ref, what)
    assert torch.equal(res.g_idx, (torch.arange(80) // gs).to(torch.int32))  # layout as the default's
    cols = gptq_solve(W, H, bits, gs, sym=sym, desc_act=True, static_groups=True, mse=mse, blocksize=blocksize)
    assert res.loss != cols.loss  # really another order


def test_group_solve_order_with_dead_columns_and_ties():
    """Dead columns (no input: diag set to 1, so several tie) and a whole dead group: ties break
    by lower column first in both the solver and the reference."""
    W, H, X = problem(12, 80, seed=43)
    X = X.clone()
    dead = [3, 17, 40, 41, 42, 79] + list(range(48, 64))
    X[:, dead] = 0
    H = 2 * X.T @ X / X.shape[0]
    res = gptq_solve(W, H, 4, 16, sym=False, desc_act=True, static_groups=True, blocksize=20,
                     solve_order="groups")
    assert_matches_reference(res, reference_gptq(W, H, 4, 16, False, True, True, solve_order="groups"),
                             "groups, dead columns")


def test_group_solve_order_needs_act_order_with_static_groups():
    W, H, _ = problem(8, 64, seed=42)
    with pytest.raises(ValueError, match="solve_order"):
        gptq_solve(W, H, 4, 16, desc_act=True, static_groups=True, solve_order="group")
    for desc_act, static in ((False, True), (True, False), (False, False)):
        with pytest.raises(ValueError, match="desc_act=True and static_groups=True"):
            gptq_solve(W, H, 4, 16, desc_act=desc_act, static_groups=static, solve_order="groups")
