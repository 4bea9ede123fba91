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


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@needs_in_process
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_torch_backend(make_layer, make_pair, relerr, bits, sym, act_order, fmt, shape):
    K, N, g = shape
    layer = make_layer(K, N, bits, g, sym=sym, fmt=fmt, act_order=act_order, bias=True, seed=bits * 5 + K)
    layer, ref = make_pair(layer.to(DEVICE), "triton")
    assert layer.backend.name == "triton"
    gen = torch.Generator().manual_seed(K * N)
    for M in (1, 5, 40):  # GEMV path (split-K), GEMV with several rows, GEMM path (tl.dot)
        x = torch.randn(M, K, generator=gen).to(DEVICE)
        err = relerr(layer(x), ref(x))
        assert err < 2e-5, (M, err)


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
