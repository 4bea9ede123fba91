"""GPTQ's column loop in C++ (kernels/cpu.py::gptq_columns, csrc gk_gptq_columns) against the
solver's torch loop, which stays the reference (float64 and CUDA always run it).

The kernel repeats torch's fp32 arithmetic operation for operation, including which elements of
addr_'s rank-1 updates ATen fuses into one multiply-add (kernels/cpu.py::addr_fused_width, measured
on torch's own addr_), so the solve is the same bits either way: codes, grids, loss. Checked here
under each of torch's CPU capabilities this machine has (ATEN_CPU_CAPABILITY in a subprocess).
"""
from __future__ import annotations

import pytest
import torch

from gptqkit.kernels import cpu
from gptqkit.quant import gptq
from gptqkit.quant.gptq import gptq_solve

pytestmark = pytest.mark.skipif(cpu.get_lib() is None, reason=f"CPU kernel unavailable: {cpu.lib_error()}")
EXACT = cpu.addr_fused_width(True) is not None and cpu.addr_fused_width(False) is not None


def problem(N: int, K: int, seed: int, gptaq: bool = False):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g) * (1 + torch.rand(K, generator=g) * 3)
    X = torch.randn(4 * K, K, generator=g) @ (torch.eye(K) + 0.3 * torch.randn(K, K, generator=g) / K ** 0.5)
    H = 2 * X.T @ X / X.shape[0]
    D = None
    if gptaq:
        Xf = X + 0.05 * torch.randn(X.shape, generator=g)
        D = 2 * (Xf - X).T @ X / X.shape[0]
    return W, H, D


def solve(kernel: bool, monkeypatch, *a, **k):
    monkeypatch.setattr(gptq, "COLUMN_KERNEL", kernel)
    return gptq_solve(*a, **k)


def assert_same(a, b, what):
    if EXACT:
        assert torch.equal(a.q, b.q), f"{int((a.q != b.q).sum())} codes differ: {what}"
        assert torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros), what
        assert a.loss == b.loss, what
    else:  # a torch build whose addr_ this kernel does not mirror: within fp32 rounding
        assert (a.q != b.q).float().mean() < 1e-3, what
        assert abs(a.loss - b.loss) <= 1e-4 * abs(b.loss), what
    assert torch.equal(a.g_idx, b.g_idx) and a.method == b.method, what


