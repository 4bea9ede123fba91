"""The "cpu" backend: fused dequantize-GEMV in C++ (AVX2/AVX-512 via -march=native, OpenMP).

* Decode (M = 1): one pass over a repacked copy of the 2/3/4/8-bit
  codes; codes are zero-extended and converted in registers and accumulated in fp32, with
  scale and scale·zero applied once per group (w = s·q − s·z). Memory-bound at M = 1.
* Any batch: the same kernel takes 6 rows of x per pass over a weight block held in L2 (AVX2:
  6 rows x 16 columns), so at M ≥ 64 it runs at the FMA limit, like a BLAS fp32 matmul but
  reading 8x fewer weight bytes; with more threads than blocks the rows are split too. An
  optional BLAS path (GPTQKIT_CPU_GEMM_MIN_M=<rows>; the default only for portable builds)
  dequantizes tiles of output columns to fp32 (a few MiB at a time, never the whole matrix) and
  calls torch.mm.
* Builds: AVX-512 (the 64-byte vector code), AVX2+FMA without AVX-512 (its own intrinsics loop on
  8-column vectors, same layout and arithmetic), anything else (portable vector code).
* Act-order: rows of the weights are permuted once at prepare time so that every group is a
  contiguous run; each call permutes x's columns with one index_select.
* bf16/fp16 models, 4-bit (and 3-bit, held as 4-bit nibbles): an AVX-512 BF16 dot-product
  kernel (`repack_dp` layout) that reads bf16 activations as they are; fp32 models keep the
  FMA kernel above (see `CpuBackend.use_dp`).

Two builds of one C++ source, both compiled at first use with the system C++ compiler (`$CXX`
or g++/c++, no ninja) and cached per user under `$GPTQKIT_CACHE_DIR` (default
`$XDG_CACHE_HOME/gptqkit` or `~/.cache/gptqkit`), keyed by the hash of the sources, flags,
compiler, CPU flags (and torch version for the op):
* the torch custom op `torch.ops.gptqkit.cpu_linear` (csrc/cpu_op.cpp, built against torch's
  headers): the whole layer forward in one dispatcher call, used by default. It has a fake
  implementation, so models with these layers run under torch.compile.
* the plain kernel library (csrc/cpu_kernels.cpp, no torch headers) called through ctypes: the
  fallback when the op cannot be built (logged once, with the reason), or GPTQKIT_CPU_OP=0.
If the library cannot be built either, `supports` returns the reason and QuantLinear falls back
to the torch backend (logged).

The library also holds the clip search of quantization (`clip_search`, called by
quant/grid.py::find_params for fp32 CPU groups): the torch loop's arithmetic, candidate by
candidate, in one call per group.

Prepared state is a `CpuLayout`; with it the layer drops its checkpoint `qweight` (the layout's
`codes()` rebuilds it exactly for saving), so the codes are held once.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch

from ..errors import BackendError, ConfigError
from ..formats.packing import unpack_qweight, unpack_qzeros
from .qlinear import QuantLinear, epilogue, group_order, prologue, register_backend, unsort_rows

log = logging.getLogger(__name__)

_SRC = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"
_OP_SRC = Path(__file__).with_name("csrc") / "cpu_op.cpp"
# GPTQKIT_CPU_MARCH builds for another target than this CPU (e.g. x86-64-v3 = AVX2+FMA, to test
# and benchmark the AVX2 build on an AVX-512 machine)
_MARCH = os.environ.get("GPTQKIT_CPU_MARCH", "native")
_FLAG_SETS = (["-O3", f"-march={_MARCH}", "-fopenmp", "-std=c++17"],
              ["-O3", "-fopenmp", "-std=c++17"],
              ["-O3", "-std=c++17"])
_lib = None
_lib_error: str | None = None
_op: Callable | None = None
_op_error: str | None = None
_lock = threading.Lock()

BLOCK = 64  # output columns per repacked block (must match the C++ source)


def cache_dir() -> Path:
    base = os.environ.get("GPTQKIT_CACHE_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "gptqkit"


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    for c in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if c and shutil.which(c):
            return c
    return None


def _compile(src: Path, flag_sets, extra: list[str], name: str, key_extra: bytes = b"") -> Path:
    """Compile `src` into the cache (or reuse the cached build) with the first flag set that
    works; the path of the shared library, or RuntimeError with every attempt's reason."""
    if os.environ.get("GPTQKIT_DISABLE_CPU_KERNEL"):
        raise RuntimeError("disabled by GPTQKIT_DISABLE_CPU_KERNEL")
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set $CXX or install g++)")
    # every source file the build reads is in the key, so a changed kernel never reuses an old build
    srcs = b"\0".join(p.read_bytes() for p in sorted(src.parent.glob("*.cpp")))
    try:
        cxx_version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"cannot run {cxx}: {e}") from e
    errors = []
    for flags in flag_sets:
        key = hashlib.sha256(b"\0".join([srcs, " ".join(flags + extra).encode(), cxx_version.encode(),
                                         _cpu_signature().encode(), platform.machine().encode(),
                                         key_extra])).hexdigest()[:20]
        out = cache_dir() / "kernels" / f"{name}-{key}" / f"libgptqkit_{name}.so"
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
            os.close(fd)
            cmd = [cxx, *flags, "-shared", "-fPIC", "-o", tmp, str(src), *extra]
            log.info("building the gptqkit CPU kernel (%s): %s", name, " ".join(cmd))
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                os.unlink(tmp)
                errors.append(f"{' '.join(flags)}: {r.stderr.strip()[-500:]}")
                continue
            os.replace(tmp, out)  # atomic: concurrent builders never see a partial file
        return out
    raise RuntimeError(f"could not build the CPU kernel ({name}): " + " | ".join(errors))


