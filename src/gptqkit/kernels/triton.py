"""The "triton" backend: fused dequantize-GEMM/GEMV for CUDA (2/3/4/8 bits, sym/asym, act-order,
v1 and v2 checkpoints).

Prepare (once per layer):
* zero points are decoded (v1: stored + 1) and folded into fp32 `s` and `s·z` tables, so the
  kernel computes w = q·s − s·z and never reads qzeros;
* act-order: the K rows are permuted once so g_idx is sorted (x's columns are permuted per call
  with one index_select);
* codes are packed along K, VPW values per int32 word (value k at word k // VPW, bits
  (k % VPW)·b): VPW = 32/b for 2/4/8 bits, which is the checkpoint layout itself (no repack
  unless act-order permutes rows), and VPW = 10 for 3 bits (30 of 32 bits used; the checkpoint's
  word-straddling 3-bit layout is unpacked once).

Two kernels: for M ≤ 16 rows a GEMV-shaped kernel (one program per (row, column tile, K split),
fp32 FMA reductions, split-K with atomics so a single decode token fills the GPU), and for
prefill a tiled GEMM that dequantizes a [BLOCK_K, BLOCK_N] tile in registers and feeds tl.dot.

On a non-CUDA device `supports` returns a reason unless TRITON_INTERPRET=1 is set (then the
kernels run in Triton's interpreter on the CPU — slow, used by the tests).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from .qlinear import QuantLinear, prologue, register_backend, sort_rows
from .torch_ref import unpack_layer

log = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl
    _IMPORT_ERROR: str | None = None
except Exception as e:  # noqa: BLE001
    triton = tl = None
    _IMPORT_ERROR = f"triton is not importable ({e}); pip install triton"

GEMV_MAX_M = 16


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def interpreter_ready() -> bool:
    """True if triton.language was imported in interpreter mode (TRITON_INTERPRET=1 must be set
    before `import triton`: its own helpers such as tl.sum are decorated at import time)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
        import triton.language.standard as std
        return isinstance(std.sum, InterpretedFunction)
    except Exception:  # noqa: BLE001
        return False


