"""The "cpu" backend (compiled C++ kernel) against the torch reference backend."""
from __future__ import annotations

import logging

import pytest
import torch

from gptqkit.errors import BackendError
from gptqkit.kernels import cpu
from gptqkit.kernels.qlinear import QuantLinear, choose_backend

pytestmark = pytest.mark.skipif(cpu.get_lib() is None, reason=f"CPU kernel unavailable: {cpu.lib_error()}")

# (K, N, group_size): odd N, K a multiple of 32 but not of 128, ragged last group, g = -1
SHAPES = [(96, 77, 64), (160, 33, 128), (224, 130, 32), (256, 64, -1)]
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


# which compiled kernel: "fma" (zero-extend/convert/FMA, every bit width) or "dp" (AVX-512 BF16
# dot products, 4-bit, group runs of whole octets); dp cases run only where the CPU has it
needs_dp = pytest.mark.skipif(not cpu.dp_available(), reason="no AVX-512 BF16 dot-product kernel on this CPU")
KERNELS = ["fma", pytest.param("dp", marks=needs_dp)]


def prepare_with(layer: QuantLinear, **attrs) -> QuantLinear:
    """Prepare `layer` on the cpu backend with some CpuBackend settings changed (they are read at
    prepare time, into the layout)."""
    saved = {k: getattr(cpu.CpuBackend, k) for k in attrs}
    try:
        for k, v in attrs.items():
            setattr(cpu.CpuBackend, k, v)
        layer.post_init("cpu")
    finally:
        for k, v in saved.items():
            setattr(cpu.CpuBackend, k, v)
    return layer


@pytest.fixture
def kernel(request, monkeypatch):
    monkeypatch.setattr(cpu.CpuBackend, "use_dp", "1" if request.param == "dp" else "0")
    return request.param


@pytest.mark.parametrize("bits,kernel", [(2, "fma"), (3, "fma"), (4, "fma"),
                                         pytest.param(3, "dp", marks=needs_dp),
                                         pytest.param(4, "dp", marks=needs_dp), (8, "fma")],
                         indirect=["kernel"])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_torch_backend(make_layer, make_pair, relerr, kernel, bits, sym, act_order, fmt, shape):
    K, N, g = shape
    layer, ref = make_pair(make_layer(K, N, bits, g, sym=sym, fmt=fmt, act_order=act_order, bias=True,
                                      seed=bits * 7 + K), "cpu")
    assert layer.backend.name == "cpu"
    assert (layer.layout.perm is not None) == (act_order and g != -1)  # one group: no permutation needed
    # act-order groups of the test layers are exactly g rows each (after the permutation), so the
    # dot-product kernel takes every 3/4-bit case here
    assert layer.layout.dp == (kernel == "dp")
    gen = torch.Generator().manual_seed(K + N)
    # fused kernel: 1..8 rows and 40 rows (6-row tiles and every remainder)
    prepare_with(layer, gemm_min_m=1 << 62)
    for M in (1, 2, 3, 5, 8, 40):
        x = torch.randn(M, K, generator=gen)
        err = relerr(layer(x), ref(x))
        assert err < TOL[torch.float32], (M, err)
    x = torch.randn(40, K, generator=gen)  # the optional BLAS path (tile dequantize + torch.mm)
    prepare_with(layer, gemm_min_m=32)
    assert relerr(layer(x), ref(x)) < TOL[torch.float32]