def _build() -> ctypes.CDLL:
    """Compile (or reuse the cached build of) the ctypes kernel library; RuntimeError with the reason."""
    out = _compile(_SRC, _FLAG_SETS, [], "cpu")
    try:
        lib = ctypes.CDLL(str(out))
    except OSError as e:
        raise RuntimeError(f"cannot load {out}: {e}") from e
    if lib.gk_abi_version() != 9:
        raise RuntimeError(f"{out}: ABI version mismatch")
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.gk_gemv.argtypes = [p, p, p, p, i, i, i, i, p, i, p, i, i]
    lib.gk_gemv.restype = i
    lib.gk_dequant.argtypes = [p, p, p, p, i, i, i, i, i, p, i]
    lib.gk_dequant.restype = i
    # decode fast path: (struct gk_layer*, X, M, Y, nthreads)
    lib.gk_gemv_layer.argtypes = [p, p, i, p, i]
    lib.gk_gemv_layer.restype = i
    lib.gk_has_dp.restype = i
    lib.gk_has_i8.restype = i
    lib.gk_gemm_i8.argtypes = [p, p, p, p, i, i, i, p, i, p, i, i, i]
    lib.gk_gemm_i8.restype = i
    lib.gk_isa.restype = i
    lib.gk_gemv_dp.argtypes = [p, p, p, p, i, i, i, p, i, i, i, p, i, i]
    lib.gk_gemv_dp.restype = i
    lib.gk_gemv_dp_layer.argtypes = [p, p, i, i, i, p, i]
    lib.gk_gemv_dp_layer.restype = i
    lib.gk_dequant_dp.argtypes = [p, p, p, p, i, i, i, i, p, i]
    lib.gk_dequant_dp.restype = i
    # the clip search of quant/grid.py::find_params (see `clip_search`)
    lib.gk_clip_search.argtypes = [p, i, i, ctypes.c_long, p, i, i, i, ctypes.c_float, p, i, p, p, p, i]
    lib.gk_clip_search.restype = i
    lib.gk_sgemv_rows.argtypes = [p, p, p, i, i, ctypes.c_long, i]
    lib.gk_sgemv_rows.restype = i
    lib.gk_q8_gemv_rows.argtypes = [p, p, p, p, i, i, i]
    lib.gk_q8_gemv_rows.restype = i
    lib.gk_bf16_gemv_rows.argtypes = [p, p, p, i, i, i]
    lib.gk_bf16_gemv_rows.restype = i
    L = ctypes.c_long
    # GPTQ's column loop, one block of columns (see `gptq_columns`)
    lib.gk_gptq_columns.argtypes = [p, L, i, i, i, i, p, L, p, p, L, p, ctypes.c_float, p, L, p, L, p, L, p, L,
                                    i, i, i]
    lib.gk_gptq_columns.restype = i
    log.debug("gptqkit CPU kernel loaded from %s", out)
    return lib


def _build_op() -> Callable:
    """Compile (or reuse) the torch custom op and load it; RuntimeError with the reason."""
    if os.environ.get("GPTQKIT_CPU_OP", "1") == "0":
        raise RuntimeError("disabled by GPTQKIT_CPU_OP=0")
    if not hasattr(torch.ops.gptqkit, "cpu_linear"):  # a second build in one process cannot load
        from torch.utils import cpp_extension
        inc = [f"-I{d}" for d in cpp_extension.include_paths()]
        libdirs = cpp_extension.library_paths()
        extra = [*inc, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
                 *[f"-L{d}" for d in libdirs], *[f"-Wl,-rpath,{d}" for d in libdirs], "-lc10", "-ltorch_cpu"]
        # C++20 as torch's own extension builder uses; hidden symbols so the kernel functions bind
        # inside this library, never to the ctypes library's copies
        flag_sets = [[*f[:-1], "-std=c++20", "-fvisibility=hidden", "-w"] for f in _FLAG_SETS]
        out = _compile(_OP_SRC, flag_sets, extra, "op", key_extra=torch.__version__.encode())
        torch.ops.load_library(str(out))
        log.debug("gptqkit CPU op loaded from %s", out)
    _register_fake()
    return torch.ops.gptqkit.cpu_linear.default


_fake_registered = False


def _register_fake() -> None:
    """The op's shape/dtype rule, which torch.compile (FakeTensor tracing) needs."""
    global _fake_registered
    if _fake_registered:
        return

    @torch.library.register_fake("gptqkit::cpu_linear")
    def _(x, w, s, sz, seg, gk, perm, bias, N, bits, dp, gemm_min_m, tile_bytes, i8_min_m, i8_block):
        dtype = x.dtype if x.dtype.is_floating_point else torch.float32
        return x.new_empty((*x.shape[:-1], N), dtype=dtype)

    _fake_registered = True


