"""The "triton" backend: fused dequantize-matmul for CUDA (2/3/4/8 bits, sym/asym, any group size,
act-order, v1 and v2 checkpoints, fp16/bf16/fp32 activations).

Prepare (once per layer, at load) builds a `TritonLayout` from the standard GPTQ buffers:
* zero points are decoded (v1: stored + 1) and folded into fp32 `scales` and `scaled_zeros`
  (s·z) tables, so the kernel computes w = q·s − s·z and never reads qzeros;
* act-order: the K rows are permuted once (argsort of g_idx) so groups become contiguous; each
  call permutes x's columns with one index_select. The inner loop then finds a row's group as
  k // group_size; it never gathers through g_idx. (Only a g_idx that is not "every group holds
  group_size consecutive rows" after sorting, which no producer we know writes, keeps g_idx and
  reads it per row; logged.)
* codes are packed along K, VPW values per int32 word (value k at word k // VPW, bits
  (k % VPW)·b): VPW = 32/b for 2/4/8 bits, which is the checkpoint layout itself (no repack
  unless act-order permutes rows), and VPW = 10 for 3 bits (30 of 32 bits used; the checkpoint's
  word-straddling 3-bit layout is unpacked once).

One matmul kernel (`_qmm_kernel`), three ways to run it, chosen per call from M (rows of x):
* decode, M <= DECODE_MAX_M: split-K so that one token still launches ~PROGRAMS_PER_SM programs
  per SM (few column tiles at batch 1 would leave most SMs idle); fp32 atomics combine the K
  splits. M = 1 uses FMA reductions; 2..16 rows are padded to 16 and use tl.dot.
* prefill, DECODE_MAX_M < M < DEQUANT_MIN_M: a tiled GEMM (tl.dot on tiles dequantized in
  registers).
* prefill, M >= DEQUANT_MIN_M: `_dequant_kernel` writes W in x's dtype, then torch.matmul
  (cuBLAS); at large M the matmul is compute-bound and cuBLAS is the best GEMM there is, and
  the dequantization is paid once per call.
When every row of a K tile lies in one group (the tile height divides the group size), the
kernel reads one row of scales per tile and applies them after the dot:
Σ_k x_k (q_k s − s z) = s · Σ_k x_k q_k − s z · Σ_k x_k, so the tile is fed to tl.dot as raw codes.

The thresholds are module attributes (read at each call, so benchmarks can move them) with
environment overrides GPTQKIT_TRITON_DECODE_MAX_M and GPTQKIT_TRITON_DEQUANT_MIN_M. Their
defaults, the tile shapes and WIDE_UNPACK (off) are first guesses: no line of this file has run
on a GPU yet. benchmarks/gpu_check.py checks every path against the torch reference on CUDA,
times the gemm and dequant paths side by side at every prefill M, and sweeps the tiles.

On a non-CUDA device `supports` returns a reason unless TRITON_INTERPRET=1 is set (then the
kernels run in Triton's interpreter on the CPU: slow, used by the tests).
"""
from __future__ import annotations

import functools
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


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    try:
        return int(v) if v not in (None, "") else default
    except ValueError:
        log.warning("%s=%r is not an integer; using %d", name, v, default)
        return default


DECODE_MAX_M = _env_int("GPTQKIT_TRITON_DECODE_MAX_M", 16)
DEQUANT_MIN_M = _env_int("GPTQKIT_TRITON_DEQUANT_MIN_M", 256)
PROGRAMS_PER_SM = 4          # decode: split K until about this many programs per SM are launched
# Unpack each loaded word into its VPW rows in registers (2/4/8-bit) instead of loading the word
# once per row. Verified in the interpreter; off by default until benchmarks/gpu_check.py's tile
# sweep has timed both on a GPU (the reshape may cost register shuffles that eat the gain).
WIDE_UNPACK = _env_int("GPTQKIT_TRITON_WIDE_UNPACK", 0) == 1
PATHS = ("decode", "gemm", "dequant")

