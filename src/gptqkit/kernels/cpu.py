"""The "cpu" backend: fused dequantize-GEMV in C++ (AVX2/AVX-512 via -march=native, OpenMP).

* Decode (M = 1): one pass over a repacked copy of the 2/3/4/8-bit
  codes; codes are zero-extended and converted in registers and accumulated in fp32, with
  scale and scale·zero applied once per group (w = s·q − s·z). Memory-bound at M = 1.
* Any batch: the same kernel takes 6 rows of x (4 without AVX-512) per pass over a weight block
  held in L2, so at M ≥ 64 it runs at the FMA limit, like a BLAS fp32 matmul but reading 8x
  fewer weight bytes. An optional BLAS path (GPTQKIT_CPU_GEMM_MIN_M=<rows>) dequantizes tiles of
  output columns to fp32 (a few MiB at a time, never the whole matrix) and calls torch.mm.
* Act-order: rows of the weights are permuted once at prepare time so that every group is a
  contiguous run; each call permutes x's columns with one index_select.
* bf16/fp16 models, 4-bit (and 3-bit, held as 4-bit nibbles): an AVX-512 BF16 dot-product
  kernel (`repack_dp` layout) that reads bf16 activations as they are; fp32 models keep the
  FMA kernel above (see `CpuBackend.use_dp`).

The C++ source (csrc/cpu_kernels.cpp) is compiled at first use with the system C++ compiler
(`$CXX` or g++/c++), no torch headers and no ninja needed, and cached per user under
`$GPTQKIT_CACHE_DIR` (default `$XDG_CACHE_HOME/gptqkit` or `~/.cache/gptqkit`) keyed by the hash
of source, flags, compiler and CPU flags. If it cannot be built, `supports` returns the reason
and QuantLinear falls back to the torch backend (the reason is logged).
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
from pathlib import Path

import torch

from ..errors import BackendError
from .qlinear import QuantLinear, register_backend
from .torch_ref import unpack_layer

log = logging.getLogger(__name__)

_SRC = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"
# GPTQKIT_CPU_MARCH builds for another target than this CPU (e.g. x86-64-v3 = AVX2+FMA, to test
# and benchmark the AVX2 build on an AVX-512 machine)
_MARCH = os.environ.get("GPTQKIT_CPU_MARCH", "native")
_FLAG_SETS = (["-O3", f"-march={_MARCH}", "-fopenmp", "-std=c++17"],
              ["-O3", "-fopenmp", "-std=c++17"],
              ["-O3", "-std=c++17"])
_lib = None
_lib_error: str | None = None
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


def _build() -> ctypes.CDLL:
    """Compile (or reuse the cached build of) the kernels; raises RuntimeError with the reason."""
    if os.environ.get("GPTQKIT_DISABLE_CPU_KERNEL"):
        raise RuntimeError("disabled by GPTQKIT_DISABLE_CPU_KERNEL")
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set $CXX or install g++)")
    src = _SRC.read_bytes()
    try:
        cxx_version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"cannot run {cxx}: {e}") from e
    errors = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256(b"\0".join([src, " ".join(flags).encode(), cxx_version.encode(),
                                         _cpu_signature().encode(), platform.machine().encode()])).hexdigest()[:20]
        out = cache_dir() / "kernels" / f"cpu-{key}" / "libgptqkit_cpu.so"
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
            os.close(fd)
            cmd = [cxx, *flags, "-shared", "-fPIC", "-o", tmp, str(_SRC)]
            log.info("building the gptqkit CPU kernel: %s", " ".join(cmd))
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if r.returncode != 0:
                os.unlink(tmp)
                errors.append(f"{' '.join(flags)}: {r.stderr.strip()[-500:]}")
                continue
            os.replace(tmp, out)  # atomic: concurrent builders never see a partial file
        try:
            lib = ctypes.CDLL(str(out))
            if lib.gk_abi_version() != 3:
                raise OSError("ABI version mismatch")
        except OSError as e:
            errors.append(f"{' '.join(flags)}: cannot load {out}: {e}")
            continue
        p, i = ctypes.c_void_p, ctypes.c_int
        lib.gk_gemv.argtypes = [p, p, p, p, i, i, i, i, p, i, p, i, i]
        lib.gk_gemv.restype = i
        lib.gk_dequant.argtypes = [p, p, p, p, i, i, i, i, i, p, i]
        lib.gk_dequant.restype = i
        # decode fast path: (struct gk_layer*, X, M, Y, nthreads)
        lib.gk_gemv_layer.argtypes = [p, p, i, p, i]
        lib.gk_gemv_layer.restype = i
        lib.gk_has_dp.restype = i
        lib.gk_isa.restype = i
        lib.gk_gemv_dp.argtypes = [p, p, p, p, i, i, i, p, i, i, i, p, i, i]
        lib.gk_gemv_dp.restype = i
        lib.gk_gemv_dp_layer.argtypes = [p, p, i, i, i, p, i]
        lib.gk_gemv_dp_layer.restype = i
        lib.gk_dequant_dp.argtypes = [p, p, p, p, i, i, i, i, p, i]
        lib.gk_dequant_dp.restype = i
        log.debug("gptqkit CPU kernel loaded from %s (flags %s)", out, " ".join(flags))
        return lib
    raise RuntimeError("could not build the CPU kernel: " + " | ".join(errors))


def get_lib() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (reason in `lib_error()`)."""
    global _lib, _lib_error
    with _lock:
        if _lib is None and _lib_error is None:
            try:
                _lib = _build()
            except Exception as e:  # noqa: BLE001  any failure means "fall back", with the reason
                _lib_error = str(e)
                log.warning("gptqkit CPU kernel unavailable, using the torch backend: %s", e)
        return _lib


