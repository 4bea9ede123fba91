"""The cpu backend's int8-activation GEMM (gk_gemm_i8, opt-in: GPTQKIT_CPU_I8_MIN_M): each row of
x is rounded to int8 per block of input features (x ~ a·xq, a = max|x|/127) and the layer computes
W_deq · x̂ exactly in integers plus fp32 scales. Checked against a float64 product with the same
x̂ built here (so only fp32 rounding may differ), bit-equal across thread counts and between the
custom op and the ctypes path, and only taken where it applies."""
from __future__ import annotations

import copy

import pytest
import torch

from gptqkit.errors import BackendError
from gptqkit.kernels import cpu
from test_cpu import prepare_with as prepared  # CpuBackend settings read at prepare time

pytestmark = [
    pytest.mark.skipif(cpu.get_lib() is None, reason=f"CPU kernel unavailable: {cpu.lib_error()}"),
    pytest.mark.skipif(not cpu.i8_available(), reason="no int8-activation kernel in this build (needs AVX2)"),
]

# (K, N, group_size): ragged last group, one group of 352 (-1: three scale runs, the last of 96),
# groups of 32, 128-row runs
# groups of 36: runs whole quads but not whole pairs of quads (the kernel's general block loop;
# the others take its pair stream, csrc/cpu_kernels.cpp)
SHAPES = [(96, 77, 64), (160, 33, 128), (224, 130, 32), (352, 64, -1), (288, 40, 36)]


def x_hat(x2: torch.Tensor, seg: torch.Tensor, block: int) -> torch.Tensor:
    """float64 x̂ of rows x2 (already in the layout's row order), as csrc/cpu_kernels.cpp defines
    it: each run [seg[g], seg[g+1]) cut into scale runs of <= 128 features, each into blocks of
    `block` (0: one block per scale run); a scale run has a = max|x|/127, a block the scale
    a·2^-e with e <= 7 the largest such that max_block·2^e <= max_run. 127/max and max/127 are IEEE
    fp32 divisions (the double quotient rounded once to fp32 is the correctly rounded fp32 one),
    x·ia in fp32, rounded half to even, clamped to ±127."""
    out = torch.zeros(x2.shape, dtype=torch.float64)
    for g in range(seg.numel() - 1):
        for r0 in range(int(seg[g]), int(seg[g + 1]), 128):
            r1 = min(int(seg[g + 1]), r0 + 128)
            amr = x2[:, r0:r1].abs().amax(1, keepdim=True)  # fp32
            iar = torch.where(amr > 0, 127 / amr.double(), torch.zeros_like(amr, dtype=torch.float64)).float()
            ar = (amr.double() / 127).float().double()
            for b0 in range(r0, r1, block or (r1 - r0)):
                b1 = min(r1, b0 + block) if block else r1
                xs = x2[:, b0:b1]
                amb = xs.abs().amax(1, keepdim=True)
                e = torch.zeros_like(amb)
                for _ in range(7):  # largest e <= 7 with amb·2^(e+1) <= amr, step by step
                    e = torch.where(amb * 2 ** (e + 1) <= amr, e + 1, e)
                xq = torch.round(xs * (iar * 2 ** e)).clamp(-127, 127)
                out[:, b0:b1] = xq.double() * ar * 2.0 ** (-e.double())
    return out


