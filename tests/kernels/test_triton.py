"""The "triton" backend against the torch reference backend.

Without a GPU the kernels run in Triton's interpreter on the CPU (TRITON_INTERPRET=1, set per
test by a fixture: the backend decorates its kernels at first use, so the mode follows the
variable at call time and nothing leaks into other test modules)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and "triton" not in sys.modules:
    # Triton decorates its own helpers (tl.sum, ...) at import time, so the interpreter must be
    # on when triton is first imported; the variable is restored right after so that other test
    # modules do not see it (the fixture below sets it again around each test here).
    _prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    finally:
        if _prev is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = _prev

pytest.importorskip("triton")

from gptqkit.errors import BackendError  # noqa: E402
from gptqkit.kernels import triton as tk  # noqa: E402

# triton was imported earlier in this session without the interpreter: run this file in a fresh
# interpreter instead (test_in_subprocess) and skip the in-process tests.
IN_PROCESS = DEVICE == "cuda" or tk.interpreter_ready()
needs_in_process = pytest.mark.skipif(not IN_PROCESS, reason="triton imported without the interpreter; "
                                      "covered by test_in_subprocess")
SHAPES = [(96, 77, 64), (160, 33, 128), (256, 64, -1)]
EXACT_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _exact(ref, x):
    """x @ W (+ bias) in float64 from the torch reference backend's dequantized weight."""
    y = x.double() @ ref.weight.double().T
    return y + ref.bias.double() if ref.bias is not None else y


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


SLOW = os.environ.get("GPTQKIT_SLOW") == "1"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.mark.slow
@needs_in_process
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize("act_order", [False, True])
def test_every_path_dtype_group(make_layer, make_pair, relerr, bits, group, act_order):
    """bits x group x act-order, each through every path (decode M=1 FMA, decode M=5 dot with
    split-K, tiled gemm, dequantize + torch.matmul) in fp32, fp16 and bf16 (GPTQKIT_SLOW=1).
    Reduced form (default): one dtype per case, rotating so each bit width meets every dtype."""
    K, N = 256, 48
    layer = make_layer(K, N, bits, group, sym=bits != 3, fmt="gptq" if bits != 2 else "gptq_v2",
                       act_order=act_order, bias=True, seed=bits * 7 + K + group)
    layer, ref = make_pair(layer.to(DEVICE), "triton")
    lay = layer.layout
    assert isinstance(lay, tk.TritonLayout)
    # act-order -> rows sorted once (a permutation), never a g_idx read in the kernel; one group needs no sort
    assert (lay.perm is not None) == (act_order and group != -1) and lay.g_idx is None
    gen = torch.Generator().manual_seed(K * N + bits)
    rot = (bits + [32, 64, 128, -1].index(group) + act_order) % 3
    for dtype in DTYPES if SLOW else DTYPES[rot:rot + 1]:
        for path, M in (("decode", 1), ("decode", 5), ("gemm", 20), ("dequant", 3)):
            x = torch.randn(M, K, generator=gen).to(DEVICE, dtype)
            y = tk.matmul(lay, x, path=path)
            assert y.dtype == dtype and y.shape == (M, N)
            err = relerr(y, _exact(ref, x))
            assert err < EXACT_TOL[dtype], (dtype, path, M, err)


@needs_in_process
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_torch_backend(make_layer, make_pair, relerr, bits, sym, act_order, fmt, shape):
    """Odd N, ragged last groups, v1/v2 zero points, asymmetric: automatic path choice vs the
    torch backend."""
    K, N, g = shape
    layer = make_layer(K, N, bits, g, sym=sym, fmt=fmt, act_order=act_order, bias=True, seed=bits * 5 + K)
    layer, ref = make_pair(layer.to(DEVICE), "triton")
    assert layer.backend.name == "triton"
    gen = torch.Generator().manual_seed(K * N)
    for M in (1, 5, 40):  # decode FMA, decode dot + split-K, gemm (tl.dot)
        x = torch.randn(M, K, generator=gen).to(DEVICE)
        err = relerr(layer(x), ref(x))
        assert err < 2e-5, (M, err)


@needs_in_process
@pytest.mark.parametrize("group", [24, 40])
def test_group_not_a_tile_multiple(make_layer, make_pair, relerr, group):
    """Group sizes no power-of-two tile divides: per-row group index (GMODE 1)."""
    layer, ref = make_pair(make_layer(160, 40, 4, group, sym=False, fmt="gptq_v2", act_order=True).to(DEVICE),
                           "triton")
    assert tk._block_k(64, layer.layout)[1] == 1
    for path, M in (("decode", 1), ("decode", 3), ("gemm", 18), ("dequant", 2)):
        x = torch.randn(M, 160).to(DEVICE)
        assert relerr(tk.matmul(layer.layout, x, path=path), _exact(ref, x)) < 2e-5, (path, M)


