"""The reference backend: dequantize with plain torch, then matmul. Every bit width, every device.

Its layout keeps the codes unpacked (one byte per weight) so each call is a gather + multiply +
matmul; correctness, not speed, is its job.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from typing import TYPE_CHECKING

from ..formats.packing import unpack_qweight, unpack_qzeros
from ..quant.grid import dequantize

if TYPE_CHECKING:  # qlinear imports this module and registers the backend; no import back
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


@dataclass
class TorchLayout:
    q: torch.Tensor  # uint8 [K, N] codes
    z: torch.Tensor  # int16 [G, N] zero points (v1 can decode to 2^b, beyond uint8 for b = 8)


class TorchBackend:
    name = "torch"

    def supports(self, layer: QuantLinear, device: torch.device) -> str | None:
        return None

    def prepare(self, layer: QuantLinear) -> TorchLayout:
        q, z = unpack_layer(layer)
        return TorchLayout(q=q.to(torch.uint8), z=z.to(torch.int16))

    def forward(self, layer: QuantLinear, layout: TorchLayout, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype if x.dtype.is_floating_point else torch.float32
        w = dequantize(layout.q, layer.scales, layout.z, layer.g_idx, dtype)
        y = x.to(dtype) @ w
        if layer.bias is not None:
            y = y + layer.bias.to(dtype)
        return y

