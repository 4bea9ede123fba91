"""Round-to-nearest on the same grid as GPTQ: the baseline every quality table starts from."""
from __future__ import annotations

import torch

from .grid import find_params, quantize
from .result import QuantResult


def group_index(columns: int, group_size: int) -> torch.Tensor:
    """g_idx in original order: column c belongs to group c // g (the last group may be ragged)."""
    g = columns if group_size == -1 else group_size
    return (torch.arange(columns) // g).to(torch.int32)


def rtn_solve(W: torch.Tensor, bits: int, group_size: int = -1, sym: bool = True,
              mse: bool = False, zero_min: int = 0) -> QuantResult:
    """Quantize W [N, K] group by group to the nearest grid point."""
    W = W.float() if W.dtype in (torch.float16, torch.bfloat16) else W
    N, K = W.shape
    maxq = (1 << bits) - 1
    g = K if group_size == -1 else group_size
    q = torch.empty(N, K, dtype=torch.int32, device=W.device)
    scales, zeros = [], []
    for c in range(0, K, g):
        s, z = find_params(W[:, c:c + g], bits, sym, mse, zero_min)
        q[:, c:c + g] = quantize(W[:, c:c + g], s[:, None], z[:, None], maxq).to(torch.int32)
        scales.append(s)
        zeros.append(z)
    return QuantResult(q=q, scales=torch.stack(scales).float(), zeros=torch.stack(zeros).to(torch.int32),
                       g_idx=group_index(K, group_size).to(W.device), loss=0.0, damp=0.0, method="rtn")
