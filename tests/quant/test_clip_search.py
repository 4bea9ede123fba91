"""The C++ clip search (kernels/cpu.py::clip_search, csrc/cpu_kernels.cpp gk_clip_search) against
find_params' torch loop, which stays the reference.

Each candidate's grid and per-element error terms must be torch's fp32 values bit for bit; only
the row sums differ (double vs fp32 accumulation), so a row may pick another candidate only when
the two candidates' errors are within a relative 1e-5 of each other, checked here in float64.
"""
from __future__ import annotations

import logging
import math

import pytest
import torch

from gptqkit.kernels import cpu
from gptqkit.quant import grid
from gptqkit.quant.gptq import gptq_solve
from gptqkit.quant.grid import dequantize, find_params, quantize

pytestmark = pytest.mark.skipif(cpu.get_lib() is None, reason=f"CPU kernel unavailable: {cpu.lib_error()}")

NORM = 2.4


def torch_loop(w, bits, sym, zero_min, weight, norm=NORM):
    saved = grid.CPU_KERNEL
    grid.CPU_KERNEL = False
    try:
        return find_params(w, bits, sym, True, zero_min, norm=norm, weight=weight)
    finally:
        grid.CPU_KERNEL = saved


def make_group(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Random fp32 rows of every awkward kind: normal, heavy-tailed, all zero, constant (positive,
    negative), one-sided, huge (the fp16 scale overflows for the widest ranges), tiny (the 2^-14
    scale clamp), subnormal, and a single outlier."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    kinds = torch.randint(0, 12, (rows,), generator=g)
    for r in range(rows):
        k = int(kinds[r])
        if k == 1:
            w[r] = torch.randn(cols, generator=g) ** 3 * 10
        elif k == 2:
            w[r] = 0
        elif k == 3:
            w[r] = float(torch.randn(1, generator=g))
        elif k == 4:
            w[r] = -float(torch.rand(1, generator=g)) * 3
        elif k == 5:
            w[r] = torch.rand(cols, generator=g)
        elif k == 6:
            w[r] *= 10.0 ** float(torch.randint(3, 7, (1,), generator=g))
        elif k == 7:
            w[r] *= 10.0 ** -float(torch.randint(3, 9, (1,), generator=g))
        elif k == 8:
            w[r] *= 1e-40
        elif k == 9:
            w[r] *= 1e-3
            w[r, int(torch.randint(0, cols, (1,), generator=g))] = 5.0
    return w


def errors64(w, scale, zero, bits, weight, norm=NORM) -> torch.Tensor:
    """Each row's error of the grid (scale, zero), in float64 (the codes as the grid gives them)."""
    maxq = (1 << bits) - 1
    q = quantize(w, scale[:, None], zero[:, None], maxq)
    e = dequantize(q.double(), scale[:, None].double(), zero[:, None].double()) - w.double()
    return (e.square() * weight.double()).sum(1) if weight is not None else e.abs().pow(norm).sum(1)


def assert_same_or_tie(w, bits, sym, zero_min, weight, got, want, norm=NORM) -> int:
    """Scales and zeros equal, except on rows whose two choices' errors are within 1e-5; returns
    the number of such rows."""
    (s1, z1), (s0, z0) = got, want
    assert s1.dtype == s0.dtype == torch.float32 and s1.shape == s0.shape == (w.shape[0],)
    # both sides' zero points are whole numbers in [zero_min, maxq] (sym: 2^(b-1))
    assert torch.equal(z1, torch.round(z1))
    diff = ~((s1 == s0) & (z1 == z0))
    if not diff.any():
        return 0
    rows = diff.nonzero().flatten()
    e1 = errors64(w[rows], s1[rows], z1[rows], bits, weight, norm)
    e0 = errors64(w[rows], s0[rows], z0[rows], bits, weight, norm)
    rel = (e1 - e0).abs() / torch.maximum(e1.abs(), e0.abs()).clamp_min(1e-300)
    bad = ~(rel <= 1e-5)
    assert not bad.any(), (f"rows {rows[bad].tolist()}: kernel {s1[rows][bad].tolist()} {z1[rows][bad].tolist()} "
                           f"err {e1[bad].tolist()} vs torch {s0[rows][bad].tolist()} {z0[rows][bad].tolist()} "
                           f"err {e0[bad].tolist()}")
    return int(rows.numel())


@pytest.mark.parametrize("cols", [32, 64, 128, 77])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("weighted", [True, False])
def test_matches_torch_loop(cols, bits, weighted):
    ties = total = 0
    # rows: the kernel takes 16 at a time (1: one partial chunk; 45: two whole and a partial)
    for i, (sym, zero_min, rows) in enumerate([(True, 0, 45), (False, 0, 45), (False, 1, 16), (False, 0, 1),
                                               (True, 0, 16)]):
        seed = 1000 * bits + 10 * cols + 7 * i + weighted
        w = make_group(rows, cols, seed)
        weight = (torch.rand(cols, generator=torch.Generator().manual_seed(seed)) * 4) ** 3 if weighted else None
        got = find_params(w, bits, sym, True, zero_min, weight=weight)
        ties += assert_same_or_tie(w, bits, sym, zero_min, weight, got, torch_loop(w, bits, sym, zero_min, weight))
        total += rows
    assert ties <= max(1, total // 50)  # near-ties are rare; many would mean a real difference


def check_candidate_errors(w, bits, sym, zero_min, weight, norm=NORM):
    """Every candidate's error from the kernel against find_params' loop (its params() and error
    terms): the kernel's double sum of its fp32 terms, rounded to fp32, must equal the double sum
    of torch's fp32 terms, bit for bit, so each candidate's grid and each term are torch's.
    |e|^norm for norm != 2 is SLEEF's in torch (<= 1 ulp) and ~correctly rounded in the kernel:
    there the sums agree to a few fp32 ulps, and to 1 ulp with correctly rounded terms.
    Returns the kernel's (scale, zero, errors)."""
    s1, z1, E = cpu.clip_search(w, bits, sym, zero_min, norm, 100, 0.8, weight, errors=True)
    assert E.shape == (w.shape[0], 80)
    maxq = (1 << bits) - 1
    for i in range(80):
        p = 1 - i / 100
        sp, zp = grid_params(w, p, bits, sym, zero_min)
        err = dequantize(quantize(w, sp[:, None], zp[:, None], maxq), sp[:, None], zp[:, None]) - w
        terms = err.square() * weight if weight is not None else err.abs().pow(norm)
        want = terms.double().sum(1).float()
        if weight is None and norm != 2:
            torch.testing.assert_close(E[:, i], want, rtol=4e-7, atol=0, equal_nan=True)
            # each term correctly rounded to fp32 (as the kernel's, but for ~1e-5 of them)
            exact = (err.double().abs() ** float(torch.tensor(norm, dtype=torch.float32))).float()
            torch.testing.assert_close(E[:, i], exact.double().sum(1).float(), rtol=1.5e-7, atol=0, equal_nan=True)
        else:
            assert torch.equal(E[:, i].nan_to_num(-1.0), want.nan_to_num(-1.0)), \
                f"candidate {i}: rows {(E[:, i].nan_to_num(-1.0) != want.nan_to_num(-1.0)).nonzero().flatten().tolist()}"
    return s1, z1, E


@pytest.mark.parametrize("mode", ["weighted", "norm2", "norm"])
@pytest.mark.parametrize("sym", [True, False])
def test_candidate_errors_bit_exact(mode, sym):
    bits, zero_min, cols, rows = 3, 0 if sym else 1, 77, 40
    w = make_group(rows, cols, 5 + sym)
    w[0] *= 1e6  # every candidate's fp16 scale overflows: all errors NaN, the p = 1 grid stays
    w[1] = torch.linspace(-2.4e5, 2.4e5, cols)  # the widest candidates overflow, the rest do not
    weight = torch.rand(cols, generator=torch.Generator().manual_seed(3)) + 0.1 if mode == "weighted" else None
    s1, _, E = check_candidate_errors(w, bits, sym, zero_min, weight, 2.0 if mode == "norm2" else NORM)
    assert E[0].isnan().all() and E[1, :5].isnan().all() and not E[1, -5:].isnan().any()
    assert s1[0] == float("inf")


def half_points_a_reciprocal_misrounds(cols: int) -> torch.Tensor:
    """Rows [7.5·s, −7.5·s, x...] (4-bit symmetric: the p = 1 grid step is exactly the fp16 value
    s) whose x lie one ulp off a half step, where x·(1/s) rounds to the half step itself and so to
    another code than the true x/s does: only an exact division gives torch's errors."""
    sv = torch.arange(0x3800, 0x3c00, dtype=torch.int16).view(torch.float16).float()[:, None]  # [0.5, 1)
    c = (torch.arange(-7, 7).float() + 0.5) * sv
    x = torch.cat([torch.nextafter(c, torch.full_like(c, 1e9)), torch.nextafter(c, torch.full_like(c, -1e9))], 1)
    bad = torch.round(x / sv) != torch.round(x * (1 / sv))
    out = []
    for r in bad.any(1).nonzero().flatten()[:6].tolist():
        xs = x[r][bad[r]]
        row = torch.zeros(cols)
        row[0], row[1] = 7.5 * sv[r], -7.5 * sv[r]
        row[2:2 + min(xs.numel(), cols - 2)] = xs[:cols - 2]
        out.append(row)
    assert len(out) >= 2
    return torch.stack(out)


def p_rounding_rows(cols: int) -> torch.Tensor:
    """Asymmetric rows [0, hi]: for some candidate p, p·hi in fp32 (p rounded to fp32, as torch
    computes p * tensor) and p·hi rounded once from double give different fp16 scales."""
    hi = torch.rand(1 << 18, generator=torch.Generator().manual_seed(0)) + 0.5
    rows = []
    for i in range(1, 80):
        pd = 1 - i / 100
        hit = (((pd * hi) / 15).half() != ((pd * hi.double()).float() / 15).half()).nonzero().flatten()
        if hit.numel():
            rows.append(torch.linspace(0, float(hi[hit[0]]), cols))
        if len(rows) == 8:
            break
    return torch.stack(rows)


@pytest.mark.parametrize("weighted", [True, False])
def test_exact_corner_cases(weighted):
    """Rows built so that the usual shortcuts give other grids or errors than torch: a reciprocal
    instead of a division, fp16 conversion ties, zero-point ties (round half to even), p·x with
    p in double, and all-zero weights (every error 0: the strict "<" keeps the p = 1 grid)."""
    cols = 32
    m_even, m_odd = 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11  # fp16 midpoints: RNE goes down / up
    ties16 = [torch.linspace(0, 15 * m, cols) for m in (m_even, m_odd, 0.5 * m_even, 64 * m_odd)]
    s = float(torch.tensor(0.1).half())
    zties = [torch.linspace(-k * s, (15 - k) * s, cols) for k in (6.5, 7.5, 5.5, 4.5)]  # −lo/s = k
    asym = torch.stack([*ties16, *zties, *p_rounding_rows(cols)])
    weight = torch.rand(cols, generator=torch.Generator().manual_seed(1)) + 0.5 if weighted else None
    for w, sym in ((half_points_a_reciprocal_misrounds(cols), True), (asym, False)):
        s1, z1, _ = check_candidate_errors(w, 4, sym, 0, weight)
        assert_same_or_tie(w, 4, sym, 0, weight, (s1, z1), torch_loop(w, 4, sym, 0, weight))
    # the fp16 ties and the zero-point ties are in the p = 1 grids
    want_s = torch.tensor([m_even, m_odd, 0.5 * m_even, 64 * m_odd]).half().float()
    assert torch.equal(want_s, torch.tensor([1.0, 1 + 2.0 ** -9, 0.5, 64 * (1 + 2.0 ** -9)]))
    s0, z0 = find_params(asym[:8], 4, False)
    assert torch.equal(s0[:4], want_s) and torch.equal(z0[4:8], torch.tensor([6.0, 8.0, 6.0, 4.0]))
    if weighted:
        zero_w = torch.zeros(cols)
        got = find_params(asym, 4, False, True, weight=zero_w)
        want = torch_loop(asym, 4, False, 0, zero_w)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert torch.equal(got[0], find_params(asym, 4, False)[0])  # the p = 1 grid


def grid_params(w, p, bits, sym, zero_min):
    """find_params' params(p·xmin, p·xmax), through find_params itself on a row set whose
    range is exactly that (mse off)."""
    zero_t = torch.zeros(w.shape[0])
    lo = p * torch.minimum(w.min(1).values, zero_t)
    hi = p * torch.maximum(w.max(1).values, zero_t)
    return find_params(torch.stack([lo, hi], 1), bits, sym, False, zero_min)


def test_strided_input_and_many_rows():
    w = make_group(300, 200, 11)
    sub = w[:, 40:168]  # a group of a wider matrix: row stride 200, not copied
    weight = torch.rand(128) + 0.5
    got = find_params(sub, 4, False, True, 1, weight=weight)
    assert_same_or_tie(sub, 4, False, 1, weight, got, torch_loop(sub.contiguous(), 4, False, 1, weight))
    assert all(torch.equal(a, b) for a, b in zip(got, find_params(sub.contiguous(), 4, False, True, 1, weight=weight)))
    t = torch.get_num_threads()
    try:  # the thread count changes nothing
        torch.set_num_threads(1)
        one = find_params(sub, 4, False, True, 1, weight=weight)
    finally:
        torch.set_num_threads(t)
    assert all(torch.equal(a, b) for a, b in zip(got, one))


def test_fallbacks(monkeypatch, caplog):
    w = make_group(20, 64, 3)
    weight = torch.rand(64) + 0.5
    calls = []
    real = cpu.clip_search

    def spy(*a, **k):
        r = real(*a, **k)
        calls.append(r is not None)
        return r

    monkeypatch.setattr(cpu, "clip_search", spy)
    monkeypatch.setattr(cpu, "_clip_logged", set())
    with caplog.at_level(logging.DEBUG, logger="gptqkit"):
        # float64 (the tests' math dtype) runs the torch loop: the result is the loop's exactly
        s, z = find_params(w.double(), 4, False, True, weight=weight.double())
        assert s.dtype == torch.float64
        s0, z0 = torch_loop(w.double(), 4, False, 0, weight.double())
        assert torch.equal(s, s0) and torch.equal(z, z0)
        # a float32 group with a float64 weight, and non-finite values: the loop too
        find_params(w, 4, False, True, weight=weight.double())
        bad = w.clone()
        bad[3, 5] = float("nan")
        s, z = find_params(bad, 4, False, True, weight=weight)
        s0, z0 = torch_loop(bad, 4, False, 0, weight)
        assert torch.equal(s.nan_to_num(-1), s0.nan_to_num(-1)) and torch.equal(z.nan_to_num(-1), z0.nan_to_num(-1))
        find_params(w, 4, False, True, weight=weight)
    assert calls == [False, False, False, True]
    assert "the kernel takes non-empty 2-D float32 CPU groups" in caplog.text
    assert "non-finite values" in caplog.text

    # no library (here: GPTQKIT_DISABLE_CPU_KERNEL, re-read by a fresh build attempt): the loop,
    # with the reason logged once at INFO
    monkeypatch.setattr(cpu, "_lib", None)
    monkeypatch.setattr(cpu, "_lib_error", None)
    monkeypatch.setenv("GPTQKIT_DISABLE_CPU_KERNEL", "1")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gptqkit"):
        s, z = find_params(w, 4, False, True, weight=weight)
        find_params(w, 4, False, True, weight=weight)
    assert calls[-2:] == [False, False]
    s0, z0 = torch_loop(w, 4, False, 0, weight)
    assert torch.equal(s, s0) and torch.equal(z, z0)
    msgs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("clip search:")]
    assert len(msgs) == 1 and "GPTQKIT_DISABLE_CPU_KERNEL" in msgs[0], msgs


@pytest.mark.parametrize("mse", [True, "norm"])
@pytest.mark.parametrize("cfg", [dict(group_size=64), dict(group_size=128, desc_act=True),
                                 dict(group_size=64, desc_act=True, static_groups=True),
                                 dict(group_size=-1, sym=False, zero_min=1)])
def test_gptq_solve_same_as_torch_search(mse, cfg):
    """The solve with the C++ search gives the torch search's Q exactly on these layers. (It could
    legitimately differ where a group's two best candidates tie to ~1e-7: the rest of that group
    and every later column would follow the other grid.)"""
    g = torch.Generator().manual_seed(7)
    N, K = 48, 200  # ragged last group
    W = torch.randn(N, K, generator=g)
    X = torch.randn(512, K, generator=g) * torch.rand(K, generator=g) * 2
    H = X.T @ X / 512
    kw = dict(bits=4, sym=True, mse=mse) | cfg
    r1 = gptq_solve(W, H, **kw)
    saved = grid.CPU_KERNEL
    grid.CPU_KERNEL = False
    try:
        r0 = gptq_solve(W, H, **kw)
    finally:
        grid.CPU_KERNEL = saved
    assert torch.equal(r1.q, r0.q)
    assert torch.equal(r1.scales, r0.scales) and torch.equal(r1.zeros, r0.zeros)
    assert math.isclose(r1.loss, r0.loss, rel_tol=0, abs_tol=0)