def lib_error() -> str | None:
    get_lib()
    return _lib_error


def repack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q [K, N] codes (any int dtype) -> uint8 [nblk, K, 8·bits] in the kernel's block layout."""
    K, N = q.shape
    nblk = -(-N // BLOCK)
    qp = torch.zeros(K, nblk * BLOCK, dtype=torch.int32)
    qp[:, :N] = q.to(torch.int32)
    per = 8 // bits
    qp = qp.reshape(K, nblk, 4 // per, per, 16)        # column 16·(per·h + i) + lane
    byte = torch.zeros(K, nblk, 4 // per, 16, dtype=torch.int32)
    for i in range(per):
        byte |= qp[:, :, :, i, :] << (bits * i)
    return byte.reshape(K, nblk, 8 * bits).permute(1, 0, 2).to(torch.uint8).contiguous()


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


def isa() -> str:
    """The instruction set the loaded kernel was built for: "avx512", "avx2" or "generic"."""
    lib = get_lib()
    return {512: "avx512", 256: "avx2"}.get(lib.gk_isa(), "generic") if lib is not None else "none"


def dp_available() -> bool:
    """Whether the compiled kernel has the AVX-512 BF16 dot-product path."""
    lib = get_lib()
    return lib is not None and bool(lib.gk_has_dp())


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
    env = os.environ.get("GPTQKIT_CPU_GEMM_MIN_M")
    if env is not None:
        return int(env) or (1 << 62)
    return 32 if isa() == "avx512" else 2


class CpuBackend:
    name = "cpu"
    bits_supported = (2, 3, 4, 8)
    # Rows at or above which the BLAS path (tile dequantize + torch.mm) is used, chosen per build
    # from side-by-side timings (BENCHMARKS.md, "CPU: fused kernel vs dequantize + BLAS"): the
    # AVX2 build of the fused kernel loses to dequantize + BLAS from M = 2 on, the AVX-512 build
    # from about M = 32. GPTQKIT_CPU_GEMM_MIN_M overrides it (0: never use BLAS).
    gemm_min_m: int | None = None
    tile_bytes = 4 << 20  # fp32 bytes of one dequantized tile on the BLAS path
    # The AVX-512 BF16 dot-product kernel for 4-bit layers: "auto" uses it for bf16/fp16 models
    # (bf16 x goes in as is; 1.1-1.7x faster than the FMA kernel, BENCHMARKS.md), and keeps the
    # FMA kernel for fp32 models, where the dot-product kernel must split x into 3 bf16 parts and
    # is no faster at M = 1 and slower at M = 4. "1" always, "0" never (GPTQKIT_CPU_DP).
    use_dp = os.environ.get("GPTQKIT_CPU_DP", "auto")

    def supports(self, layer: QuantLinear, device: torch.device) -> str | None:
        if torch.device(device).type != "cpu":
            return f"device {device} is not a CPU"
        if layer.bits not in self.bits_supported:
            return f"{layer.bits}-bit is not implemented (cpu backend supports {self.bits_supported})"
        if get_lib() is None:
            return f"kernel unavailable: {_lib_error}"
        return None

    def prepare(self, layer: QuantLinear) -> None:
        q, z = unpack_layer(layer)
        K, N = layer.in_features, layer.out_features
        g_idx = layer.g_idx.long().cpu()
        G = layer.scales.shape[0]
        monotonic = bool((g_idx[1:] >= g_idx[:-1]).all()) if K > 1 else True
        if monotonic:
            perm = None
            gs = g_idx
        else:  # act-order: permute K once so that groups are contiguous runs
            perm = torch.argsort(g_idx, stable=True)
            q = q[perm]
            gs = g_idx[perm]
        nblk = -(-N // BLOCK)
        s = layer.scales.float().cpu()
        seg = torch.searchsorted(gs.contiguous(), torch.arange(G + 1)).to(torch.int32).contiguous()
        want = self.use_dp == "1" or (self.use_dp == "auto" and
                                      layer.compute_dtype in (torch.bfloat16, torch.float16))
        # 3-bit codes (0..7) are stored as 4-bit nibbles: bytes do not split into 3-bit fields,
        # and the 4-bit kernels run them at 4-bit speed (the derived copy is 4/3 the packed size)
        kbits = 4 if layer.bits == 3 else layer.bits
        layer._cpu_bits = kbits
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
            layer._cpu_w = repack_dp(q)
            layer._cpu_s = _block_params(s[gmap] * 16, nblk)
            layer._cpu_sz = _block_params(s[gmap] * (z.float()[gmap] + 16), nblk)
        else:
            layer._cpu_w = repack(q, kbits)
            layer._cpu_s = _block_params(s, nblk)
            layer._cpu_sz = _block_params(s * z.float(), nblk)
        layer._cpu_dp = dp
        layer._cpu_seg = seg
        layer._cpu_gk = gs.to(torch.int32).contiguous()
        layer._cpu_perm = perm
        layer._cpu_nblk = nblk
        layer._cpu_bias = layer.bias.float() if layer.bias is not None else None
        # decode fast path: the constant kernel arguments in one C struct (it holds raw pointers
        # into the tensors above, which live as long as the layer and are never resized), and
        # the thread count for M = 1 (torch's thread count at call time caps it)
        args = _LayerArgs(layer._cpu_w.data_ptr(), layer._cpu_s.data_ptr(), layer._cpu_sz.data_ptr(),
                          layer._cpu_seg.data_ptr(), kbits, K, layer._cpu_seg.numel() - 1, nblk, N)
        layer._cpu_args = args
        layer._cpu_args_ptr = ctypes.addressof(args)
        layer._cpu_nt1 = max(1, min((K * N) >> 19, nblk))
        layer._cpu_fast = perm is None
        self._lib = get_lib()
        log.debug("%s: cpu backend prepared (%d blocks, act-order permutation: %s, kernel: %s)",
                  layer.describe(), nblk, perm is not None, "bf16 dot-product" if dp else "fma")

    def forward(self, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        # decode fast path (no act-order permutation, contiguous fp32 or, for the dot-product
        # kernel, bf16 x, M = 1): no reshape/copy/convert, one ctypes call on the layer's struct
        if layer._cpu_fast and x.is_contiguous() and x.numel() == layer.in_features:
            nt = layer._cpu_nt1
            if nt > 1:
                nt = min(nt, torch.get_num_threads())
            xd = x.dtype
            if layer._cpu_dp and (xd is torch.float32 or xd is torch.bfloat16):
                y = torch.empty(x.shape[:-1] + (layer.out_features,), dtype=torch.float32)
                bf = xd is torch.bfloat16
                self._lib.gk_gemv_dp_layer(layer._cpu_args_ptr, x.data_ptr(), int(bf), 1 if bf else 3, 1,
                                           y.data_ptr(), nt)
                if layer._cpu_bias is not None:
                    y += layer._cpu_bias
                return y.to(xd) if bf else y
            if xd is torch.float32 and not layer._cpu_dp:
                y = torch.empty(x.shape[:-1] + (layer.out_features,), dtype=torch.float32)
                self._lib.gk_gemv_layer(layer._cpu_args_ptr, x.data_ptr(), 1, y.data_ptr(), nt)
                if layer._cpu_bias is not None:
                    y += layer._cpu_bias
                return y
        lib = get_lib()
        K, N = layer.in_features, layer.out_features
        shape = x.shape
        out_dtype = x.dtype if x.dtype.is_floating_point else torch.float32
        x2 = x.reshape(-1, K)
        if layer._cpu_perm is not None:
            x2 = x2.index_select(1, layer._cpu_perm)
        # the dot-product kernel reads bf16 x as is (exact); anything else goes in as fp32, split
        # into 2 bf16 parts (exact for fp16 values) or 3 (exact for any fp32)
        if layer._cpu_dp and x2.dtype is torch.bfloat16:
            xdtype, nsplit = 1, 1
        else:
            xdtype, nsplit = 0, (2 if x2.dtype is torch.float16 else 3)
            x2 = x2.to(torch.float32)
        x2 = x2.contiguous()
        M = x2.shape[0]
        # torch's thread count, but no more than one thread per ~0.5 M multiply-adds: on tiny
        # layers waking a second thread costs more than it saves
        nt = max(1, min(torch.get_num_threads(), (M * K * N) >> 19, layer._cpu_nblk))
        gmin = self.gemm_min_m if self.gemm_min_m is not None else _default_gemm_min_m()
        if M < gmin:
            y = torch.empty(M, N, dtype=torch.float32)
            if M:
                if layer._cpu_dp:
                    rc = lib.gk_gemv_dp(layer._cpu_w.data_ptr(), layer._cpu_s.data_ptr(), layer._cpu_sz.data_ptr(),
                                        layer._cpu_seg.data_ptr(), K, layer._cpu_seg.numel() - 1,
                                        layer._cpu_nblk, x2.data_ptr(), xdtype, nsplit, M, y.data_ptr(), N, nt)
                else:
                    rc = lib.gk_gemv(layer._cpu_w.data_ptr(), layer._cpu_s.data_ptr(), layer._cpu_sz.data_ptr(),
                                     layer._cpu_seg.data_ptr(), layer._cpu_bits, K, layer._cpu_seg.numel() - 1,
                                     layer._cpu_nblk, x2.data_ptr(), M, y.data_ptr(), N, nt)
                _check(rc)
        else:
            y = self._gemm(layer, lib, x2.float(), nt)
        if layer._cpu_bias is not None:
            y += layer._cpu_bias
        return y.to(out_dtype).reshape(*shape[:-1], N)

    def _gemm(self, layer: QuantLinear, lib, x2: torch.Tensor, nt: int) -> torch.Tensor:
        K, N = layer.in_features, layer.out_features
        M = x2.shape[0]
        G = layer._cpu_seg.numel() - 1
        nblk = layer._cpu_nblk
        nb = max(1, min(nblk, self.tile_bytes // (K * BLOCK * 4)))
        y = torch.empty(M, N, dtype=torch.float32)
        tile = torch.empty(K, nb * BLOCK, dtype=torch.float32)
        for b0 in range(0, nblk, nb):
            cnt = min(nb, nblk - b0)
            t = tile if cnt == nb else torch.empty(K, cnt * BLOCK, dtype=torch.float32)
            if layer._cpu_dp:
                rc = lib.gk_dequant_dp(layer._cpu_w.data_ptr(), layer._cpu_s.data_ptr(), layer._cpu_sz.data_ptr(),
                                       layer._cpu_gk.data_ptr(), K, G, b0, cnt, t.data_ptr(), nt)
            else:
                rc = lib.gk_dequant(layer._cpu_w.data_ptr(), layer._cpu_s.data_ptr(), layer._cpu_sz.data_ptr(),
                                    layer._cpu_gk.data_ptr(), layer._cpu_bits, K, G, b0, cnt, t.data_ptr(), nt)
            _check(rc)
            n0, n1 = b0 * BLOCK, min(N, (b0 + cnt) * BLOCK)
            if n1 - n0 == t.shape[1] and nblk == cnt:
                torch.mm(x2, t, out=y)
            else:
                y[:, n0:n1] = torch.mm(x2, t[:, : n1 - n0])
        return y


register_backend("cpu", CpuBackend)