def get_lib() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (reason in `lib_error()`)."""
    global _lib, _lib_error
    with _lock:
        if _lib is None and _lib_error is None:
            try:
                _lib = _build()
            except Exception as e:  # noqa: BLE001  any failure means "fall back", with the reason
                _lib_error = str(e)
                log.warning("gptqkit CPU kernel unavailable, using torch code instead (the torch "
                            "inference backend, find_params' torch clip search): %s", e)
        return _lib


def lib_error() -> str | None:
    get_lib()
    return _lib_error


def get_op() -> Callable | None:
    """`torch.ops.gptqkit.cpu_linear.default`, or None (reason in `op_error()`; the backend then
    calls the kernel library through ctypes)."""
    global _op, _op_error
    with _lock:
        if _op is None and _op_error is None:
            try:
                _op = _build_op()
            except Exception as e:  # noqa: BLE001  any failure means "fall back", with the reason
                _op_error = str(e)
                log.warning("gptqkit CPU custom op unavailable, calling the kernel through ctypes "
                            "(slower per call): %s", e)
        return _op


def op_error() -> str | None:
    get_op()
    return _op_error


def repack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q [K, N] codes (any int dtype) -> uint8 [nblk, K, 8·bits] in the kernel's block layout."""
    K, N = q.shape
    nblk = -(-N // BLOCK)
    # in uint8 throughout (codes < 2^bits <= 256; shifted codes stay inside their byte): a quarter
    # of the memory traffic of int32, which dominated load time (BENCHMARKS.md, "after" pass)
    if N == nblk * BLOCK:
        qp = q.to(torch.uint8)
    else:
        qp = torch.zeros(K, nblk * BLOCK, dtype=torch.uint8)
        qp[:, :N] = q
    per = 8 // bits
    qp = qp.reshape(K, nblk, 4 // per, per, 16)        # column 16·(per·h + i) + lane
    byte = qp[:, :, :, 0, :].clone()                    # a new tensor, never q's memory
    for i in range(1, per):
        byte |= qp[:, :, :, i, :] << (bits * i)
    return byte.reshape(K, nblk, 8 * bits).permute(1, 0, 2).contiguous()


def repack_dp(q: torch.Tensor) -> torch.Tensor:
    """q [K, N] 4-bit codes, K % 8 == 0 -> uint8 [nblk, K/8, 4, 64], the dot-product layout.

    Byte 4·l + 2·h + jb of vector v in octet r holds, in nibble jn, the code of row
    8·r + 2·(2·jb + jn) + h and column 64·blk + 16·v + l (csrc/cpu_kernels.cpp explains why)."""
    K, N = q.shape
    nblk = -(-N // BLOCK)
    qp = torch.zeros(K, nblk * BLOCK, dtype=torch.uint8)
    qp[:, :N] = q.to(torch.uint8)
    t = qp.reshape(K // 8, 2, 2, 2, nblk, 4, 16)            # (r, jb, jn, h, blk, v, l)
    byte = t[:, :, 0] | (t[:, :, 1] << 4)                   # (r, jb, h, blk, v, l)
    return byte.permute(3, 0, 4, 5, 2, 1).reshape(nblk, K // 8, 4, 64).contiguous()


def unrepack(w: torch.Tensor, bits: int, K: int, N: int) -> torch.Tensor:
    """Inverse of `repack`: uint8 [nblk, K, 8·bits] -> int32 codes [K, N]."""
    nblk = w.shape[0]
    per = 8 // bits
    byte = w.permute(1, 0, 2).to(torch.int32).reshape(K, nblk, 4 // per, 1, 16)
    shifts = (torch.arange(per, dtype=torch.int32) * bits).reshape(1, 1, 1, per, 1)
    q = (byte >> shifts) & ((1 << bits) - 1)                # (K, blk, h, i, lane)
    return q.reshape(K, nblk * BLOCK)[:, :N].contiguous()


def unrepack_dp(w: torch.Tensor, K: int, N: int) -> torch.Tensor:
    """Inverse of `repack_dp`: uint8 [nblk, K/8, 4, 64] -> int32 codes [K, N]."""
    nblk = w.shape[0]
    byte = w.reshape(nblk, K // 8, 4, 16, 2, 2).to(torch.int32)   # (blk, r, v, l, h, jb)
    t = torch.stack([byte & 15, byte >> 4], dim=-1)               # (blk, r, v, l, h, jb, jn)
    q = t.permute(1, 5, 6, 4, 0, 2, 3)                            # (r, jb, jn, h, blk, v, l)
    return q.reshape(K, nblk * BLOCK)[:, :N].contiguous()


def isa() -> str:
    """The instruction set the loaded kernel was built for: "avx512", "avx2" or "generic"."""
    lib = get_lib()
    return {512: "avx512", 256: "avx2"}.get(lib.gk_isa(), "generic") if lib is not None else "none"


def i8_available() -> bool:
    """Whether the compiled kernel has the int8-activation GEMM (AVX2 and AVX-512 builds)."""
    lib = get_lib()
    return lib is not None and bool(lib.gk_has_i8())


def dp_available() -> bool:
    """Whether the compiled kernel has the AVX-512 BF16 dot-product path."""
    lib = get_lib()
    return lib is not None and bool(lib.gk_has_dp())


_clip_logged: set[str] = set()


def _clip_fallback(reason: str, level: int = logging.DEBUG) -> None:
    if reason not in _clip_logged:  # once per reason: find_params runs once per group
        _clip_logged.add(reason)
        log.log(level, "clip search: the torch loop runs (%s)", reason)


@functools.lru_cache(maxsize=None)
def _shrink_factors(grid: float, maxshrink: float) -> torch.Tensor:
    # exactly find_params' p = 1 - i/grid, rounded to fp32 as torch does for `p * tensor`
    return torch.tensor([1 - i / grid for i in range(int(maxshrink * grid))], dtype=torch.float32)


def clip_search(w: torch.Tensor, bits: int, sym: bool, zero_min: int, norm: float, grid: float,
                maxshrink: float, weight: torch.Tensor | None, errors: bool = False) -> tuple | None:
    """quant/grid.py::find_params' clip search (mse=True) in C++ (csrc/cpu_kernels.cpp,
    gk_clip_search): (scale, zero) [rows] fp32, or None where it does not apply (not fp32, not
    on the CPU, library unavailable, non-finite values); the caller then runs its torch loop.
    errors=True (tests) adds every candidate's error, [rows, candidates].

    Each candidate's grid and per-element errors are torch's fp32 arithmetic exactly (|e|^norm
    for norm != 2: to ~1e-13, where torch's is within 1 ulp); the row sums are accumulated in
    double and rounded to fp32 (torch: in fp32), so on near-ties another candidate may win."""
    if w.device.type != "cpu" or w.dtype is not torch.float32 or w.dim() != 2 or w.numel() == 0:
        _clip_fallback(f"{w.dtype} on {w.device.type}, shape {tuple(w.shape)}: the kernel takes "
                       "non-empty 2-D float32 CPU groups")
        return None
    rows, cols = w.shape
    if weight is not None and (weight.device.type != "cpu" or weight.dtype is not torch.float32
                               or weight.shape != (cols,)):
        _clip_fallback(f"weight {weight.dtype} {tuple(weight.shape)} on {weight.device.type}")
        return None
    if not 1 <= bits <= 8 or (weight is None and not norm > 0):
        _clip_fallback(f"bits {bits}, norm {norm}: the kernel takes 1-8 bits and norm > 0")
        return None
    lib = get_lib()
    if lib is None:
        _clip_fallback(f"CPU kernel unavailable: {_lib_error}", logging.INFO)
        return None
    if w.stride(1) != 1 or (rows > 1 and w.stride(0) < cols):
        w = w.contiguous()
    ldw = w.stride(0) if rows > 1 else cols
    wt = weight.contiguous() if weight is not None else None
    ps = _shrink_factors(grid, maxshrink)
    scale = torch.empty(rows, dtype=torch.float32)
    zero = torch.empty(rows, dtype=torch.float32)
    err = torch.empty(rows, ps.numel(), dtype=torch.float32) if errors else None
    # threads: torch's count, at most one per 16 rows (the kernel's task) and per ~256 K
    # element-candidates
    nt = max(1, min(torch.get_num_threads(), -(-rows // 16), (rows * cols * ps.numel()) >> 18))
    rc = lib.gk_clip_search(w.data_ptr(), rows, cols, ldw, None if wt is None else wt.data_ptr(), bits,
                            int(sym), zero_min, norm, ps.data_ptr(), ps.numel(), scale.data_ptr(),
                            zero.data_ptr(), None if err is None else err.data_ptr(), nt)
    if rc != 0:
        _clip_fallback("non-finite values" if rc == 1 else f"kernel error {rc}",
                       logging.DEBUG if rc == 1 else logging.WARNING)
        return None
    return (scale, zero, err) if errors else (scale, zero)


@functools.lru_cache(maxsize=None)
def addr_fused_width(contiguous: bool = True) -> int | None:
    """How many leading elements of a row torch's addr_ (w + α·a·b) computes with one fused
    multiply-add, rounding twice in the rest: ATen's vectorized loop fuses whole vector chunks
    and rounds twice in its scalar tail (16 on this project's AVX-512 and AVX2 builds of torch
    2.13, 0 on its DEFAULT build and wherever b is read strided). Measured once per process on
    torch's own addr_ (an fp64 product is exact, so fp64 then fp32 gives the fused value); None,
    with a log line, if no width explains it (the C++ column loop then runs unfused, within fp32
    rounding of the torch loop, not bit-equal)."""
    g = torch.Generator().manual_seed(0)
    rows, explained = 256, []
    for L in (5, 11, 19, 29, 45, 70, 97):  # lengths at which every candidate width splits differently
        W = torch.randn(rows, L + 8, generator=g)[:, 3:3 + L]   # a row slice of a wider block, as in the solver
        e = torch.randn(rows, generator=g)
        hs = torch.randn(L * 3, generator=g)
        h = hs[:L] if contiguous else hs[::3]                  # strided: a column-major factor's row
        got = W.clone().addr_(e, h, alpha=-1)
        unfused = W - e[:, None] * h[None]
        fused = (W.double() - e.double()[:, None] * h.double()[None]).float()
        is_fused = (got == fused).all(0) & (got != unfused).any(0)
        is_unfused = (got == unfused).all(0)
        explained.append({w for w in (0, 2, 4, 8, 16, 32, 64)
                          if bool(is_fused[:L // w * w if w else 0].all())
                          and bool(is_unfused[L // w * w if w else 0:].all())})
    widths = set.intersection(*explained)
    if len(widths) == 1:
        return widths.pop()
    log.info("torch's addr_ fuses no fixed prefix of a row here (contiguous=%s): the C++ GPTQ column loop "
             "runs unfused, within fp32 rounding of the torch loop", contiguous)
    return None


def gptq_columns(W1: torch.Tensor, i0: int, i1: int, Hinv1: torch.Tensor, S: torch.Tensor, Z: torch.Tensor,
                 gcol: torch.Tensor, maxq: int, Q: torch.Tensor, E: torch.Tensor,
                 P1: torch.Tensor | None = None, Wpre: torch.Tensor | None = None) -> bool:
    """Columns i0..i1-1 of one block of GPTQ's column loop (quant/gptq.py::gptq_solve) in C++
    (csrc/cpu_kernels.cpp, gk_gptq_columns), rows in parallel: W1 [N, B] is updated in place,
    Q and E [N, B] (views of the block's columns; row stride any) receive the codes and the scaled
    errors, column i quantizes on the grid S[gcol[i - i0]], Z[...] (S, Z [groups, N]). [GPTAQ]
    P1 [B, B] and Wpre [N, B] as in the solver. Same bits as the torch loop on this machine's torch
    build (see addr_fused_width) for the same tensor layouts. False where it does not apply (not fp32 on the CPU, no library):
    the caller runs its torch loop."""
    ts = [W1, Hinv1, S, Z, Q, E] + ([P1, Wpre] if P1 is not None else [])
    if any(t.device.type != "cpu" or t.dtype is not torch.float32 for t in ts):
        return False
    if any(t.stride(-1) != 1 for t in (W1, Q, E, Wpre) if t is not None):
        return False
    # torch's addr_ fuses only where it reads the rows of the matrix contiguously (the Cholesky
    # factor comes column-major); the kernel reads rows of the block (64 KiB) contiguous
    fwh = addr_fused_width(Hinv1.stride(-1) == 1) or 0
    fwp = 0 if P1 is None else addr_fused_width(P1.stride(-1) == 1) or 0
    Hinv1 = Hinv1 if Hinv1.stride(-1) == 1 else Hinv1.contiguous()
    P1 = P1 if P1 is None or P1.stride(-1) == 1 else P1.contiguous()
    lib = get_lib()
    if lib is None:
        return False
    N, B = W1.shape
    S, Z, gcol = S.contiguous(), Z.contiguous(), gcol.to(torch.int32).contiguous()
    nt = max(1, min(torch.get_num_threads(), N // 64))
    rc = lib.gk_gptq_columns(W1.data_ptr(), W1.stride(0), N, B, i0, i1, Hinv1.data_ptr(), Hinv1.stride(0),
                             S.data_ptr(), Z.data_ptr(), S.stride(0), gcol.data_ptr(), float(maxq),
                             Q.data_ptr(), Q.stride(0), E.data_ptr(), E.stride(0),
                             None if P1 is None else P1.data_ptr(), 0 if P1 is None else P1.stride(0),
                             None if Wpre is None else Wpre.data_ptr(), 0 if Wpre is None else Wpre.stride(0),
                             fwh, fwp, nt)
    if rc != 0:
        raise RuntimeError(f"gk_gptq_columns failed ({rc}) on W1 {tuple(W1.shape)}, columns {i0}..{i1}")
    return True


class FastHeadLinear(torch.nn.Linear):
    """An fp32 nn.Linear (a quantized model's full-precision lm_head) whose one-token forward runs
    the library's row GEMV (gk_sgemv_rows): torch's BLAS reads SmolLM2's 49152 x 576 head at
    ~15 GB/s with one or two threads, a third of the memory's rate, and that head is a third of
    the 4-bit model's decode step. Same weights, fp32 accumulation in another order (~1e-6
    relative); every other call (prompts, autograd, torch.compile, other dtypes) is nn.Linear's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (x.numel() == self.in_features and x.dtype is torch.float32 and x.device.type == "cpu"
                and w.dtype is torch.float32 and w.stride(1) == 1 and not torch.compiler.is_compiling()
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
            lib = get_lib()
            if lib is not None:
                xc = x.reshape(-1).contiguous()
                y = torch.empty(self.out_features, dtype=torch.float32)
                N, K = self.out_features, self.in_features
                nt = max(1, min(torch.get_num_threads(), (N * K) >> 18))
                if lib.gk_sgemv_rows(w.data_ptr(), xc.data_ptr(), y.data_ptr(), N, K, w.stride(0), nt) == 0:
                    if self.bias is not None:
                        y += self.bias
                    return y.reshape(*x.shape[:-1], N)
        return super().forward(x)


def use_fast_head(model: torch.nn.Module) -> bool:
    """Give `model`'s fp32 CPU output head (a plain nn.Linear) FastHeadLinear's decode path
    (instance-level class swap: state dict, saving and isinstance checks are unchanged).
    True if it did."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if (type(head) is not torch.nn.Linear or head.weight.dtype is not torch.float32
            or head.weight.device.type != "cpu" or get_lib() is None):
        return False
    head.__class__ = FastHeadLinear
    return True


class _LayerArgs(ctypes.Structure):
    """The constant arguments of gk_gemv for one layer (C struct gk_layer)."""
    _fields_ = [("W", ctypes.c_void_p), ("S", ctypes.c_void_p), ("SZ", ctypes.c_void_p),
                ("seg", ctypes.c_void_p), ("bits", ctypes.c_int32), ("K", ctypes.c_int32),
                ("G", ctypes.c_int32), ("nblk", ctypes.c_int32), ("N", ctypes.c_int32)]


def _block_params(t: torch.Tensor, nblk: int) -> torch.Tensor:
    """[G, N] -> float32 [nblk, G, 64] (zero-padded columns)."""
    G, N = t.shape
    out = torch.zeros(G, nblk * BLOCK, dtype=torch.float32)
    out[:, :N] = t
    return out.reshape(G, nblk, BLOCK).permute(1, 0, 2).contiguous()


def _check(rc: int) -> None:
    if rc != 0:
        raise BackendError(f"the gptqkit CPU kernel returned error code {rc}; "
                           "load with backend='torch' to use the reference kernel")


@functools.lru_cache(maxsize=None)
def _default_gemm_min_m() -> int:
    """Rows from which the dequantize + BLAS path runs, by build (BENCHMARKS.md, "CPU: fused kernel
    vs dequantize + BLAS"). With the AVX-512 and AVX2 builds the fused kernels (FMA and bf16
    dot-product) were faster than dequantize + torch.mm at every M measured, 1 to 512 rows (which
    costs a dense matmul plus the dequantization): BLAS never runs by default. The portable build
    on x86 (-march=x86-64, SSE2) is slower fused than BLAS at every M, M = 1 included (1.3x) and
    several times from M = 2: BLAS always. Other portable builds (e.g. ARM, not measured) keep
    the fused kernel for decode, BLAS from M = 2."""
    env = os.environ.get("GPTQKIT_CPU_GEMM_MIN_M")
    if env is not None:
        return int(env) or (1 << 62)
    if isa() in ("avx512", "avx2"):
        return 1 << 62
    return 1 if platform.machine().lower() in ("x86_64", "amd64", "i686", "i386") else 2


# Rows from which 4-bit layers run the int8-activation GEMM by default (`_i8_min_m`): never, as
# it changes the numbers (BENCHMARKS.md, "Prefill with int8 activations")
I8_MIN_M = 0
# ... and what int8_activations=True / --int8-activations mean: from 16 rows (a batch of short
# prompts or a prefill; at M = 16 the int8 GEMM is already 1.5-1.7x the FMA kernel on AVX2)
I8_ROWS = 16
_i8_logged = False


def _i8_min_m() -> int:
    """Rows from which the int8-activation GEMM (gk_gemm_i8) runs: GPTQKIT_CPU_I8_MIN_M, 0 for
    never (the FMA kernel at every M, x in fp32 as given), else I8_MIN_M. Read at prepare."""
    env = os.environ.get("GPTQKIT_CPU_I8_MIN_M")
    if env is None:
        return I8_MIN_M
    try:
        n = int(env)
    except ValueError:
        raise BackendError(f"GPTQKIT_CPU_I8_MIN_M={env!r} is not a whole number: give the rows from "
                           "which the int8-activation kernel runs, or 0 to never use it") from None
    return max(0, n)


def i8_eligible(dp: bool, bits: int, K: int, seg: torch.Tensor) -> bool:
    """Whether gk_gemm_i8 can run a layer: 4-bit codes (3-bit ones are held as 4-bit) in the FMA
    layout, every group run whole quads of rows (every standard group size), a build with it."""
    return not dp and bits == 4 and K % 4 == 0 and bool((seg % 4 == 0).all()) and i8_available()


def _log_i8(rows: int, block: int) -> None:
    global _i8_logged
    if not _i8_logged:  # once per process: it changes the numbers, so say so
        _i8_logged = True
        log.info("cpu backend: 4-bit layers run with int8 activations from %d rows (one scale per %s input "
                 "features); results differ slightly from the exact kernel", rows, block or "128")


def set_int8_activations(model: torch.nn.Module, rows: int | bool = True) -> int:
    """Round the inputs of a loaded model's 4-bit CPU layers to int8 when they have at least
    `rows` rows (True: I8_ROWS; False or 0: never, the exact kernel at every size): the
    int8-activation GEMM, ~1.6-2x the fp32 kernel's speed at prefill sizes on AVX2 and AVX-512, for
    slightly different numbers (SmolLM2 4-bit: perplexity +0.34 %; BENCHMARKS.md, "Prefill with int8
    activations"). One-token decode never takes it. Returns how many layers it applies to (layers
    on other backends, 2/8-bit, the bf16 dot-product layout and odd group sizes keep the exact path).
    The setting stays with the layers through moves and reloads."""
    if isinstance(rows, bool):
        rows = I8_ROWS if rows else 0
    if not isinstance(rows, int) or rows < 0:
        raise ConfigError(f"int8 activations: rows={rows!r}; give True, False, or the rows (a whole number "
                          "≥ 0; 0 = never) from which the int8-activation kernel runs")
    n = 0
    for m in model.modules():
        if not isinstance(m, QuantLinear):
            continue
        m.int8_from = rows
        L = m.layout
        if isinstance(L, CpuLayout):
            ok = i8_eligible(L.dp, L.bits, L.K, L.seg)
            L.set_i8_min_m(rows if ok else 0)
            n += bool(ok and rows)
    if n:
        _log_i8(rows, CpuBackend.i8_block)
    return n


@dataclass(eq=False)
class CpuLayout:
    """What the cpu backend computes from, built once by `prepare` (csrc/cpu_kernels.cpp explains
    the layouts). The kernel tensors are private to the layout: never resized, never shared."""
    w: torch.Tensor             # uint8 codes: [nblk, K, 8·bits] (`repack`) or [nblk, K/8, 4, 64] (`repack_dp`)
    s: torch.Tensor             # float32 [nblk, G', 64] scales (×16 for dp)
    sz: torch.Tensor            # float32 [nblk, G', 64] scales · zeros (s·(16 + z) for dp)
    seg: torch.Tensor           # int32 [G' + 1] row runs (dp: groups cut into runs of <= 128 rows)
    gk: torch.Tensor            # int32 [K] run of each row (the dequantizer's index)
    perm: torch.Tensor | None   # act-order row permutation (rows of w are in this order), or None
    bias: torch.Tensor | None   # float32 [N]
    K: int
    N: int
    bits: int                   # bits per code in w: 2, 4 or 8 (3-bit codes are held as 4-bit)
    dp: bool                    # the AVX-512 BF16 dot-product layout and kernel
    gemm_min_m: int             # rows from which the tile-dequantize + BLAS path runs
    tile_bytes: int             # fp32 bytes of one dequantized tile on that path
    i8_min_m: int               # rows from which the int8-activation GEMM runs (0: never)
    i8_block: int               # features per int8 block scale of x (0: one per scale run of <= 128)
    use_op: bool                # call the torch custom op (else the ctypes library)
    # derived in __post_init__: the op's arguments after x, in one tuple (the forward is one call)
    op_args: tuple | None = field(init=False, repr=False, default=None)
    # the ctypes decode fast path: the constant arguments as one C struct, and the M = 1 thread cap
    cargs: _LayerArgs | None = field(init=False, repr=False, default=None)
    cargs_ptr: int = field(init=False, repr=False, default=0)
    nt1: int = field(init=False, default=1)
    nblk: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.nblk = self.w.shape[0]
        self.nt1 = max(1, min((self.K * self.N) >> 19, self.nblk))
        if self.use_op:
            self.op_args = (self.w, self.s, self.sz, self.seg, self.gk, self.perm, self.bias, self.N,
                            self.bits, int(self.dp), self.gemm_min_m, self.tile_bytes, self.i8_min_m,
                            self.i8_block)
        else:
            # raw pointers into the tensors above, which live as long as this layout
            self.cargs = _LayerArgs(self.w.data_ptr(), self.s.data_ptr(), self.sz.data_ptr(),
                                    self.seg.data_ptr(), self.bits, self.K, self.seg.numel() - 1,
                                    self.nblk, self.N)
            self.cargs_ptr = ctypes.addressof(self.cargs)

    def set_i8_min_m(self, rows: int) -> None:
        """Run the int8-activation GEMM from `rows` rows on (0: never); the caller checks
        `i8_eligible` first."""
        self.i8_min_m = rows
        if self.op_args is not None:
            self.op_args = self.op_args[:-2] + (rows, self.i8_block)

    def __deepcopy__(self, memo):
        # a copied C struct would still point into this layout's tensors: rebuild it for the copy
        import copy
        return CpuLayout(**{f.name: copy.deepcopy(getattr(self, f.name), memo) for f in fields(self) if f.init})

    def codes(self) -> torch.Tensor:
        """int32 [K, N]: the integer weights in checkpoint row order (QuantLinear rebuilds
        `qweight` from them, so it need not keep its own copy)."""
        q = unrepack_dp(self.w, self.K, self.N) if self.dp else unrepack(self.w, self.bits, self.K, self.N)
        return unsort_rows(q, self.perm)


_SLICE_CODES = 1 << 22  # codes per slice while repacking: 16 MiB as int32


def _repacked(layer: QuantLinear, perm: torch.Tensor | None, fn: Callable) -> torch.Tensor:
    """fn (repack / repack_dp) of the layer's codes, row-sorted by perm, a slice of output columns
    at a time: a whole [K, N] int32 unpacked copy (and its sorted copy) would be 8x the layer's
    packed size at once, e.g. 2 x 113 MiB for SmolLM2's quantized lm_head."""
    K, N = layer.in_features, layer.out_features
    step = max(BLOCK, _SLICE_CODES // max(K, 1) // BLOCK * BLOCK)
    out = None
    for c0 in range(0, N, step):
        q = unpack_qweight(layer.qweight[:, c0:c0 + step].contiguous(), layer.bits)[:K]
        part = fn(q if perm is None else q[perm])
        if out is None:
            out = part.new_empty((-(-N // BLOCK), *part.shape[1:]))
        out[c0 // BLOCK:c0 // BLOCK + part.shape[0]] = part
    return out


class CpuBackend:
    name = "cpu"
    bits_supported = (2, 3, 4, 8)
    # Rows at or above which the BLAS path (tile dequantize + torch.mm) is used, chosen per build
    # from side-by-side timings (`_default_gemm_min_m`: never on AVX-512 and AVX2 builds, always
    # on the portable x86 build). GPTQKIT_CPU_GEMM_MIN_M overrides it (0: never use BLAS).
    # Read at prepare.
    gemm_min_m: int | None = None
    tile_bytes = 4 << 20  # fp32 bytes of one dequantized tile on the BLAS path
    # The AVX-512 BF16 dot-product kernel for 4-bit layers: "auto" uses it for bf16/fp16 models
    # (bf16 x goes in as is; 1.1-1.7x faster than the FMA kernel, BENCHMARKS.md), and keeps the
    # FMA kernel for fp32 models, where the dot-product kernel must split x into 3 bf16 parts and
    # is no faster at M = 1 and slower at M = 4. "1" always, "0" never (GPTQKIT_CPU_DP).
    use_dp = os.environ.get("GPTQKIT_CPU_DP", "auto")
    # the torch custom op when it builds (True), else the ctypes library; False forces ctypes
    use_op = True
    # Rows from which 4-bit layers take the int8-activation GEMM (None: GPTQKIT_CPU_I8_MIN_M or
    # I8_MIN_M; 0 never), unless the layer's own `int8_from` says otherwise. Read at prepare.
    i8_min_m: int | None = None
    i8_block = 32  # features per int8 block scale of x (a multiple of 4; 0: one per run of <= 128)

    def supports(self, layer: QuantLinear, device: torch.device) -> str | None:
        if torch.device(device).type != "cpu":
            return f"device {device} is not a CPU"
        if layer.bits not in self.bits_supported:
            return f"{layer.bits}-bit is not implemented (cpu backend supports {self.bits_supported})"
        if get_lib() is None:
            return f"kernel unavailable: {_lib_error}"
        return None

    def prepare(self, layer: QuantLinear) -> CpuLayout:
        K, N = layer.in_features, layer.out_features
        z = unpack_qzeros(layer.qzeros, layer.bits, N, layer.checkpoint_format)
        G = layer.scales.shape[0]
        perm = group_order(layer.g_idx.cpu())  # act-order: groups become contiguous runs
        gs = layer.g_idx.cpu().long() if perm is None else layer.g_idx.cpu().long()[perm]
        nblk = -(-N // BLOCK)
        s = layer.scales.float().cpu()
        seg = torch.searchsorted(gs.contiguous(), torch.arange(G + 1)).to(torch.int32).contiguous()
        want = self.use_dp == "1" or (self.use_dp == "auto" and
                                      layer.compute_dtype in (torch.bfloat16, torch.float16))
        # 3-bit codes (0..7) are stored as 4-bit nibbles: bytes do not split into 3-bit fields,
        # and the 4-bit kernels run them at 4-bit speed (the derived copy is 4/3 the packed size)
        kbits = 4 if layer.bits == 3 else layer.bits
        # the dot-product kernel wants every group run to be whole octets of rows
        dp = want and kbits == 4 and K % 8 == 0 and bool((seg % 8 == 0).all()) and dp_available()
        if dp:
            # the kernel subtracts a bias of 16·sum(x) per run (see the C++ source); cutting long
            # runs (group_size -1 or > 128) into runs of <= 128 rows keeps that cancellation to
            # the rounding error of a 128-row group. Sub-runs share their group's parameters.
            starts = [(r, g) for g in range(G) for r in range(int(seg[g]), int(seg[g + 1]), 128)]
            gmap = torch.tensor([g for _, g in starts] or [0], dtype=torch.long)
            seg = torch.tensor([r for r, _ in starts] + [K], dtype=torch.int32)
            gs = torch.searchsorted(seg, torch.arange(K, dtype=torch.int32), right=True) - 1
            w = _repacked(layer, perm, repack_dp)
            sc = _block_params(s[gmap] * 16, nblk)
            szc = _block_params(s[gmap] * (z.float()[gmap] + 16), nblk)
        else:
            w = _repacked(layer, perm, lambda q: repack(q, kbits))
            sc = _block_params(s, nblk)
            szc = _block_params(s * z.float(), nblk)
        use_op = self.use_op and get_op() is not None
        gmin = self.gemm_min_m if self.gemm_min_m is not None else _default_gemm_min_m()
        # int8 activations at prefill sizes: 4-bit codes in the FMA layout whose group runs are
        # whole quads of rows (every standard group size)
        i8 = layer.int8_from if layer.int8_from is not None else \
            self.i8_min_m if self.i8_min_m is not None else _i8_min_m()
        i8 = i8 if i8_eligible(dp, kbits, K, seg) else 0
        if i8:
            _log_i8(i8, self.i8_block)
        layout = CpuLayout(w=w, s=sc, sz=szc, seg=seg, gk=gs.to(torch.int32).contiguous(), perm=perm,
                           bias=layer.bias.float() if layer.bias is not None else None, K=K, N=N,
                           bits=kbits, dp=dp, gemm_min_m=gmin, tile_bytes=self.tile_bytes, i8_min_m=i8,
                           i8_block=self.i8_block,
                           use_op=use_op)
        log.debug("%s: cpu backend prepared (%d blocks, act-order permutation: %s, kernel: %s%s, via %s)",
                  layer.describe(), nblk, perm is not None, "bf16 dot-product" if dp else "fma",
                  f", int8 activations from {i8} rows" if i8 else "", "torch op" if use_op else "ctypes")
        return layout

    def forward(self, layer: QuantLinear, L: CpuLayout, x: torch.Tensor) -> torch.Tensor:
        if L.op_args is not None:  # the whole forward in C++ (csrc/cpu_op.cpp); _op is set when op_args are
            try:
                return _op(x, *L.op_args)
            except RuntimeError as e:  # TORCH_CHECK failures and kernel return codes
                raise BackendError(f"{layer.describe()}: {e}") from e
        return self._forward_ctypes(L, x)

    def _forward_ctypes(self, L: CpuLayout, x: torch.Tensor) -> torch.Tensor:
        """The fallback when the op cannot be built; the op does the same steps in C++."""
        lib = get_lib()
        # decode fast path (no act-order permutation, contiguous fp32 or, for the dot-product
        # kernel, bf16 x, M = 1): no reshape/copy/convert, one ctypes call on the layout's struct
        if (L.perm is None and x.is_contiguous() and x.numel() == L.K and 1 < L.gemm_min_m
                and not 0 < L.i8_min_m <= 1):
            nt = L.nt1
            if nt > 1:
                nt = min(nt, torch.get_num_threads())
            xd = x.dtype
            if L.dp and (xd is torch.float32 or xd is torch.bfloat16):
                y = torch.empty(x.shape[:-1] + (L.N,), dtype=torch.float32)
                bf = xd is torch.bfloat16
                _check(lib.gk_gemv_dp_layer(L.cargs_ptr, x.data_ptr(), int(bf), 1 if bf else 3, 1,
                                            y.data_ptr(), nt))
                if L.bias is not None:
                    y += L.bias
                return y.to(xd) if bf else y
            if xd is torch.float32 and not L.dp:
                y = torch.empty(x.shape[:-1] + (L.N,), dtype=torch.float32)
                _check(lib.gk_gemv_layer(L.cargs_ptr, x.data_ptr(), 1, y.data_ptr(), nt))
                if L.bias is not None:
                    y += L.bias
                return y
        K, N = L.K, L.N
        x2 = prologue(x, K, L.perm)
        # the dot-product kernel reads bf16 x as is (exact); anything else goes in as fp32, split
        # into 2 bf16 parts (exact for fp16 values) or 3 (exact for any fp32)
        if L.dp and x2.dtype is torch.bfloat16:
            xdtype, nsplit = 1, 1
        else:
            xdtype, nsplit = 0, (2 if x2.dtype is torch.float16 else 3)
            x2 = x2.to(torch.float32)
        x2 = x2.contiguous()
        M = x2.shape[0]
        # torch's thread count, but no more than one thread per ~0.5 M multiply-adds (on tiny
        # layers waking a second thread costs more than it saves) and per work item of the
        # kernel: a 64-column block, times chunks of 12 rows for the FMA kernel (csrc/cpu_op.cpp
        # has the same rule)
        items = L.nblk if L.dp else L.nblk * max(1, -(-M // 12))
        nt = max(1, min(torch.get_num_threads(), (M * K * N) >> 19, items))
        G = L.seg.numel() - 1
        if 0 < L.i8_min_m <= M:
            y = torch.empty(M, N, dtype=torch.float32)
            _check(lib.gk_gemm_i8(L.w.data_ptr(), L.s.data_ptr(), L.sz.data_ptr(), L.seg.data_ptr(), K, G,
                                  L.nblk, x2.data_ptr(), M, y.data_ptr(), N, L.i8_block, nt))
        elif M < L.gemm_min_m:
            y = torch.empty(M, N, dtype=torch.float32)
            if M:
                if L.dp:
                    rc = lib.gk_gemv_dp(L.w.data_ptr(), L.s.data_ptr(), L.sz.data_ptr(), L.seg.data_ptr(),
                                        K, G, L.nblk, x2.data_ptr(), xdtype, nsplit, M, y.data_ptr(), N, nt)
                else:
                    rc = lib.gk_gemv(L.w.data_ptr(), L.s.data_ptr(), L.sz.data_ptr(), L.seg.data_ptr(),
                                     L.bits, K, G, L.nblk, x2.data_ptr(), M, y.data_ptr(), N, nt)
                _check(rc)
        else:
            y = self._gemm(L, lib, x2.float(), nt)
        return epilogue(y, L.bias, x)

    @staticmethod
    def _gemm(L: CpuLayout, lib, x2: torch.Tensor, nt: int) -> torch.Tensor:
        K, N = L.K, L.N
        M = x2.shape[0]
        G = L.seg.numel() - 1
        nblk = L.nblk
        nb = max(1, min(nblk, L.tile_bytes // (K * BLOCK * 4)))
        y = torch.empty(M, N, dtype=torch.float32)
        tile = torch.empty(K, nb * BLOCK, dtype=torch.float32)
        for b0 in range(0, nblk, nb):
            cnt = min(nb, nblk - b0)
            t = tile if cnt == nb else torch.empty(K, cnt * BLOCK, dtype=torch.float32)
            if L.dp:
                rc = lib.gk_dequant_dp(L.w.data_ptr(), L.s.data_ptr(), L.sz.data_ptr(), L.gk.data_ptr(),
                                       K, G, b0, cnt, t.data_ptr(), nt)
            else:
                rc = lib.gk_dequant(L.w.data_ptr(), L.s.data_ptr(), L.sz.data_ptr(), L.gk.data_ptr(),
                                    L.bits, K, G, b0, cnt, t.data_ptr(), nt)
            _check(rc)
            n0, n1 = b0 * BLOCK, min(N, (b0 + cnt) * BLOCK)
            # straight into y's columns: torch's mm writes a row-major column slice in place
            # (its leading dimension is N), no temporary and no copy
            torch.mm(x2, t[:, : n1 - n0], out=y[:, n0:n1])
        return y


register_backend("cpu", CpuBackend)