@pytest.mark.parametrize("kernel", KERNELS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_and_3d(make_layer, make_pair, relerr, kernel, dtype):
    layer, ref = make_pair(make_layer(160, 77, 4, 64, sym=False, fmt="gptq_v2", act_order=True), "cpu")
    assert layer.layout.dp == (kernel == "dp")
    x = torch.randn(2, 3, 160).to(dtype)
    y = layer(x)
    assert y.shape == (2, 3, 77) and y.dtype == dtype
    assert relerr(y.float(), (x.double() @ ref.weight.double().T).float()) < TOL[dtype]
    assert relerr(ref(x).float(), (x.double() @ ref.weight.double().T).float()) < TOL[dtype]


@pytest.mark.parametrize("kernel", KERNELS, indirect=True)
def test_gemm_threshold_paths_agree(make_layer, make_pair, relerr, monkeypatch, kernel):
    layer, ref = make_pair(make_layer(256, 200, 4, 128, sym=True, act_order=True), "cpu")
    x = torch.randn(48, 256)
    y_blas = prepare_with(layer, gemm_min_m=32)(x)
    y_gemv = prepare_with(layer, gemm_min_m=1 << 30)(x)
    y_tiles = prepare_with(layer, gemm_min_m=1, tile_bytes=1)(x)  # one 64-column block per tile
    r = ref(x)
    assert relerr(y_blas, r) < 2e-5 and relerr(y_gemv, r) < 2e-5 and relerr(y_tiles, r) < 2e-5


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rows_split_across_threads(make_layer, make_pair, relerr, monkeypatch, bits):
    """With more threads than half the 64-column blocks the fused FMA kernel cuts the rows into
    chunks too (work items = block x 12-row chunk): every output element is computed the same
    way, so the result is bit-equal to one thread's, for every tile and remainder (M = 1..13, 50),
    and within fp32 rounding of a float64 product."""
    monkeypatch.setattr(cpu.CpuBackend, "use_dp", "0")
    K, N = 320, 130  # 3 blocks, the last ragged; 2 groups of 128 + a ragged group of 64
    layer, ref = make_pair(make_layer(K, N, bits, 128, sym=False, fmt="gptq_v2", act_order=True, bias=True,
                                      seed=bits), "cpu")
    prepare_with(layer, gemm_min_m=1 << 62)
    assert not layer.layout.dp and layer.layout.perm is not None
    gen = torch.Generator().manual_seed(bits)
    w64 = ref.weight.double().T
    saved = torch.get_num_threads()
    try:
        for M in (*range(1, 14), 50):
            x = torch.randn(M, K, generator=gen)
            torch.set_num_threads(1)
            y1 = layer(x)
            torch.set_num_threads(4)  # (M*K*N) >> 19 caps it: 3 threads from M = 13 on
            y4 = layer(x)
            assert torch.equal(y1, y4), M
            assert relerr(y1, x.double() @ w64 + ref.bias.double()) < 2e-6, M
    finally:
        torch.set_num_threads(saved)


def test_auto_choice_and_errors(make_layer):
    layer = make_layer(96, 40, 4, 32)
    layer.post_init()
    assert layer.backend.name == "cpu"
    three = make_layer(96, 40, 3, 32)
    assert choose_backend(three, torch.device("cpu")).name == "cpu"  # 3-bit runs as 4-bit nibbles
    with pytest.raises(BackendError, match="is not a CPU"):
        choose_backend(three, torch.device("meta"), "cpu")
    with pytest.raises(BackendError, match="unknown backend"):
        layer.post_init("nope")


def test_unavailable_kernel_falls_back_with_reason(make_layer, monkeypatch, caplog):
    monkeypatch.setattr(cpu, "_lib", None)
    monkeypatch.setattr(cpu, "_lib_error", None)
    monkeypatch.setenv("GPTQKIT_DISABLE_CPU_KERNEL", "1")
    layer = make_layer(96, 40, 4, 32)
    with caplog.at_level(logging.DEBUG, logger="gptqkit"):
        layer.post_init()
    assert layer.backend.name == "torch"
    assert "GPTQKIT_DISABLE_CPU_KERNEL" in caplog.text
    with pytest.raises(BackendError, match="kernel unavailable"):
        layer.post_init("cpu")


def test_build_in_fresh_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu, "_lib", None)
    monkeypatch.setattr(cpu, "_lib_error", None)
    monkeypatch.setenv("GPTQKIT_CACHE_DIR", str(tmp_path))
    assert cpu.get_lib() is not None, cpu.lib_error()
    built = list(tmp_path.glob("kernels/cpu-*/libgptqkit_cpu.so"))
    assert len(built) == 1
    assert not list(tmp_path.glob("kernels/cpu-*/*.tmp*"))


def test_repack_layout():
    q = torch.randint(0, 16, (5, 70))
    packed = cpu.repack(q, 4)  # [nblk=2, K=5, 32 bytes]
    assert packed.shape == (2, 5, 32)
    b = packed[1, 3].long()
    # block 1, column 16*(2h+i)+lane at byte 16h+lane, nibble i
    for col in range(70 - 64):
        h, i, lane = col // 32, (col // 16) % 2, col % 16
        assert (int(b[16 * h + lane]) >> (4 * i)) & 15 == int(q[3, 64 + col])


