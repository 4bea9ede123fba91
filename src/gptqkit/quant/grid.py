"""The quantization grid of one group: scale and zero point per output row, and rounding.

Conventions match the GPTQ reference (IST-DASLab/gptq quant.py): q = clamp(round(w/s) + z, 0,
maxq), w ≈ s·(q − z). Symmetric grids put z at 2^(b−1) exactly (what Marlin-style kernels
assume); asymmetric grids take z = round(−min/s).
"""
from __future__ import annotations

import torch

# find_params runs its clip search in C++ (kernels/cpu.py::clip_search) where it can; False
# forces the torch loop below, the reference (tests and benchmarks compare the two)
CPU_KERNEL = True


def find_params(w: torch.Tensor, bits: int, sym: bool, mse: bool = False, zero_min: int = 0,
                norm: float = 2.4, grid: int = 100, maxshrink: float = 0.8, weight: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each row of `w` [rows, cols] -> (scale [rows], zero [rows]).

    zero is returned as a float tensor of whole numbers. `zero_min=1` keeps asymmetric zero
    points ≥ 1 (the v1 checkpoint format cannot store 0). `mse` searches shrunken ranges for
    the one with least |w − ŵ|^norm (the reference's clip search); with `weight` [cols], the one
    with least Σ_k weight_k·(w − ŵ)², the layer error of each column's rounding when the columns
    are independent (weight = diag H) or as GPTQ pays it (weight = 1/[H⁻¹]_kk).
    """
    if mse and CPU_KERNEL:
        # the loop below costs ~15 small torch ops per candidate, 80 candidates per group: the
        # C++ kernel does the same arithmetic in one call (fp32 CPU groups; None elsewhere)
        from ..kernels.cpu import clip_search
        found = clip_search(w, bits, sym, zero_min, norm, grid, maxshrink, weight)
        if found is not None:
            return found
    maxq = (1 << bits) - 1
    zero_t = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    xmin = torch.minimum(w.min(dim=1).values, zero_t)
    xmax = torch.maximum(w.max(dim=1).values, zero_t)

    def params(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if sym:
            hi = torch.maximum(lo.abs(), hi)
            lo = -hi
        dead = (lo == 0) & (hi == 0)
        lo = torch.where(dead, -torch.ones_like(lo), lo)
        hi = torch.where(dead, torch.ones_like(hi), hi)
        # Round the scale to float16 here, as it will be stored, so the solver compensates
        # for the grid the checkpoint really holds. Clamp to fp16's smallest normal number.
        scale = ((hi - lo) / maxq).clamp(min=2.0 ** -14).half().to(w.dtype)
        if sym:
            zero = torch.full_like(scale, (maxq + 1) / 2)
        else:
            zero = torch.round(-lo / scale).clamp(zero_min, maxq)
        return scale, zero

    scale, zero = params(xmin, xmax)
    if mse:
        best = torch.full_like(scale, float("inf"))
        for i in range(int(maxshrink * grid)):
            p = 1 - i / grid
            s1, z1 = params(p * xmin, p * xmax)
            err = (dequantize(quantize(w, s1[:, None], z1[:, None], maxq), s1[:, None], z1[:, None]) - w)
            err = err.abs().pow(norm).sum(dim=1) if weight is None else (err.square() * weight).sum(dim=1)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s1, scale)
            zero = torch.where(better, z1, zero)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes (as floats) of w on the grid (scale, zero), broadcast as given."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """w = scale·(q − zero): the one definition of the grid, for the solver, QuantResult and the
    kernels' reference alike.

    Without g_idx the arguments broadcast as given. With g_idx [K], q is [K, N] (input-major, as
    stored) and scale/zero are per group [G, N]: row k takes group g_idx[k]. dtype: compute in it
    (else as the arguments promote).
    """
    if g_idx is not None:
        g = g_idx.long()
        scale, zero = scale[g], zero[g]
    if dtype is not None:
        scale, q, zero = scale.to(dtype), q.to(dtype), zero.to(dtype)
    return scale * (q - zero)