# tile shapes (BLOCK_M, BLOCK_N, BLOCK_K); BLOCK_K shrinks to the group size when that lets a
# tile hold one group (see _block_k)
DECODE_TILE = (16, 64, 128)
GEMM_TILE = (64, 64, 64)
DEQUANT_TILE = (64, 64)


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


# GMODE: how a K row finds its group. 0: the whole BLOCK_K tile is one group (k0 // GS), one
# scales row per tile; 1: per row, k // GS; 2: per row, read from g_idx (irregular groups only).
# SPLIT_K is a runtime argument (a new split count must not compile a new kernel); ATOMIC says
# whether partial sums are added (SPLIT_K > 1) or stored.
def _qmm_kernel(x_ptr, qw_ptr, s_ptr, sz_ptr, g_ptr, y_ptr, M, N, K, GS, stride_xm, stride_ym, SPLIT_K,
                BITS: tl.constexpr, VPW: tl.constexpr, GMODE: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr, FP32: tl.constexpr,
                WIDE: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    nmask = rn < N
    mmask = rm < M
    maxq = (1 << BITS) - 1
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < K
        wmask = kmask[:, None] & nmask[None, :]
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        if WIDE:
            # each word loaded once and unpacked into VPW rows (BLOCK_K // VPW loads per column
            # instead of BLOCK_K); rows past K hold zeros or other codes but meet x = 0 there
            rw = k0 // VPW + tl.arange(0, BLOCK_K // VPW)
            words = tl.load(qw_ptr + rw[:, None] * N + rn[None, :],
                            mask=(rw < (K + VPW - 1) // VPW)[:, None] & nmask[None, :], other=0)
            q3 = (words[:, None, :] >> (tl.arange(0, VPW) * BITS)[None, :, None]) & maxq
            q = tl.reshape(q3, (BLOCK_K, BLOCK_N))
        else:
            # one load per (row, column): rows sharing a word hit the same address (cached)
            words = tl.load(qw_ptr + (rk // VPW)[:, None] * N + rn[None, :], mask=wmask, other=0)
            q = (words >> ((rk % VPW) * BITS)[:, None]) & maxq
        if GMODE == 0:
            g = k0 // GS
            s = tl.load(s_ptr + g * N + rn, mask=nmask, other=0.0)
            sz = tl.load(sz_ptr + g * N + rn, mask=nmask, other=0.0)
            xf = x.to(tl.float32)
            if BLOCK_M == 1:
                xq = tl.sum(q.to(tl.float32) * tl.reshape(xf, (BLOCK_K, 1)), axis=0)
                acc += (xq * s - tl.sum(xf) * sz)[None, :]
            else:
                if FP32:
                    xq = tl.dot(x, q.to(tl.float32), input_precision="ieee")
                else:
                    xq = tl.dot(x, q.to(x.dtype))  # codes < 256 are exact in fp16 and bf16
                acc += xq * s[None, :] - tl.sum(xf, axis=1)[:, None] * sz[None, :]
        else:
            if GMODE == 1:
                g = rk // GS
            else:
                g = tl.load(g_ptr + rk, mask=kmask, other=0)
            s = tl.load(s_ptr + g[:, None] * N + rn[None, :], mask=wmask, other=0.0)
            sz = tl.load(sz_ptr + g[:, None] * N + rn[None, :], mask=wmask, other=0.0)
            w = q.to(tl.float32) * s - sz
            if BLOCK_M == 1:
                acc += tl.sum(w * tl.reshape(x.to(tl.float32), (BLOCK_K, 1)), axis=0)[None, :]
            elif FP32:
                acc += tl.dot(x, w, input_precision="ieee")
            else:
                acc += tl.dot(x, w.to(x.dtype))
    ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    omask = mmask[:, None] & nmask[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=omask)
    else:
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=omask)


def _dequant_kernel(qw_ptr, s_ptr, sz_ptr, g_ptr, w_ptr, N, K, GS,
                    BITS: tl.constexpr, VPW: tl.constexpr, USE_GIDX: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    rk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    kmask = rk < K
    mask = kmask[:, None] & (rn < N)[None, :]
    words = tl.load(qw_ptr + (rk // VPW)[:, None] * N + rn[None, :], mask=mask, other=0)
    q = (words >> ((rk % VPW) * BITS)[:, None]) & ((1 << BITS) - 1)
    if USE_GIDX:
        g = tl.load(g_ptr + rk, mask=kmask, other=0)
    else:
        g = rk // GS
    s = tl.load(s_ptr + g[:, None] * N + rn[None, :], mask=mask, other=0.0)
    sz = tl.load(sz_ptr + g[:, None] * N + rn[None, :], mask=mask, other=0.0)
    w = q.to(tl.float32) * s - sz
    tl.store(w_ptr + rk[:, None] * N + rn[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


# Kernels are plain functions above and decorated with triton.jit lazily, at first use, so that
# the interpreter/compiler choice follows TRITON_INTERPRET at call time, not at import time.
_JIT: dict[bool, tuple] = {}


def _kernels():
    mode = interpret_mode()
    if mode not in _JIT:
        _JIT[mode] = (triton.jit(_qmm_kernel), triton.jit(_dequant_kernel))
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
    """What the Triton kernels read, built once from a QuantLinear's GPTQ buffers."""
    qweight: torch.Tensor              # int32 [ceil(K / vpw), N], codes of the (sorted) K rows
    scales: torch.Tensor               # fp32 [G, N]
    scaled_zeros: torch.Tensor         # fp32 [G, N], scales · zero points
    perm: torch.Tensor | None          # int64 [K]: x's columns in kernel order (act-order), else None
    g_idx: torch.Tensor | None         # int32 [K] group per sorted row; None when it is k // group_size
    bias: torch.Tensor | None          # fp32 [N]
    bits: int
    vpw: int
    in_features: int
    out_features: int
    group_size: int                    # rows per group in kernel order; > K when there is one group
    repacked: bool                     # False: qweight is the checkpoint's own tensor (2/4/8-bit, no act-order)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.scaled_zeros,
                                                          self.perm, self.g_idx, self.bias) if t is not None)


def make_layout(layer: QuantLinear) -> TritonLayout:
    q, z = unpack_layer(layer)
    g_idx = layer.g_idx.long()
    K, N = layer.in_features, layer.out_features
    q, g_idx, perm = sort_rows(q, g_idx)  # act-order: rows sorted by group once, here, not per call
    G = layer.scales.shape[0]
    gs = layer.group_size
    if G == 1:
        gs = max(K, 1) * 2  # one group: k // gs == 0 for every row, and any tile is "one group"
    regular = torch.equal(g_idx, torch.arange(K, device=g_idx.device) // gs)
    if not regular:
        log.info("%s: g_idx is not k // group_size after sorting; the Triton kernel reads g_idx per row "
                 "(slower)", layer.describe())
    if perm is None and layer.bits != 3 and layer.qweight.shape[0] * 32 // layer.bits == K:
        qw, repacked = layer.qweight.contiguous(), False  # the checkpoint layout is the kernel layout
    else:
        qw, repacked = pack_k(q, layer.bits), True
    s = layer.scales.float()
    return TritonLayout(
        qweight=qw, scales=s.contiguous(), scaled_zeros=(s * z.to(s.device).float()).contiguous(),
        perm=perm, g_idx=None if regular else g_idx.to(torch.int32).contiguous(),
        bias=layer.bias.float() if layer.bias is not None else None, bits=layer.bits,
        vpw=values_per_word(layer.bits), in_features=K, out_features=N, group_size=gs, repacked=repacked)


def _block_k(default: int, layout: TritonLayout) -> tuple[int, int]:
    """(BLOCK_K, GMODE): the largest power of two <= default that divides the group size (>= 16,
    tl.dot's minimum), so that a tile holds one group (GMODE 0); otherwise default with per-row
    groups (GMODE 1), or g_idx (GMODE 2)."""
    if layout.g_idx is not None:
        return default, 2
    bk = default
    while bk >= 16:
        if layout.group_size % bk == 0:
            return bk, 0
        bk //= 2
    return default, 1


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: a couple of "SMs" so that tiny test shapes still split K


def choose_path(M: int, K: int, N: int) -> str:
    """The kernel path for an [M, K] x [K, N] product (module thresholds, read per call)."""
    if M <= DECODE_MAX_M:
        return "decode"
    return "dequant" if M >= DEQUANT_MIN_M else "gemm"


def dequantize(layout: TritonLayout, dtype: torch.dtype) -> torch.Tensor:
    """W [K, N] in `dtype`, rows in kernel order (x's columns must be permuted by layout.perm)."""
    _, deq = _kernels()
    K, N = layout.in_features, layout.out_features
    w = torch.empty(K, N, dtype=dtype, device=layout.qweight.device)
    BK, BN = DEQUANT_TILE
    g = layout.g_idx if layout.g_idx is not None else layout.scales  # unused pointer when None
    deq[(triton.cdiv(K, BK), triton.cdiv(N, BN))](
        layout.qweight, layout.scales, layout.scaled_zeros, g, w, N, K, layout.group_size,
        BITS=layout.bits, VPW=layout.vpw, USE_GIDX=layout.g_idx is not None, BLOCK_K=BK, BLOCK_N=BN)
    return w


def matmul(layout: TritonLayout, x: torch.Tensor, path: str | None = None) -> torch.Tensor:
    """x [..., K] @ W (+ bias) -> [..., N] in x's floating dtype. `path` forces one of PATHS."""
    qmm, _ = _kernels()
    K, N = layout.in_features, layout.out_features
    shape = x.shape
    out_dtype = x.dtype if x.dtype.is_floating_point else torch.float32
    x2 = prologue(x, K, layout.perm)
    if x2.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        x2 = x2.float()
    M = x2.shape[0]
    path = path or choose_path(M, K, N)
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    interp = x2.device.type != "cuda"
    if interp and x2.dtype == torch.bfloat16 and not (path == "decode" and M == 1):
        # Triton's CPU interpreter computes bf16 tl.dot on raw bits (wrong); the M = 1 path has no
        # dot and runs bf16 as is. On CUDA every path runs bf16 natively (checked by gpu_check.py).
        x2 = x2.float()
    x2 = x2.contiguous()
    if M == 0:
        y = x2.new_zeros(0, N)
    elif path == "dequant":
        y = x2 @ dequantize(layout, x2.dtype)
    else:
        if path == "decode":
            BM, BN, bk = DECODE_TILE
            BM = 1 if M == 1 else BM
        else:
            BM, BN, bk = GEMM_TILE
        BK, gmode = _block_k(bk, layout)
        tiles_n, tiles_m, ksteps = triton.cdiv(N, BN), triton.cdiv(M, BM), triton.cdiv(K, BK)
        split = 1
        if path == "decode":  # few column tiles at batch 1: split K so that every SM has work
            split = max(1, min(ksteps, -(-PROGRAMS_PER_SM * _num_sms(x2.device) // (tiles_n * tiles_m))))
        # split-K partial sums meet in fp32 atomics; one split writes x's dtype directly
        y = (torch.zeros(M, N, dtype=torch.float32, device=x2.device) if split > 1
             else torch.empty(M, N, dtype=x2.dtype, device=x2.device))
        g = layout.g_idx if layout.g_idx is not None else layout.scales  # unused pointer unless GMODE 2
        qmm[(tiles_n, split, tiles_m)](
            x2, layout.qweight, layout.scales, layout.scaled_zeros, g, y, M, N, K, layout.group_size,
            x2.stride(0), y.stride(0), split, BITS=layout.bits, VPW=layout.vpw, GMODE=gmode, BLOCK_M=BM,
            BLOCK_N=BN, BLOCK_K=BK, ATOMIC=split > 1, FP32=x2.dtype == torch.float32,
            WIDE=WIDE_UNPACK and layout.bits != 3 and BK % layout.vpw == 0)
    if layout.bias is not None:
        y = y + layout.bias.to(y.dtype)
    return y.to(out_dtype).reshape(*shape[:-1], N)


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
        """Build the layout once (the layer keeps it as `layer.layout` and passes it back)."""
        return make_layout(layer)

    def forward(self, layer: QuantLinear, layout: TritonLayout, x: torch.Tensor) -> torch.Tensor:
        return matmul(layout, x)


register_backend("triton", TritonBackend)