CASES = [  # N, K, bits, group_size, desc_act, static_groups, sym, mse, blocksize
    (130, 256, 4, 128, True, True, True, True, 128),     # the default
    (130, 256, 4, 128, False, False, True, False, 128),
    (64, 200, 3, 32, True, False, False, False, 128),   # ragged last block, act-order, dynamic groups
    (33, 192, 2, 96, False, False, False, True, 64),     # groups straddle blocks
    (7, 160, 8, -1, True, False, True, False, 48),
    (1, 96, 4, 256 // 8, False, True, False, True, 40),  # one row; static groups, blocks of 40
    (20, 128, 4, 64, True, True, False, "norm", 128),
]


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
@pytest.mark.parametrize("gptaq", [False, True])
def test_kernel_matches_torch_loop(case, gptaq, monkeypatch):
    N, K, bits, gs, act, static, sym, mse, bsz = case
    W, H, D = problem(N, K, seed=N + K + bits, gptaq=gptaq)
    args = (W, H, bits, gs, sym, act, static, 0.01, 0.0025, mse, bsz)
    ref = solve(False, monkeypatch, *args, dXXt=D)
    calls = []
    real = cpu.gptq_columns
    monkeypatch.setattr(cpu, "gptq_columns", lambda *a, **k: calls.append(real(*a, **k)) or calls[-1])
    got = solve(True, monkeypatch, *args, dXXt=D)
    assert calls and all(calls), "the kernel did not run every column"
    assert_same(got, ref, f"{case} gptaq={gptaq}")


@pytest.mark.parametrize("threads", [1, 2])
def test_rows_in_parallel_same_bits(threads, monkeypatch):
    W, H, _ = problem(300, 256, seed=5)
    torch_threads = torch.get_num_threads()
    try:  # (the loss is a torch sum, whose order depends on the thread count: same for both)
        torch.set_num_threads(threads)
        got = solve(True, monkeypatch, W, H, 4, 128, True, True, True)
        ref = solve(False, monkeypatch, W, H, 4, 128, True, True, True)
    finally:
        torch.set_num_threads(torch_threads)
    assert_same(got, ref, f"{threads} threads")


@pytest.mark.skipif(not EXACT, reason="this torch build's addr_ fuses no fixed prefix of a row")
def test_fused_width_is_what_makes_it_exact(monkeypatch):
    """Another width (none fused, all fused) gives other errors than torch's loop: the measured
    width is what the bit-equality rests on."""
    W, H, _ = problem(64, 256, seed=9)
    g = torch.Generator().manual_seed(1)
    Wb = W[:, :128].contiguous()
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Hinv1 = Hinv[:128, :128].contiguous()
    S = (Wb.abs().amax(1) / 7 + torch.rand(64, generator=g) * 1e-3)[None]
    Z = torch.full_like(S, 8.0)
    gcol = torch.zeros(128, dtype=torch.int32)

    def run(width):
        monkeypatch.setattr(cpu, "addr_fused_width", lambda contiguous=True: width)
        Wk, Q, E = Wb.clone(), torch.zeros_like(Wb), torch.zeros_like(Wb)
        assert cpu.gptq_columns(Wk, 0, 128, Hinv1, S, Z, gcol, 15, Q, E)
        return Q, E

    Qt, Et = torch.zeros_like(Wb), torch.zeros_like(Wb)
    monkeypatch.setattr(gptq, "COLUMN_KERNEL", False)
    gptq._columns(Wb.clone(), 0, 128, Hinv1, S, Z, gcol, 15, Qt, Et, None, None)
    width = cpu.addr_fused_width(True)
    assert torch.equal(run(width)[1], Et)
    for other in {0, 1} - {width}:
        assert not torch.equal(run(other)[1], Et), other


def test_float64_and_fallback_use_the_torch_loop(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu, "gptq_columns", lambda *a, **k: calls.append(1) or False)
    W, H, _ = problem(16, 64, seed=2)
    a = solve(True, monkeypatch, W, H, 4, 32)        # kernel declines: the torch loop runs
    b = solve(False, monkeypatch, W, H, 4, 32)
    assert calls and torch.equal(a.q, b.q)
    calls.clear()
    solve(True, monkeypatch, W.double(), H.double(), 4, 32)
    assert not calls


_CHECK = """
import torch
from gptqkit.kernels import cpu
from gptqkit.quant import gptq
g = torch.Generator().manual_seed(4)
W = torch.randn(40, 192, generator=g)
X = torch.randn(600, 192, generator=g)
H = 2 * X.T @ X / 600
D = 2 * (0.05 * torch.randn(600, 192, generator=g)).T @ X / 600
out = []
for kernel in (False, True):
    gptq.COLUMN_KERNEL = kernel
    out.append(gptq.gptq_solve(W, H, 4, 64, False, True, False, mse=True, blocksize=48, dXXt=D))
a, b = out
assert cpu.addr_fused_width(True) is not None and cpu.addr_fused_width(False) is not None, "unexplained"
assert torch.equal(a.q, b.q) and a.loss == b.loss, (int((a.q != b.q).sum()), a.loss, b.loss)
print(torch.backends.cpu.get_cpu_capability(), cpu.addr_fused_width(True), cpu.addr_fused_width(False))
"""


@pytest.mark.parametrize("cap", ["default", "avx2", "avx512"])
def test_exact_under_each_torch_capability(cap):
    """torch dispatches addr_ to the DEFAULT, AVX2 or AVX-512 build of its kernels by the CPU (or
    ATEN_CPU_CAPABILITY): the measured width must make the kernel exact under each of them that
    this machine can run."""
    import os
    import subprocess
    import sys
    order = ["default", "avx2", "avx512"]
    have = torch.backends.cpu.get_cpu_capability().lower()
    if have not in order or order.index(cap) > order.index(have):
        pytest.skip(f"this CPU runs torch's {have} kernels at most")
    r = subprocess.run([sys.executable, "-c", _CHECK], env={**os.environ, "ATEN_CPU_CAPABILITY": cap},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[0].lower() == cap