def reference(layer, ref, x: torch.Tensor, block: int) -> torch.Tensor:
    L = layer.layout
    x2 = x.reshape(-1, L.K).float()
    w64 = ref.weight.double().T  # [K, N], checkpoint row order
    if L.perm is not None:
        x2, w64 = x2[:, L.perm], w64[L.perm]
    y = x_hat(x2, L.seg, block) @ w64
    if ref.bias is not None:
        y = y + ref.bias.double()
    return y.reshape(*x.shape[:-1], L.N)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("block", [32, 0, 8, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_product_of_rounded_x(make_layer, make_pair, relerr, bits, sym, act_order, block, shape):
    K, N, g = shape
    layer, ref = make_pair(make_layer(K, N, bits, g, sym=sym, fmt="gptq_v2" if sym else "gptq",
                                      act_order=act_order, bias=True, seed=bits * 5 + K), "cpu")
    prepared(layer, use_dp="0", i8_min_m=1, i8_block=block)
    assert layer.layout.i8_min_m == 1 and layer.layout.i8_block == block
    gen = torch.Generator().manual_seed(K + N + block)
    for M in (1, 2, 3, 4, 5, 7, 16, 41):  # tiles of 3 (AVX2) / 4 (AVX-512) rows and remainders
        x = torch.randn(M, K, generator=gen) * torch.rand(K, generator=gen) * 4  # uneven channels
        y = layer(x)
        assert relerr(y, reference(layer, ref, x, block)) < 1e-6, M
        # and it is x's rounding, not the exact product: close to it, but not equal
        exact = x.double() @ ref.weight.double().T + ref.bias.double()
        assert 1e-4 < relerr(y, exact) < 3e-2, M


def test_zero_rows_and_3d_half_inputs(make_layer, make_pair, relerr):
    layer, ref = make_pair(make_layer(160, 77, 4, 32, sym=False, act_order=True), "cpu")
    prepared(layer, use_dp="0", i8_min_m=2, i8_block=32)
    x = torch.randn(2, 3, 160)
    x[0, 1] = 0  # an all-zero row: scale 0, output exactly the zero-point-free 0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        xd = x.to(dtype)
        y = layer(xd)
        assert y.shape == (2, 3, 77) and y.dtype == dtype
        assert relerr(y.float(), reference(layer, ref, xd.float(), 32).float()) < (1e-6 if dtype is torch.float32 else 1e-2)
        assert torch.all(y[0, 1] == 0)


def test_bit_equal_across_threads(make_layer, relerr):
    """Rows are cut into chunks when blocks are fewer than threads; each output element is
    computed the same way in any split."""
    layer = prepared(make_layer(320, 130, 4, 128, sym=False, act_order=True, bias=True, seed=3),
                     use_dp="0", i8_min_m=1, i8_block=32)
    gen = torch.Generator().manual_seed(0)
    saved = torch.get_num_threads()
    try:
        for M in (1, 5, 13, 50, 77):
            x = torch.randn(M, 320, generator=gen)
            torch.set_num_threads(1)
            y1 = layer(x)
            torch.set_num_threads(4)
            assert torch.equal(y1, layer(x)), M
    finally:
        torch.set_num_threads(saved)


@pytest.mark.skipif(cpu.get_op() is None, reason=f"CPU custom op unavailable: {cpu.op_error()}")
@pytest.mark.parametrize("act_order", [False, True])
def test_op_bit_equal_to_ctypes(make_layer, act_order):
    base = make_layer(224, 200, 4, 32, sym=False, act_order=act_order, bias=True, seed=4)
    via_op = prepared(copy.deepcopy(base), use_op=True, use_dp="0", i8_min_m=4, i8_block=32)
    via_ctypes = prepared(copy.deepcopy(base), use_op=False, use_dp="0", i8_min_m=4, i8_block=32)
    assert via_op.layout.op_args is not None and via_ctypes.layout.op_args is None
    gen = torch.Generator().manual_seed(1)
    for shape in ((1, 224), (3, 224), (4, 224), (13, 224), (2, 5, 224)):  # below and above the threshold
        x = torch.randn(*shape, generator=gen)
        for dtype in (torch.float32, torch.bfloat16):
            a, b = via_op(x.to(dtype)), via_ctypes(x.to(dtype))
            assert a.dtype == b.dtype == dtype and torch.equal(a, b), (shape, dtype)


def test_threshold_and_where_it_applies(make_layer, make_pair, relerr):
    """Below the threshold the exact FMA kernel runs (equal to i8_min_m=0); 2- and 8-bit layers,
    the bf16 dot-product layout and groups that are not whole quads of rows never take it."""
    layer, ref = make_pair(make_layer(160, 70, 4, 32, sym=True, seed=1), "cpu")
    exact = prepared(copy.deepcopy(layer), use_dp="0", i8_min_m=0)
    prepared(layer, use_dp="0", i8_min_m=8, i8_block=32)
    x = torch.randn(8, 160)
    assert torch.equal(layer(x[:7]), exact(x[:7]))
    assert not torch.equal(layer(x), exact(x))
    assert relerr(layer(x), reference(layer, ref, x, 32)) < 1e-6
    for bits, g in ((2, 32), (8, 32), (4, 6)):  # groups of 6 rows: not whole quads
        other = prepared(make_layer(96, 40, bits, g, seed=bits), use_dp="0", i8_min_m=1)
        assert other.layout.i8_min_m == 0, (bits, g)
    if cpu.dp_available():
        dp = prepared(make_layer(160, 70, 4, 32, seed=2), use_dp="1", i8_min_m=1)
        assert dp.layout.dp and dp.layout.i8_min_m == 0


def test_env_setting(monkeypatch):
    monkeypatch.delenv("GPTQKIT_CPU_I8_MIN_M", raising=False)
    assert cpu._i8_min_m() == cpu.I8_MIN_M == 0  # off unless asked for: it changes the numbers
    monkeypatch.setenv("GPTQKIT_CPU_I8_MIN_M", "32")
    assert cpu._i8_min_m() == 32
    monkeypatch.setenv("GPTQKIT_CPU_I8_MIN_M", "many")
    with pytest.raises(BackendError, match="GPTQKIT_CPU_I8_MIN_M='many'.*0 to never"):
        cpu._i8_min_m()


def test_set_int8_activations_on_a_model(make_layer, make_pair, relerr, monkeypatch):
    """kernels.cpu.set_int8_activations (behind gptqkit.load(int8_activations=...) and the CLI's
    --int8-activations): eligible layers take the int8 GEMM from the given rows on, others keep the
    exact kernel, the choice outlives a new prepare (a move, a reload), and False gives back the
    exact kernel bit for bit."""
    monkeypatch.delenv("GPTQKIT_CPU_I8_MIN_M", raising=False)
    q4, ref = make_pair(make_layer(160, 70, 4, 32, sym=False, act_order=True, seed=1), "cpu")
    model = torch.nn.Sequential(prepared(q4, use_dp="0"), prepared(make_layer(160, 64, 8, 32, seed=2), use_dp="0"))
    q8 = model[1]
    exact = prepared(copy.deepcopy(q4), use_dp="0")
    x = torch.randn(20, 160, generator=torch.Generator().manual_seed(0))
    assert torch.equal(q4(x), exact(x))  # off by default
    assert cpu.set_int8_activations(model, 16) == 1  # the 8-bit layer keeps the exact kernel
    assert q8.layout.i8_min_m == 0 and q4.int8_from == q8.int8_from == 16
    y = q4(x)
    assert not torch.equal(y, exact(x)) and relerr(y, reference(q4, ref, x, 32)) < 1e-6
    assert torch.equal(q4(x[:15]), exact(x[:15]))  # below the rows given: exact
    prepared(q4, use_dp="0")  # a new layout (what a move or reload does) keeps the setting
    assert q4.layout.i8_min_m == 16 and torch.equal(q4(x), y)
    assert cpu.set_int8_activations(model, True) == 1 and q4.layout.i8_min_m == cpu.I8_ROWS
    assert cpu.set_int8_activations(model, False) == 0
    assert torch.equal(q4(x), exact(x))
    for bad in (-1, 2.5, "16"):
        with pytest.raises(ValueError, match="int8 activations"):
            cpu.set_int8_activations(model, bad)


@pytest.mark.parametrize("block", [0, 32])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_largest_sums_stay_exact(block, sign):
    """The kernel adds up to 8 quads of VPMADDUBSW pair sums in int16 before widening: with every
    code 15 and every x̂ ±127 a lane reaches ±16·15·127 = ±30480, just inside int16. Any wrap
    would be off by 65536 products; the result must be the float64 sum."""
    import ctypes
    lib = cpu.get_lib()
    K, N, M, gs = 256, 72, 7, 128  # two 128-row runs (32 quads each), a ragged second block of columns
    G, nblk = K // gs, -(-N // cpu.BLOCK)
    q = torch.full((K, N), 15, dtype=torch.int32)
    s = torch.rand(G, N, generator=torch.Generator().manual_seed(0)) + 0.5
    z = torch.full((G, N), 3.0)

    def blocks(t):
        pad = torch.zeros(G, nblk * cpu.BLOCK)
        pad[:, :N] = t
        return pad.reshape(G, nblk, cpu.BLOCK).permute(1, 0, 2).contiguous()

    w, S, SZ = cpu.repack(q, 4), blocks(s), blocks(s * z)
    seg = torch.tensor([0, gs, K], dtype=torch.int32)
    x = torch.full((M, K), sign * 0.75)
    y = torch.full((M, N), float("nan"))
    p = ctypes.c_void_p
    rc = lib.gk_gemm_i8(p(w.data_ptr()), p(S.data_ptr()), p(SZ.data_ptr()), p(seg.data_ptr()), K, G, nblk,
                        p(x.data_ptr()), M, p(y.data_ptr()), N, block, 1)
    assert rc == 0
    # x̂ = 127·(0.75/127 in fp32) per element: a constant row rounds to ±127 everywhere
    xh = 127 * torch.tensor(0.75 / 127, dtype=torch.float32).double() * sign
    want = (xh * gs * ((15 - z) * s).double().sum(0)).expand(M, N)
    assert torch.allclose(y.double(), want, rtol=1e-6, atol=0)
