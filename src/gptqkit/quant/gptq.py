"""The GPTQ solver for one weight matrix (Frantar et al., 2022), in the reference's shape, and
its asymmetric-calibration variant GPTAQ (Li et al., ICML 2025) through the same code.

Given W [N, K] and the Hessian H = 2·XᵀX/n of the layer's inputs X [n, K], quantize the columns
of W one at a time, each time spreading the rounding error over the columns not yet quantized
through the inverse Hessian's Cholesky factor. Columns are processed in blocks with lazy
updates of the rest of W (same result as the unblocked algorithm, far fewer memory passes).

Differences from the reference, each for correctness:
- group parameters are computed from the weights as already updated by every earlier column
  (the reference reads stale weights when a group starts inside a block);
- when the Cholesky factorization fails, damping grows by `damp_auto_increment` (logged) and,
  past 1.0, the layer falls back to round-to-nearest (logged) rather than crashing.

GPTAQ minimizes ||W·X̃ − Q·X||² instead of ||W·X − Q·X||², X̃ being the layer's inputs in the
full-precision model and X those in the partially quantized one. With the cross term
dXXᵀ = 2/n·Σ (x̃ − x)·xᵀ (accumulated next to H, same scaling: Hessian(cross=True)) and U the
upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU), the paper's closed form (neuron decomposition +
Cholesky reformulation) adds, when column i is quantized, w_i·P[i, i+1:] to the columns not yet
quantized, with

    P = α · triu₁(dXXᵀ · Uᵀ) · U        (strictly upper triangular; α = 0.25 as in the reference)

w_i being column i's value just before it is quantized (after every earlier compensation).
The reference (Intelligent-Computing-Lab-Yale/GPTAQ fake_quant/gptaq_utils.py, GPTQModel
quantization/gptaq.py) uses that value inside a block of columns but, in the lazy update of the
later blocks, multiplies P by the block's columns after their own update, i.e. by the quantized
values, so its result depends on the blocksize. Here the lazy update uses the same pre-quantization
values as the column loop, so blocked and unblocked solves agree for every blocksize.
"""
from __future__ import annotations

import logging
import math
import os

import torch

from .grid import dequantize, find_params, quantize
from .result import QuantResult
from .rtn import group_index, rtn_solve

log = logging.getLogger(__name__)


def native_bf16_cpu() -> bool:
    """True where this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX), on which
    oneDNN's bf16 GEMM runs at 4-5x the fp32 rate; elsewhere bf16 GEMMs are emulated and slower
    than fp32."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # torch without the probes: assume not
        return False


def _bf16_shortcut(dtype: torch.dtype, device: torch.device | str) -> bool:
    """GPTAQ's bf16 shortcuts apply: float32 work on a CPU with native bf16, not switched off."""
    return (dtype == torch.float32 and torch.device(device).type == "cpu"
            and os.environ.get("GPTQKIT_GPTAQ_BF16", "1") != "0" and native_bf16_cpu())


def cross_product_dtype(dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype of GPTAQ's cross-term product Σ (x̃ − x)·xᵀ: bf16 on a CPU with native bf16 dot
    products when the accumulator is float32, else the accumulator's own dtype.

    Why bf16 is enough there: the term is a correction, applied with strength α = 0.25, and its
    operands' rounding (2⁻⁹ relative, the difference formed in float32 first) is far below the
    asymmetry it measures; perplexity across calibration draws is unchanged (BENCHMARKS, GPTAQ).
    It is GPTAQ's largest extra cost after the float forward (a full K×K product per input, where
    H needs its upper triangle only). float64 accumulators (exact comparisons) stay float64;
    GPTQKIT_GPTAQ_BF16=0 keeps float32 everywhere."""
    return torch.bfloat16 if _bf16_shortcut(dtype, device) else dtype


# The float stream may compute in bf16 only where its own rounding is small next to the signal
# GPTAQ reads from it, x̃ − x: on SmolLM2 with 4-bit weights bf16 moves x̃ by 2-4 % of ||x̃ − x||
# per block, with 8-bit weights by 40-74 % (the quantized model is then almost the float one;
# benchmarks/gptaq_float_noise.py).
FLOAT_BF16_MAX_BITS = 4


def float_forward_dtype(dtype: torch.dtype, device: torch.device | str, bits: int) -> torch.dtype | None:
    """The autocast dtype for GPTAQ's float block forward (None: the model's own dtype).

    bf16 on a CPU with native bf16 when the model computes in float32 and no linear of the block
    gets more than FLOAT_BF16_MAX_BITS bits: the float forward is GPTAQ's largest extra cost (a
    second block forward), and bf16 GEMMs run it ~1.7x faster. The quantized stream, whose inputs
    build the Hessian itself, stays in the model's dtype. GPTQKIT_GPTAQ_BF16=0 keeps float32."""
    return torch.bfloat16 if bits <= FLOAT_BF16_MAX_BITS and _bf16_shortcut(dtype, device) else None


