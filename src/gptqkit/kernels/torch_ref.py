"""The reference backend: dequantize with plain torch, then matmul. Every bit width, every device.

It keeps the codes unpacked (int8, one byte per weight) after `prepare` so each call is a
gather + multiply + matmul; correctness, not speed, is its job. qlinear.py registers it (this
module does not import qlinear, so the two do not import each other).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..formats.packing import unpack_qweight, unpack_qzeros
from ..quant.grid import dequantize

if TYPE_CHECKING:
    from .qlinear import QuantLinear


def unpack_layer(layer: QuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [K, N] int32, zeros [G, N] int32) of a layer, decoding v1/v2 zero points."""
    q = unpack_qweight(layer.qweight, layer.bits)[: layer.in_features]
    z = unpack_qzeros(layer.qzeros, layer.bits, layer.out_features, layer.checkpoint_format)
    return q, z


def dequantize_layer(layer: QuantLinear, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Wᵀ [K, N] = scales[g_idx] · (q − zeros[g_idx])."""
    q, z = unpack_layer(layer)
    return dequantize(q, layer.scales, z, layer.g_idx, dtype or torch.float32)


class TorchBackend:
    name = "torch"

    def supports(self, layer: QuantLinear, device: torch.device) -> str | None:
        return None

    def prepare(self, layer: QuantLinear) -> None:
        q, z = unpack_layer(layer)
        layer._ref_q = q.to(torch.uint8)
        layer._ref_z = z.to(torch.int16)  # v1 can decode to 2^b, beyond uint8 for b = 8

    def forward(self, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype if x.dtype.is_floating_point else torch.float32
        w = dequantize(layer._ref_q, layer.scales, layer._ref_z, layer.g_idx, dtype)
        y = x.to(dtype) @ w
        if layer.bias is not None:
            y = y + layer.bias.to(dtype)
        return y
