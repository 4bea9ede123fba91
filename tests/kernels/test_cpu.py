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


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_torch_backend(make_layer, make_pair, relerr, bits, sym, act_order, fmt, shape):
    K, N, g = shape
    layer, ref = make_pair(make_layer(K, N, bits, g, sym=sym, fmt=fmt, act_order=act_order, bias=True,
                                      seed=bits * 7 + K), "cpu")
    assert layer.backend.name == "cpu"
    assert (layer._cpu_perm is not None) == (act_order and g != -1)  # one group: no permutation needed
    gen = torch.Generator().manual_seed(K + N)
    # fused kernel: 1..8 rows and 40 rows (6-row tiles and every remainder)
    for M in (1, 3, 5, 8, 40):
        x = torch.randn(M, K, generator=gen)
        err = relerr(layer(x), ref(x))
        assert err < TOL[torch.float32], (M, err)
    x = torch.randn(40, K, generator=gen)  # the optional BLAS path (tile dequantize + torch.mm)
    layer.backend.gemm_min_m = 32
    assert relerr(layer(x), ref(x)) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_and_3d(make_layer, make_pair, relerr, dtype):
    layer, ref = make_pair(make_layer(160, 77, 4, 64, sym=False, fmt="gptq_v2", act_order=True), "cpu")
    x = torch.randn(2, 3, 160).to(dtype)
    y = layer(x)
    assert y.shape == (2, 3, 77) and y.dtype == dtype
    assert relerr(y.float(), (x.double() @ ref.weight.double().T).float()) < TOL[dtype]
    assert relerr(ref(x).float(), (x.double() @ ref.weight.double().T).float()) < TOL[dtype]


def test_gemm_threshold_paths_agree(make_layer, make_pair, relerr, monkeypatch):
    layer, ref = make_pair(make_layer(256, 200, 4, 128, sym=True, act_order=True), "cpu")
    x = torch.randn(48, 256)
    monkeypatch.setattr(cpu.CpuBackend, "gemm_min_m", 32)
    y_blas = layer(x)
    monkeypatch.setattr(cpu.CpuBackend, "gemm_min_m", 1 << 30)
    y_gemv = layer(x)
    monkeypatch.setattr(cpu.CpuBackend, "tile_bytes", 1)  # one 64-column block per tile
    monkeypatch.setattr(cpu.CpuBackend, "gemm_min_m", 1)
    y_tiles = layer(x)
    r = ref(x)
    assert relerr(y_blas, r) < 2e-5 and relerr(y_gemv, r) < 2e-5 and relerr(y_tiles, r) < 2e-5


def test_auto_choice_and_errors(make_layer):
    layer = make_layer(96, 40, 4, 32)
    layer.post_init()
    assert layer.backend.name == "cpu"
    three = make_layer(96, 40, 3, 32)
    assert choose_backend(three, torch.device("cpu")).name == "torch"  # no 3-bit CPU kernel
    with pytest.raises(BackendError, match="3-bit"):
        three.post_init("cpu")
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