class Hessian:
    """Streaming H = 2/n · Σ x xᵀ over the rows x of every batch (masked rows left out).

    cross=True also accumulates GPTAQ's dXXt = 2/n · Σ (x̃ − x) xᵀ (dXXt[a, b] = 2/n · Σ (x̃_a − x_a)·x_b),
    x̃ being the same token's input in the full-precision model; same rows, same scaling as H.

    H is symmetric, so only its upper block triangle is accumulated (PANELS row panels, panel i:
    x_iᵀ·x[:, i:]); the part below the diagonal blocks is mirrored from above when H is read."""

    def __init__(self, columns: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 cross: bool = False, cross_dtype: torch.dtype | None = None):
        self._H = torch.zeros(columns, columns, device=device, dtype=dtype)
        self._mirrored = True
        self.dXXt = torch.zeros(columns, columns, device=device, dtype=dtype) if cross else None
        # the dtype the cross term's product is computed in (its sum stays in `dtype`)
        self.cross_dtype = cross_product_dtype(dtype, device) if cross_dtype is None else cross_dtype
        self.n = 0

    # Rows per addmm_: the masked/converted copy of x is made one row block at a time, so the
    # transient is at most ROWS·K elements (a 64×512-token MLP input converted at once is ~200 MB).
    ROWS = 4096
    # XᵀX is the largest cost of quantization after the forward. BLAS has a symmetric rank-k update
    # (syrk, half the flops) that torch does not expose; 8 panels of the upper triangle do 9/16 of the
    # full product's flops and ran in 0.57-0.64x its time on SmolLM2's K = 576 and 1536 at 1 and 2
    # threads (the mirror, done once when H is read, is a K² copy).
    PANELS = 8

    @property
    def H(self) -> torch.Tensor:
        if not self._mirrored:
            for a, b in self._panels():  # the blocks below the diagonal blocks, mirrored from above
                self._H[b:, a:b] = self._H[a:b, b:].T
            self._mirrored = True
        return self._H

    @H.setter
    def H(self, value: torch.Tensor) -> None:  # a complete, symmetric H (the ranks' sum, distributed)
        self._H, self._mirrored = value, True

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None, x_float: torch.Tensor | None = None) -> None:
        """x: [..., K] inputs of the layer; mask: [...] booleans, True for real (non-pad) tokens.
        x_float (cross=True only, and then required): the full-precision model's inputs of the
        very same tokens, in the same order (x's shape)."""
        if (x_float is None) != (self.dXXt is None):
            raise ValueError("x_float is needed exactly when the accumulator has a cross term (cross=True)")
        if x_float is not None:
            if x_float.shape != x.shape:
                raise ValueError(f"float inputs {tuple(x_float.shape)} are not paired with the inputs "
                                 f"{tuple(x.shape)} token for token")
            x_float = x_float.reshape(-1, x_float.shape[-1])
        x = x.reshape(-1, x.shape[-1])
        if mask is not None:
            # HF attention masks are 0/1 integers: indexing with those would gather rows 0 and
            # 1 instead of selecting, so always convert to booleans first
            mask = mask.reshape(-1).to(device=x.device, dtype=torch.bool)
        m = x.shape[0] if mask is None else int(mask.sum())
        if m == 0:
            return
        # H_new = (n·H + 2·xᵀx) / (n + m), computed without forming large intermediates
        self._H.mul_(self.n / (self.n + m))
        if self.dXXt is not None:
            self.dXXt.mul_(self.n / (self.n + m))
        self.n += m
        self._mirrored = False
        for s in range(0, x.shape[0], self.ROWS):
            xb = x[s:s + self.ROWS]
            if mask is not None:
                xb = xb[mask[s:s + self.ROWS]]
            xb = xb.to(device=self._H.device, dtype=self._H.dtype)
            self._add_upper(xb, 2.0 / self.n)
            if x_float is not None:
                # the difference first, in the accumulator's dtype: x̃ ≈ x, so forming Σ x̃xᵀ − H
                # instead would cancel most of float32's digits
                fb = x_float[s:s + self.ROWS]
                if mask is not None:
                    fb = fb[mask[s:s + self.ROWS]]
                db = fb.to(device=self._H.device, dtype=self._H.dtype) - xb  # never in place: fb may be the caller's
                if self.cross_dtype == self.dXXt.dtype:
                    self.dXXt.addmm_(db.T, xb, alpha=2.0 / self.n)
                else:  # bf16 operands, fp32 accumulation inside the GEMM; each block's product rounded once
                    cd = self.cross_dtype
                    self.dXXt.add_(torch.mm(db.T.to(cd), xb.to(cd)), alpha=2.0 / self.n)

    def finite(self) -> bool:
        """False when an input held NaN/Inf (or overflowed the accumulator): it shows on the
        diagonal, Σ x_a², which a K-element check reads instead of every input element."""
        ok = bool(torch.isfinite(self._H.diagonal()).all())
        return ok and (self.dXXt is None or bool(torch.isfinite(self.dXXt.diagonal()).all()))

    def _panels(self) -> list[tuple[int, int]]:
        K = self._H.shape[0]
        cut = [K * p // self.PANELS for p in range(self.PANELS + 1)]
        return [(a, b) for a, b in zip(cut, cut[1:]) if b > a]

    def _add_upper(self, xb: torch.Tensor, alpha: float) -> None:
        """H += alpha·xbᵀxb on and above the diagonal blocks of the panels."""
        for a, b in self._panels():
            self._H[a:b, a:].addmm_(xb[:, a:b].T, xb[:, a:], alpha=alpha)


def _inverse_cholesky(H: torch.Tensor, damp_percent: float, damp_auto_increment: float
                      ) -> tuple[torch.Tensor | None, float]:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = damp·mean(diag H), raising damp until it works."""
    mean_diag = torch.mean(torch.diag(H))
    damp = damp_percent
    # the damped copy and the factors are formed one at a time, each freed when the next exists:
    # a K×K float32 matrix is 9 MiB at K = 1536 and these are the solve's largest buffers
    # (the same values as H + λ·I: only the diagonal changes)
    while True:
        Hd = H.clone()
        Hd.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if info == 0 and torch.isfinite(U).all():
                return U, damp
        if damp >= 1.0 or damp_auto_increment <= 0:  # no increase possible: give up, not loop
            return None, damp
        new = min(1.0, damp + damp_auto_increment)
        log.info("Cholesky failed at damp_percent=%.4f; retrying with %.4f", damp, new)
        damp = new


# False: always run the column loop in torch (tests compare the two; fp64 and CUDA always do)
COLUMN_KERNEL = True


def _columns(W1: torch.Tensor, i0: int, i1: int, Hinv1: torch.Tensor, S: torch.Tensor, Z: torch.Tensor,
             gcol: torch.Tensor, maxq: int, Q1: torch.Tensor, Err1: torch.Tensor,
             P1: torch.Tensor | None, Wpre1: torch.Tensor | None) -> None:
    """Columns i0..i1-1 of a block: quantize column i on grid (S, Z)[gcol[i - i0]], keep its code
    in Q1 and its scaled error in Err1, spread the error over the block's later columns. The
    C++ loop (kernels/cpu.py::gptq_columns, same bits on fp32 CPU tensors) where it applies, else
    this torch loop, which is the reference."""
    if COLUMN_KERNEL and W1.dtype is torch.float32 and W1.device.type == "cpu":
        from ..kernels.cpu import gptq_columns
        if gptq_columns(W1, i0, i1, Hinv1, S, Z, gcol, maxq, Q1, Err1, P1, Wpre1):
            return
    for i in range(i0, i1):
        grp = int(gcol[i - i0])
        scale, zero = S[grp], Z[grp]
        # the hot loop: few, fused ops per column (Python dispatch dominates small layers)
        w = W1[:, i]
        q = quantize(w, scale, zero, maxq)
        Q1[:, i] = q
        err = Err1[:, i]
        torch.sub(w, dequantize(q, scale, zero), out=err)
        err.div_(Hinv1[i, i])
        if P1 is not None:  # before w (a view) is overwritten by its own update
            Wpre1[:, i] = w
            W1[:, i + 1:].addr_(Wpre1[:, i], P1[i, i + 1:])
        W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)


SOLVE_ORDERS = ("columns", "groups")


def solve_permutation(diag: torch.Tensor, group_size: int, solve_order: str = "columns") -> torch.Tensor:
    """Act-order's column order: perm[j] = the original column solved j-th.

    "columns": by decreasing diag(H) (the reference's act-order; ties in torch's order).
    "groups": static group k holds columns k·g .. k·g+g−1; the groups by decreasing Σ diag(H) over
    their columns, the columns inside each group by decreasing diag(H) (ties: lower index first),
    so each group is one contiguous run of the order. (GPTQModel's GAR, "group aware reordering",
    is the same shape but ranks the groups by their largest diagonal entry.)"""
    if solve_order == "columns":
        return torch.argsort(diag, descending=True)
    if solve_order != "groups":
        raise ValueError(f"solve_order={solve_order!r} is unknown; choose one of {SOLVE_ORDERS}")
    K = diag.shape[0]
    grp = torch.arange(K, device=diag.device) // group_size
    sums = torch.zeros(int(grp[-1]) + 1 if K else 0, dtype=diag.dtype, device=diag.device).index_add_(0, grp, diag)
    rank = torch.empty(sums.shape[0], dtype=torch.long, device=diag.device)
    rank[torch.argsort(sums, descending=True, stable=True)] = torch.arange(sums.shape[0], device=diag.device)
    cols = torch.argsort(diag, descending=True, stable=True)      # columns by diag, then
    return cols[torch.argsort(rank[grp[cols]], stable=True)]      # grouped, groups by rank


def gptq_solve(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int = -1, sym: bool = True,
               desc_act: bool = False, static_groups: bool = False, damp_percent: float = 0.01,
               damp_auto_increment: float = 0.0025, mse: bool | str = False, blocksize: int = 128,
               zero_min: int = 0, dXXt: torch.Tensor | None = None, alpha: float = 0.25,
               solve_order: str = "columns") -> QuantResult:
    """Quantize W [N, K] given H [K, K]. Computes in W's dtype if float32/float64, else float32.

    mse: search each group's clipping range (True: weighted by the layer error, see below;
    "norm": the reference's unweighted search).
    dXXt [K, K] (GPTAQ): the cross term 2/n·Σ (x̃ − x)·xᵀ, scaled like H; the solve then also
    compensates the asymmetry between the float model's inputs and the quantized ones, with
    strength alpha (module docstring). None: plain GPTQ, exactly.
    solve_order (act-order with static groups only): "columns" (the default) solves single columns
    by decreasing diag(H), interleaving the groups; "groups" solves each static group as one
    contiguous run, the groups by decreasing sum of their columns' diag(H), the columns inside a
    group by decreasing diag(H) (solve_permutation). Grids, g_idx and the checkpoint layout are
    the same either way; only the order of the error compensation changes."""
    if solve_order not in SOLVE_ORDERS:
        raise ValueError(f"solve_order={solve_order!r} is unknown; choose one of {SOLVE_ORDERS}")
    if solve_order == "groups" and not (desc_act and static_groups):
        raise ValueError("solve_order='groups' orders the static groups of act-order: it needs desc_act=True "
                         f"and static_groups=True (got desc_act={desc_act}, static_groups={static_groups})")
    dtype = W.dtype if W.dtype in (torch.float32, torch.float64) else torch.float32
    W = W.to(dtype).clone()
    H = H.to(dtype).clone()
    N, K = W.shape
    maxq = (1 << bits) - 1
    g = K if group_size == -1 else group_size

    if not (torch.isfinite(W).all() and torch.isfinite(H).all()):
        from ..errors import NumericalError
        raise NumericalError("weights or Hessian contain NaN/Inf")

    # Columns no input ever reached carry no information: fix them to zero, keep H invertible.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    D = None
    if dXXt is not None:
        D = dXXt.to(dtype).clone()
        if not torch.isfinite(D).all():
            from ..errors import NumericalError
            raise NumericalError("the GPTAQ cross term contains NaN/Inf")
        D[:, dead] = 0  # (as the reference) no input reached those columns: nothing to pair

    W0 = W  # original column order, for static groups
    perm = None
    if desc_act:  # quantize the columns with the largest Hessian diagonal first
        perm = solve_permutation(torch.diag(H), g, solve_order)
        W = W[:, perm]
        H = H[perm][:, perm]
        if D is not None:  # both ways, like H: rows and columns index input channels
            D = D[perm][:, perm]

    Hinv, damp = _inverse_cholesky(H, damp_percent, damp_auto_increment)
    if Hinv is None:
        log.warning("Hessian stays singular even at damp_percent=1.0; falling back to round-to-nearest")
        r = rtn_solve(W0, bits, group_size, sym, bool(mse), zero_min)
        r.method, r.damp = "rtn-fallback", damp
        return r
    # GPTAQ: P[i, j] = α·Σ_{k>i} (D·Uᵀ)[i, k]·U[k, j], nonzero only for j > i
    P = None if D is None else (D @ Hinv.T).triu_(1).matmul(Hinv).mul_(alpha)
    del D

    # The clip search (mse) scores each candidate range by the layer error its rounding costs:
    # a rounding error e in column k costs e²/U_kk² once the later columns compensate for it (U =
    # Hinv, the Cholesky factor of H⁻¹: the solver's own loss), so the search weighs the columns
    # by 1/U_kk², in the solve's column order.
    # That beats the reference's unweighted |w − ŵ|^2.4 ("norm", kept for comparison) on every
    # layer measured (benchmarks/layer_error.py).
    wsearch = None
    if mse and mse != "norm":
        wsearch = torch.diag(Hinv).square().reciprocal()
    static = None
    if static_groups:  # groups fixed up front, in original column order
        wo = wsearch if wsearch is None or perm is None else wsearch[torch.argsort(perm)]
        static = [find_params(W0[:, c:c + g], bits, sym, bool(mse), zero_min,
                              weight=None if wo is None else wo[c:c + g]) for c in range(0, K, g)]

    Q = torch.zeros(N, K, dtype=dtype, device=W.device)
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    ngroups = math.ceil(K / g)
    scales = torch.zeros(ngroups, N, dtype=dtype, device=W.device)
    zeros = torch.zeros(ngroups, N, dtype=dtype, device=W.device)
    scale = zero = None
    if static is not None:  # every column's grid is known up front: a block is one run of columns
        S_static = torch.stack([s for s, _ in static])
        Z_static = torch.stack([z for _, z in static])
        col_group = (perm if perm is not None else torch.arange(K, device=W.device)) // g
    one_group = torch.zeros(K, dtype=torch.int32)

    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        P1 = Wpre1 = None
        if P is not None:
            P1 = P[i1:i2, i1:i2]
            Wpre1 = torch.zeros_like(W1)  # [GPTAQ] each column's value just before it is quantized
        i = 0
        while i < i2 - i1:  # runs of columns on one set of grids
            col = i1 + i
            if static is not None:
                end, S_run, Z_run, gcol = i2 - i1, S_static, Z_static, col_group[i1:i2]
            else:
                if col % g == 0:
                    # current values of this group's columns: in-block ones from W1, later ones
                    # from W plus the updates still pending from this block
                    gend = min(col + g, K)
                    cur = W1[:, i:]
                    if gend > i2:
                        pending = W[:, i2:gend] - Err1[:, :i] @ Hinv[i1:col, i2:gend]
                        if P is not None:
                            pending += Wpre1[:, :i] @ P[i1:col, i2:gend]
                        cur = torch.cat([cur, pending], dim=1)
                    else:
                        cur = cur[:, :gend - col]
                    scale, zero = find_params(cur, bits, sym, bool(mse), zero_min,
                                              weight=None if wsearch is None else wsearch[col:col + cur.shape[1]])
                    scales[col // g], zeros[col // g] = scale, zero
                end = min(i2 - i1, i + g - col % g)
                S_run, Z_run, gcol = scale[None], zero[None], one_group[i:end]
            _columns(W1, i, end, Hinv1, S_run, Z_run, gcol, maxq, Q[:, i1:i2], Err1, P1, Wpre1)
            i = end
        # (w − ŵ)²/d² summed over the block's columns = Σ err², the reference's loss
        loss += Err1.pow(2).sum() / 2
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        if P is not None:
            W[:, i2:].addmm_(Wpre1, P[i1:i2, i2:])

    if static is not None:
        scales, zeros = S_static, Z_static
        g_idx = group_index(K, group_size)
    elif perm is not None:
        g_idx = (torch.argsort(perm) // g).to(torch.int32)  # group of column c = its position // g
    else:
        g_idx = group_index(K, group_size)
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]

    return QuantResult(q=Q.to(torch.int32), scales=scales.float(), zeros=zeros.to(torch.int32),
                       g_idx=g_idx.to(torch.int32).to(W.device), loss=float(loss), damp=damp,
                       method="gptq" if P is None else "gptaq")