def test_repack_dp_layout():
    K, N = 24, 70
    q = torch.randint(0, 16, (K, N))
    packed = cpu.repack_dp(q)  # [nblk=2, K/8=3, 4 vectors, 64 bytes]
    assert packed.shape == (2, 3, 4, 64) and packed.dtype == torch.uint8
    # nibble j of 16-bit word h of 32-bit lane l = code of row 8r + 2j + h, column 64b + 16v + l
    for b in range(2):
        for r in range(3):
            for v in range(4):
                words = packed[b, r, v].view(torch.int16).long() & 0xFFFF
                for l in range(16):
                    n = 64 * b + 16 * v + l
                    for h in range(2):
                        for j in range(4):
                            got = (int(words[2 * l + h]) >> (4 * j)) & 15
                            assert got == (int(q[8 * r + 2 * j + h, n]) if n < N else 0)


@needs_dp
def test_dp_kernel_choice_and_exactness(make_layer, make_pair, relerr, monkeypatch):
    """auto: bf16/fp16 models get the dot-product kernel, fp32 models the FMA kernel; runs that
    are not whole octets (a ragged act-order split) fall back to the FMA kernel; bf16 x goes in
    as is, fp32 x in 3 exact parts, and long groups (g = -1, K = 1024) stay at rounding level."""
    monkeypatch.setattr(cpu.CpuBackend, "use_dp", "auto")
    for dtype, want in ((torch.bfloat16, True), (torch.float16, True), (torch.float32, False)):
        layer = make_layer(128, 64, 4, 32)
        layer.compute_dtype = dtype
        layer.post_init("cpu")
        assert layer.layout.dp is want, dtype
    monkeypatch.setattr(cpu.CpuBackend, "use_dp", "1")
    ragged = make_layer(128, 64, 4, 32)
    ragged.g_idx.copy_(torch.tensor([0] * 37 + [1] * 27 + [2] * 32 + [3] * 32, dtype=torch.int32))
    ragged.post_init("cpu")
    assert not ragged.layout.dp
    layer, ref = make_pair(make_layer(1024, 96, 4, -1, sym=False, bias=True), "cpu")
    L = layer.layout
    assert L.dp and L.seg.numel() - 1 == 1024 // 128  # long run cut in 8
    gen = torch.Generator().manual_seed(5)
    for M in (1, 2, 7):
        x = torch.randn(M, 1024, generator=gen)
        exact = x.double() @ ref.weight.double().T + ref.bias.double()
        assert relerr(layer(x), exact) < 2e-5
        # bf16 x is used exactly: before its output is rounded to bf16, the kernel's fp32 result
        # is as close to the exact product as with fp32 x
        xb = x.bfloat16()
        y = torch.empty(M, 96)
        rc = cpu.get_lib().gk_gemv_dp(L.w.data_ptr(), L.s.data_ptr(), L.sz.data_ptr(), L.seg.data_ptr(), 1024,
                                      L.seg.numel() - 1, L.nblk, xb.data_ptr(), 1, 1, M, y.data_ptr(), 96, 1)
        assert rc == 0
        assert relerr(y + L.bias, xb.double() @ ref.weight.double().T + ref.bias.double()) < 2e-5
        assert layer(xb).dtype == torch.bfloat16


def test_isa_reported():
    assert cpu.isa() in ("avx512", "avx2", "generic")


@pytest.mark.skipif(cpu.isa() != "avx512", reason="the AVX2 build is checked from an AVX-512 machine")
def test_avx2_build_in_subprocess():
    """The AVX2+FMA build (what a CPU without AVX-512 gets from -march=native), compiled here with
    -march=x86-64-v3 and run through the same correctness tests, both paths (fused and BLAS) and
    the int8-activation GEMM (maddubs code, not VNNI), via the custom op and via ctypes."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, GPTQKIT_CPU_MARCH="x86-64-v3")
    probe = subprocess.run([sys.executable, "-c", "from gptqkit.kernels import cpu; print(cpu.isa())"],
                           env=env, capture_output=True, text=True, timeout=600)
    assert probe.stdout.strip() == "avx2", probe.stderr[-2000:]
    # through the custom op (the default) and its bit-equality with the ctypes path
    op_tests = os.path.join(os.path.dirname(__file__), "test_cpu_op.py")
    i8_tests = os.path.join(os.path.dirname(__file__), "test_cpu_i8.py")  # the int8-activation GEMM
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, op_tests, i8_tests,
                        "-k", "(matches_torch_backend and fma) or threshold_paths or (bit_equal and fma) "
                              "or rows_split or test_cpu_i8"],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout


@pytest.mark.skipif(not cpu.isa().startswith("avx"), reason="the portable build is checked from an x86 machine")
def test_portable_build_in_subprocess():
    """The portable build (-march=x86-64: SSE2 only, the 64-byte GCC vectors lowered to 128-bit
    code, no intrinsics path) reports "generic", runs the same correctness tests, and takes the
    BLAS path at every M by default (its fused kernel is slower than BLAS, M = 1 included)."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, GPTQKIT_CPU_MARCH="x86-64")
    probe = subprocess.run([sys.executable, "-c", "from gptqkit.kernels import cpu; "
                            "print(cpu.isa(), cpu.dp_available(), cpu._default_gemm_min_m())"],
                           env=env, capture_output=True, text=True, timeout=600)
    assert probe.stdout.split() == ["generic", "False", "1"], probe.stderr[-2000:]
    op_tests = os.path.join(os.path.dirname(__file__), "test_cpu_op.py")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, op_tests,
                        "-k", "(matches_torch_backend and fma and not gptq_v2) or threshold_paths "
                              "or (bit_equal and fma) or rows_split"],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout


