"""Shared helpers for the kernel tests: random GPTQ layers built with rtn_solve + the packers."""
from __future__ import annotations

import pytest
import torch

from gptqkit.formats.packing import pack_qweight, pack_qzeros
from gptqkit.kernels.qlinear import QuantLinear
from gptqkit.quant.rtn import rtn_solve


def build_layer(K: int, N: int, bits: int, group_size: int, sym: bool = True, fmt: str = "gptq",
                act_order: bool = False, bias: bool = False, seed: int = 0) -> QuantLinear:
    """A QuantLinear holding a random weight quantized with RTN, in checkpoint format `fmt`.

    With act_order the columns are quantized in a random order: q and the groups are computed on
    W[:, perm] and scattered back, so g_idx[c] = invperm[c] // g (not monotonic)."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=gen)
    perm = torch.randperm(K, generator=gen) if act_order else torch.arange(K)
    zero_min = 1 if (fmt == "gptq" and not sym) else 0
    r = rtn_solve(W[:, perm], bits, group_size, sym=sym, zero_min=zero_min)
    q = torch.empty_like(r.q)
    q[:, perm] = r.q
    g_idx = torch.empty(K, dtype=torch.int32)
    g_idx[perm] = r.g_idx.to(torch.int32)  # g_idx[c] = invperm[c] // g
    layer = QuantLinear(K, N, bits, group_size, bias=bias, checkpoint_format=fmt)
    layer.qweight.copy_(pack_qweight(q.T.contiguous(), bits))
    layer.qzeros.copy_(pack_qzeros(r.zeros, bits, fmt))
    layer.scales.copy_(r.scales.half())
    layer.g_idx.copy_(g_idx)
    if bias:
        layer.bias.copy_(torch.randn(N, generator=gen).half())
    return layer


def reference_pair(layer: QuantLinear, backend: str) -> tuple[QuantLinear, QuantLinear]:
    """(layer prepared with `backend`, a copy prepared with the torch reference backend)."""
    ref = QuantLinear(layer.in_features, layer.out_features, layer.bits,
                      layer.group_size if layer.group_size != layer.in_features else -1,
                      bias=layer.bias is not None, checkpoint_format=layer.checkpoint_format)
    ref.load_state_dict(layer.state_dict())
    ref = ref.to(layer.qweight.device)
    layer.post_init(backend)
    ref.post_init("torch")
    return layer, ref


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture
def make_layer():
    return build_layer


@pytest.fixture
def make_pair():
    return reference_pair


@pytest.fixture
def relerr():
    return rel_err
