"""The CPU kernel as a torch custom op (`torch.ops.gptqkit.cpu_linear`): bit-equal to the ctypes
path it replaces, equal to the torch reference within fp32 rounding (test_cpu.py runs its
correctness tests through the op), usable under torch.compile and inference_mode, and a logged
fallback to ctypes (no op) or to the torch backend (no compiler at all)."""
from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys

import pytest
import torch

from gptqkit.kernels import cpu

pytestmark = [
    pytest.mark.skipif(cpu.get_lib() is None, reason=f"CPU kernel unavailable: {cpu.lib_error()}"),
    pytest.mark.skipif(cpu.get_op() is None, reason=f"CPU custom op unavailable: {cpu.op_error()}"),
]
needs_dp = pytest.mark.skipif(not cpu.dp_available(), reason="no AVX-512 BF16 dot-product kernel on this CPU")


def _prepared(layer, *, use_op: bool, use_dp: str, gemm_min_m: int, tile_bytes: int = 4 << 20):
    saved = (cpu.CpuBackend.use_op, cpu.CpuBackend.use_dp, cpu.CpuBackend.gemm_min_m, cpu.CpuBackend.tile_bytes)
    try:
        cpu.CpuBackend.use_op, cpu.CpuBackend.use_dp = use_op, use_dp
        cpu.CpuBackend.gemm_min_m, cpu.CpuBackend.tile_bytes = gemm_min_m, tile_bytes
        layer.post_init("cpu")
    finally:
        (cpu.CpuBackend.use_op, cpu.CpuBackend.use_dp, cpu.CpuBackend.gemm_min_m,
         cpu.CpuBackend.tile_bytes) = saved
    assert layer.layout.use_op is use_op and (layer.layout.op_args is not None) is use_op
    return layer


@pytest.mark.parametrize("bits,kernel", [(2, "fma"), (3, "fma"), (4, "fma"), (8, "fma"),
                                         pytest.param(4, "dp", marks=needs_dp),
                                         pytest.param(3, "dp", marks=needs_dp)])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("path", ["fused", "blas"])
def test_op_bit_equal_to_ctypes(make_layer, bits, kernel, act_order, path):
    """Same numbers to the last bit as the ctypes path, for every input dtype and shape the
    forward handles: the M = 1 decode fast path, 6-row tiles and remainders, the BLAS tiles
    (including a ragged last tile), 3-D and non-contiguous x, bias, bf16/fp16 outputs."""
    gmin = 1 << 30 if path == "fused" else 2
    base = make_layer(224, 200, bits, 32, sym=False, act_order=act_order, bias=True, seed=bits)
    kw = dict(use_dp="1" if kernel == "dp" else "0", gemm_min_m=gmin, tile_bytes=224 * 64 * 4 * 2)
    via_op = _prepared(copy.deepcopy(base), use_op=True, **kw)
    via_ctypes = _prepared(copy.deepcopy(base), use_op=False, **kw)
    assert via_op.layout.dp == (kernel == "dp")
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(M, 224, generator=gen) for M in (1, 2, 7, 13)]
    xs += [torch.randn(2, 3, 224, generator=gen), torch.randn(1, 1, 224, generator=gen),
           torch.randn(224, 5, generator=gen).T]  # non-contiguous
    for x in xs:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            xd = x.to(dtype)
            a, b = via_op(xd), via_ctypes(xd)
            assert a.dtype == b.dtype == dtype and a.shape == b.shape == (*x.shape[:-1], 200)
            assert torch.equal(a, b), (tuple(x.shape), dtype)


def test_op_under_torch_compile_and_inference_mode(make_layer, make_pair, relerr):
    layer, ref = make_pair(make_layer(256, 96, 4, 64, act_order=True, bias=True), "cpu")
    assert layer.layout.use_op
    model = torch.nn.Sequential(layer, torch.nn.GELU())
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0))
    eager = model(x)
    assert relerr(eager, torch.nn.functional.gelu(ref(x))) < 2e-5
    with torch.inference_mode():
        y = model(x)
        assert y.is_inference() and torch.equal(y, eager)
    torch._dynamo.reset()
    # the op is opaque to the compiler: alone, the compiled layer gives the eager bits; around it,
    # inductor's own GELU may round differently from eager's (fp32 tolerance)
    alone = torch.compile(layer, fullgraph=True, dynamic=False)
    assert torch.equal(alone(x), layer(x))
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        assert torch.equal(alone(x), layer(x))
        torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)
    # the fake implementation gives shapes and dtypes without running the kernel
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(torch.randn(2, 5, 256).bfloat16())
        args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in layer.layout.op_args]
        fy = torch.ops.gptqkit.cpu_linear(fx, *args)
    assert fy.shape == (2, 5, 96) and fy.dtype == torch.bfloat16