@pytest.mark.parametrize("bits,kernel", [(3, "fma"), (4, "fma"), pytest.param(4, "dp", marks=needs_dp)],
                         indirect=["kernel"])
def test_repacked_in_column_slices(make_layer, monkeypatch, bits, kernel):
    """prepare() repacks a slice of output columns at a time (bounded load memory): slices of
    two blocks, the last one ragged, give the same layout tensors as one slice."""
    K, N = 128, 5 * cpu.BLOCK + 13
    layer = make_layer(K, N, bits, 32, act_order=True, seed=3)
    whole = prepare_with(layer, use_op=False).layout
    monkeypatch.setattr(cpu, "_SLICE_CODES", K * 2 * cpu.BLOCK)
    layer2 = make_layer(K, N, bits, 32, act_order=True, seed=3)
    sliced = prepare_with(layer2, use_op=False).layout
    assert sliced.dp == whole.dp == (kernel == "dp")
    for name in ("w", "s", "sz", "seg", "gk", "perm"):
        assert torch.equal(getattr(sliced, name), getattr(whole, name)), name
    assert torch.equal(sliced.codes(), whole.codes())


def test_fast_head_gemv_matches_float64():
    """FastHeadLinear's one-token path (the row GEMV) against a float64 product; other calls
    are nn.Linear's own (bit-equal), and autograd still works."""
    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(77, 1001, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(1001, 77, generator=gen))
        lin.bias.copy_(torch.randn(1001, generator=gen))
    plain = torch.nn.Linear(77, 1001)
    plain.load_state_dict(lin.state_dict())
    lin.__class__ = cpu.FastHeadLinear
    x = torch.randn(1, 1, 77, generator=gen)
    with torch.inference_mode():
        y = lin(x)
        ref = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
        assert y.shape == (1, 1, 1001) and y.dtype == torch.float32
        assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
        xs = torch.randn(3, 77, generator=gen)
        assert torch.equal(lin(xs), plain(xs))  # M > 1: nn.Linear
    xg = x.clone().requires_grad_(True)
    lin(xg).sum().backward()
    assert xg.grad is not None and torch.allclose(xg.grad[0, 0], lin.weight.sum(0).detach(), rtol=1e-4, atol=1e-4)


def test_load_gives_fp32_head_the_gemv(tmp_path):
    """gptqkit.load swaps an fp32 CPU lm_head to FastHeadLinear; greedy tokens and the saved
    checkpoint are the same as with the plain head."""
    import gptqkit
    from _arch_helpers import build_tiny, calib_ids, quantize_dir, tiny_llama_config, TINY_VOCAB
    src = build_tiny("llama", tmp_path / "src", **tiny_llama_config())
    quantize_dir(src, tmp_path / "q", calib_ids(TINY_VOCAB), method="rtn")
    m = gptqkit.load(tmp_path / "q")
    head = m.get_output_embeddings()
    assert type(head) is cpu.FastHeadLinear and isinstance(head, torch.nn.Linear)
    prompt = torch.tensor([[5, 6, 7, 8]])
    fast = m.generate(prompt, max_new_tokens=8, do_sample=False)
    head.__class__ = torch.nn.Linear
    assert torch.equal(fast, m.generate(prompt, max_new_tokens=8, do_sample=False))
    assert type(gptqkit.load(tmp_path / "q", backend="torch").get_output_embeddings()) is torch.nn.Linear