# Kernels are plain functions here and decorated with triton.jit lazily, at first use, so that
# the interpreter/compiler choice follows TRITON_INTERPRET at call time, not at import time.
def _gemv_kernel(x_ptr, qw_ptr, s_ptr, sz_ptr, g_ptr, y_ptr, N, K, stride_xm, stride_ym,
                 BITS: tl.constexpr, VPW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    maxq = (1 << BITS) - 1
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < K
        x = tl.load(x_ptr + m * stride_xm + rk, mask=kmask, other=0.0).to(tl.float32)
        wmask = kmask[:, None] & nmask[None, :]
        words = tl.load(qw_ptr + (rk // VPW)[:, None] * N + rn[None, :], mask=wmask, other=0)
        q = (words >> ((rk % VPW) * BITS)[:, None]) & maxq
        g = tl.load(g_ptr + rk, mask=kmask, other=0)
        s = tl.load(s_ptr + g[:, None] * N + rn[None, :], mask=wmask, other=0.0)
        sz = tl.load(sz_ptr + g[:, None] * N + rn[None, :], mask=wmask, other=0.0)
        w = q.to(tl.float32) * s - sz
        acc += tl.sum(w * x[:, None], axis=0)
    if SPLIT_K == 1:
        tl.store(y_ptr + m * stride_ym + rn, acc, mask=nmask)
    else:
        tl.atomic_add(y_ptr + m * stride_ym + rn, acc, mask=nmask)


def _gemm_kernel(x_ptr, qw_ptr, s_ptr, sz_ptr, g_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                 BITS: tl.constexpr, VPW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, FP32: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < M
    nmask = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    maxq = (1 << BITS) - 1
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        wmask = kmask[:, None] & nmask[None, :]
        words = tl.load(qw_ptr + (rk // VPW)[:, None] * N + rn[None, :], mask=wmask, other=0)
        q = (words >> ((rk % VPW) * BITS)[:, None]) & maxq
        g = tl.load(g_ptr + rk, mask=kmask, other=0)
        s = tl.load(s_ptr + g[:, None] * N + rn[None, :], mask=wmask, other=0.0)
        sz = tl.load(sz_ptr + g[:, None] * N + rn[None, :], mask=wmask, other=0.0)
        w = q.to(tl.float32) * s - sz
        if FP32:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc, mask=mmask[:, None] & nmask[None, :])


_JIT: dict[bool, tuple] = {}


def _kernels():
    mode = interpret_mode()
    if mode not in _JIT:
        _JIT[mode] = (triton.jit(_gemv_kernel), triton.jit(_gemm_kernel))
    return _JIT[mode]


def values_per_word(bits: int) -> int:
    return 10 if bits == 3 else 32 // bits


def pack_k(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q [K, N] codes -> int32 [ceil(K/VPW), N], value k at word k // VPW, bits (k % VPW)·b."""
    K, N = q.shape
    vpw = values_per_word(bits)
    nw = -(-K // vpw)
    qq = torch.zeros(nw * vpw, N, dtype=torch.int64, device=q.device)
    qq[:K] = q.to(torch.int64)
    qq = qq.reshape(nw, vpw, N)
    words = torch.zeros(nw, N, dtype=torch.int64, device=q.device)
    for i in range(vpw):
        words |= qq[:, i] << (bits * i)
    words = torch.where(words >= (1 << 31), words - (1 << 32), words)
    return words.to(torch.int32).contiguous()


@dataclass
class TritonLayout:
    qw: torch.Tensor               # int32 [ceil(K/VPW), N] codes packed along K (group order)
    s: torch.Tensor                # float32 [G, N] scales
    sz: torch.Tensor               # float32 [G, N] scales · zeros
    g: torch.Tensor                # int32 [K] group of each (permuted) row
    perm: torch.Tensor | None      # act-order row permutation, or None
    bias: torch.Tensor | None      # float32 [N]


class TritonBackend:
    name = "triton"
    bits_supported = (2, 3, 4, 8)

    def supports(self, layer: QuantLinear, device: torch.device) -> str | None:
        if _IMPORT_ERROR:
            return _IMPORT_ERROR
        device = torch.device(device)
        if device.type != "cuda" and not interpret_mode():
            return f"device {device} is not CUDA (set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter)"
        if device.type != "cuda" and not interpreter_ready():
            return "TRITON_INTERPRET=1 was set after triton was imported; set it before importing triton"
        if device.type == "cuda" and not torch.cuda.is_available():
            return "CUDA is not available"
        if layer.bits not in self.bits_supported:
            return f"{layer.bits}-bit is not implemented"
        return None

    def prepare(self, layer: QuantLinear) -> TritonLayout:
        q, z = unpack_layer(layer)
        K = layer.in_features
        q, g_idx, perm = sort_rows(q, layer.g_idx)
        if perm is None and layer.bits != 3 and layer.qweight.shape[0] * 32 // layer.bits == K:
            qw = layer.qweight.contiguous()  # the checkpoint layout is the kernel layout
        else:
            qw = pack_k(q, layer.bits)
        s = layer.scales.float()
        return TritonLayout(qw=qw, s=s.contiguous(), sz=(s * z.to(s.device).float()).contiguous(),
                            g=g_idx.to(torch.int32).contiguous(), perm=perm,
                            bias=layer.bias.float() if layer.bias is not None else None)

    def forward(self, layer: QuantLinear, L: TritonLayout, x: torch.Tensor) -> torch.Tensor:
        gemv, gemm = _kernels()
        K, N = layer.in_features, layer.out_features
        shape = x.shape
        out_dtype = x.dtype if x.dtype.is_floating_point else torch.float32
        x2 = prologue(x, K, L.perm)
        if x2.dtype not in (torch.float16, torch.bfloat16, torch.float32) or (
                x2.dtype == torch.bfloat16 and x2.device.type != "cuda"):
            x2 = x2.float()  # Triton's CPU interpreter computes bf16 tl.dot on raw bits (wrong)
        x2 = x2.contiguous()
        M = x2.shape[0]
        bits, vpw = layer.bits, values_per_word(layer.bits)
        if M <= GEMV_MAX_M:
            BLOCK_N, BLOCK_K = 64, 64
            tiles_n = triton.cdiv(N, BLOCK_N)
            ksteps = triton.cdiv(K, BLOCK_K)
            # enough programs to fill the GPU at batch 1: split K when there are few column tiles
            split = max(1, min(ksteps, 512 // max(1, tiles_n * M)))
            y = (torch.zeros if split > 1 else torch.empty)(M, N, dtype=torch.float32, device=x2.device)
            if M:
                gemv[(tiles_n, split, M)](x2, L.qw, L.s, L.sz, L.g, y,
                                          N, K, x2.stride(0), y.stride(0), BITS=bits, VPW=vpw,
                                          BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, SPLIT_K=split)
        else:
            BLOCK_M = 64 if M >= 64 else 32
            BLOCK_N, BLOCK_K = 64, 32
            y = torch.empty(M, N, dtype=torch.float32, device=x2.device)
            grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
            gemm[grid](x2, L.qw, L.s, L.sz, L.g, y, M, N, K,
                       x2.stride(0), y.stride(0), BITS=bits, VPW=vpw, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                       BLOCK_K=BLOCK_K, FP32=x2.dtype == torch.float32)
        if L.bias is not None:
            y += L.bias
        return y.to(out_dtype).reshape(*shape[:-1], N)


register_backend("triton", TritonBackend)