def test_op_errors_are_backend_errors(make_layer, make_pair):
    from gptqkit.errors import BackendError
    layer, _ = make_pair(make_layer(128, 70, 4, 32), "cpu")
    with pytest.raises(BackendError, match="x has 96 features, the layer takes 128"):
        layer(torch.randn(2, 96))


def test_op_unavailable_falls_back_to_ctypes(make_layer, make_pair, relerr, monkeypatch, caplog):
    """GPTQKIT_CPU_OP=0 (or an op that does not build) leaves the ctypes path, with the reason logged."""
    monkeypatch.setattr(cpu, "_op", None)
    monkeypatch.setattr(cpu, "_op_error", None)
    monkeypatch.setenv("GPTQKIT_CPU_OP", "0")
    with caplog.at_level(logging.WARNING, logger="gptqkit"):
        layer, ref = make_pair(make_layer(128, 70, 4, 32, bias=True), "cpu")
    assert layer.backend.name == "cpu" and not layer.layout.use_op and layer.layout.op_args is None
    assert "GPTQKIT_CPU_OP=0" in caplog.text and "ctypes" in caplog.text
    x = torch.randn(4, 128)
    assert relerr(layer(x), ref(x)) < 2e-5


def test_no_compiler_falls_back_to_torch_backend(tmp_path):
    """A machine with no C++ compiler (a subprocess with no compiler on PATH and an empty kernel
    cache): neither build runs, layers take the torch backend with the reason logged, and the
    kernel test files skip instead of failing, so CI there stays green."""
    env = {k: v for k, v in os.environ.items() if k != "CXX"}
    env.update(PATH=str(tmp_path / "empty-bin"), GPTQKIT_CACHE_DIR=str(tmp_path / "cache"))
    code = ("import logging, torch; logging.basicConfig(level=logging.DEBUG)\n"
            "import sys; sys.path.insert(0, %r)\n"
            "from conftest import build_layer\n"
            "from gptqkit.kernels import cpu\n"
            "layer = build_layer(96, 40, 4, 32); layer.post_init()\n"
            "assert cpu.get_lib() is None and cpu.get_op() is None\n"
            "assert layer(torch.randn(2, 96)).shape == (2, 40)\n"
            "print(layer.backend.name, '|', cpu.op_error())") % os.path.dirname(__file__)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "torch | no C++ compiler found (set $CXX or install g++)"
    assert "uses the torch backend (cpu: kernel unavailable: no C++ compiler found" in r.stderr
    here = os.path.dirname(__file__)
    t = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        *(os.path.join(here, f) for f in ("test_cpu.py", "test_cpu_op.py", "test_codes_once.py"))],
                       env=env, capture_output=True, text=True, timeout=600)
    assert t.returncode == 0 and " skipped" in t.stdout and " passed" not in t.stdout, t.stdout[-3000:]


def test_op_builds_in_fresh_cache_dir(tmp_path):
    """The op builds from source into an empty cache (a subprocess: one process loads the op
    library once) and is found there by a second process without compiling again."""
    env = dict(os.environ, GPTQKIT_CACHE_DIR=str(tmp_path))
    code = ("import logging; logging.basicConfig(level=logging.INFO)\n"
            "from gptqkit.kernels import cpu; assert cpu.get_op() is not None, cpu.op_error(); print('ok')")
    for attempt in range(2):
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
        assert ("building the gptqkit CPU kernel (op)" in r.stderr) == (attempt == 0)
    assert len(list(tmp_path.glob("kernels/op-*/libgptqkit_op.so"))) == 1
    assert not list(tmp_path.glob("kernels/op-*/tmp*"))
