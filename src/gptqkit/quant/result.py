"""What solving one weight matrix produces; the same shape for GPTQ and round-to-nearest."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .grid import dequantize


@dataclass
class QuantResult:
    q: torch.Tensor        # [N, K] int32 codes in original column order
    scales: torch.Tensor   # [G, N] float32
    zeros: torch.Tensor    # [G, N] int32 (true zero points, not the v1 zero − 1)
    g_idx: torch.Tensor    # [K] int32: group of each input column
    loss: float            # GPTQ's objective Σ (w − q)² / [H⁻¹]_jj² / 2 (0 for RTN), see gptq.py
    damp: float            # damp_percent finally used (after automatic increases)
    method: str            # "gptq", "rtn", or "rtn-fallback" when the Hessian could not be used

    def dequantize(self) -> torch.Tensor:
        """W_q [N, K], float32 (float64 with float64 scales)."""
        dtype = torch.promote_types(self.scales.dtype, torch.float32)
        return dequantize(self.q.T, self.scales, self.zeros, self.g_idx, dtype).T