@needs_in_process
def test_irregular_g_idx_reads_g_idx(make_layer, make_pair, relerr):
    """A g_idx whose groups are not group_size consecutive rows (after sorting) is still right: the
    layout keeps g_idx and the kernel reads it (GMODE 2)."""
    layer = make_layer(128, 40, 4, 32, sym=False, fmt="gptq_v2", act_order=False)
    g = torch.tensor([0] * 20 + [1] * 44 + [2] * 32 + [3] * 32, dtype=torch.int32)
    layer.g_idx.copy_(g[torch.randperm(128, generator=torch.Generator().manual_seed(1))])
    layer, ref = make_pair(layer.to(DEVICE), "triton")
    assert layer.layout.g_idx is not None and tk._block_k(64, layer.layout)[1] == 2
    for path, M in (("decode", 1), ("decode", 4), ("gemm", 17), ("dequant", 2)):
        x = torch.randn(M, 128).to(DEVICE)
        assert relerr(tk.matmul(layer.layout, x, path=path), _exact(ref, x)) < 2e-5, (path, M)


def test_choose_path_thresholds(monkeypatch):
    monkeypatch.setattr(tk, "DECODE_MAX_M", 16)
    monkeypatch.setattr(tk, "DEQUANT_MIN_M", 256)
    assert [tk.choose_path(m, 4096, 4096) for m in (1, 16, 17, 255, 256, 4096)] == \
        ["decode", "decode", "gemm", "gemm", "dequant", "dequant"]
    monkeypatch.setattr(tk, "DEQUANT_MIN_M", 64)
    assert tk.choose_path(64, 4096, 4096) == "dequant"


def test_thresholds_from_environment():
    code = "from gptqkit.kernels import triton as t; print(t.DECODE_MAX_M, t.DEQUANT_MIN_M)"
    env = dict(os.environ, GPTQKIT_TRITON_DECODE_MAX_M="8", GPTQKIT_TRITON_DEQUANT_MIN_M="1024")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["8", "1024"], r.stderr[-2000:]


@needs_in_process
def test_layout_shares_checkpoint_qweight(make_layer):
    """2/4/8-bit without act-order: the kernel reads the checkpoint's qweight itself (no copy);
    act-order and 3-bit are repacked once at prepare."""
    layer = make_layer(128, 40, 4, 32).to(DEVICE)
    layer.post_init("triton")
    assert not layer.layout.repacked and layer.layout.qweight.data_ptr() == layer.qweight.data_ptr()
    for bits, act in ((4, True), (3, False)):
        layer = make_layer(128, 40, bits, 32, act_order=act).to(DEVICE)
        layer.post_init("triton")
        assert layer.layout.repacked


@needs_in_process
def test_empty_input(make_layer):
    layer = make_layer(64, 40, 4, 32).to(DEVICE)
    layer.post_init("triton")
    assert layer(torch.randn(0, 64).to(DEVICE)).shape == (0, 40)


@needs_in_process
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [2, 33])
def test_half_inputs(make_layer, make_pair, relerr, dtype, M):
    layer, ref = make_pair(make_layer(160, 77, 4, 64, sym=False, fmt="gptq_v2", act_order=True).to(DEVICE),
                           "triton")
    x = torch.randn(M, 160).to(DEVICE, dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (M, 77)
    exact = (x.double() @ ref.weight.double().T)
    assert relerr(y, exact) < (2e-3 if dtype == torch.float16 else 1.6e-2)


def test_pack_k_is_checkpoint_layout_for_4_bits():
    from gptqkit.formats.packing import pack_qweight
    q = torch.randint(0, 16, (64, 9))
    assert torch.equal(tk.pack_k(q, 4), pack_qweight(q, 4))


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU-only check")
def test_needs_cuda_or_interpreter(make_layer, monkeypatch):
    layer = make_layer(96, 40, 4, 32)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    why = tk.TritonBackend().supports(layer, torch.device("cpu"))
    assert why and "not CUDA" in why
    with pytest.raises(BackendError, match="not CUDA"):
        layer.post_init("triton")
    layer.post_init()
    assert layer.backend.name != "triton"


@pytest.mark.skipif(IN_PROCESS, reason="the tests ran in this process")
def test_in_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


@needs_in_process
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group,act_order", [(32, True), (128, False), (-1, False)])
def test_wide_unpack(make_layer, make_pair, relerr, monkeypatch, bits, group, act_order):
    """The word-at-a-time unpacking (off by default until timed on a GPU) gives the same products."""
    monkeypatch.setattr(tk, "WIDE_UNPACK", True)
    K, N = 256, 40
    layer, ref = make_pair(make_layer(K, N, bits, group, sym=False, fmt="gptq_v2", act_order=act_order,
                                      bias=True).to(DEVICE), "triton")
    for path, M in (("decode", 1), ("decode", 5), ("gemm", 20)):
        x = torch.randn(M, K).to(DEVICE)
        assert relerr(tk.matmul(layer.layout, x, path=path), _exact(ref, x)) < 2e-5, (path, M)
