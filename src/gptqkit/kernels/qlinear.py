"""QuantLinear: a Linear layer whose weight is stored in the standard GPTQ tensors.

The buffers are exactly the checkpoint's (`qweight`, `qzeros`, `scales`, `g_idx`, `bias`), so
loading and `save_pretrained` are plain state-dict operations. After the buffers are filled,
`post_init()` asks the chosen backend to build whatever derived layout it computes from
(the on-disk layout never changes). Backends live in `kernels/<name>.py` and register here.
"""
from __future__ import annotations

import logging
from typing import Callable, Protocol

import torch
from torch import nn

from ..errors import BackendError
from ..formats.packing import SUPPORTED_BITS
from .torch_ref import TorchBackend, dequantize_layer

log = logging.getLogger(__name__)


class Backend(Protocol):
    name: str

    def supports(self, layer: "QuantLinear", device: torch.device) -> str | None:
        """None if this backend can run `layer` on `device`, else the reason it cannot."""

    def prepare(self, layer: "QuantLinear") -> None:
        """Build derived buffers/attributes from the GPTQ buffers (once, after loading)."""

    def forward(self, layer: "QuantLinear", x: torch.Tensor) -> torch.Tensor:
        """y = x @ Wᵀ (+ bias) for x [..., K]."""


# name -> factory; order = preference when choosing automatically
_REGISTRY: dict[str, Callable[[], Backend]] = {}


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
    _REGISTRY[name] = factory


register_backend("torch", TorchBackend)  # the reference: every layer, every device; the fallback


def _import_builtin_backends() -> None:
    for mod in ("cpu", "triton"):
        try:
            __import__(f"{__package__}.{mod}")
        except ImportError as e:  # optional backends: logged, never fatal
            log.debug("backend module %s unavailable: %s", mod, e)


def choose_backend(layer: "QuantLinear", device: torch.device, requested: str | None = None) -> Backend:
    """The requested backend (error if it cannot run this layer), else the first that can."""
    _import_builtin_backends()
    if requested not in (None, "auto"):
        if requested not in _REGISTRY:
            raise BackendError(f"unknown backend {requested!r}; available: {sorted(_REGISTRY)}")
        be = _REGISTRY[requested]()
        why = be.supports(layer, device)
        if why:
            raise BackendError(f"backend {requested!r} cannot run {layer.describe()} on {device}: {why}")
        return be
    reasons = []
    for name, factory in _REGISTRY.items():
        if name == "torch":
            continue
        be = factory()
        why = be.supports(layer, device)
        if why is None:
            log.debug("%s on %s uses the %s backend%s", layer.describe(), device, name,
                      f" (skipped {'; '.join(reasons)})" if reasons else "")
            return be
        reasons.append(f"{name}: {why}")
    if reasons:
        log.debug("%s on %s uses the torch backend (%s)", layer.describe(), device, "; ".join(reasons))
    return _REGISTRY["torch"]()


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 bias: bool = False, checkpoint_format: str = "gptq", dtype: torch.dtype = torch.float16):
        super().__init__()
        if bits not in SUPPORTED_BITS:
            raise BackendError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
        self.in_features, self.out_features = in_features, out_features
        self.bits = bits
        self.group_size = group_size if group_size != -1 else in_features
        self.checkpoint_format = checkpoint_format
        K, N = in_features, out_features
        G = -(-K // self.group_size)
        self.register_buffer("qweight", torch.zeros(K * bits // 32, N, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(G, -(-N * bits // 32) if bits != 3 else -(-N // 32) * 3,
                                                   dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(G, N, dtype=torch.float16))
        self.register_buffer("g_idx", (torch.arange(K) // self.group_size).to(torch.int32))
        self.register_buffer("bias", torch.zeros(N, dtype=torch.float16) if bias else None)
        self.compute_dtype = dtype
        self.backend: Backend | None = None

    # AutoGPTQ's spelling; PEFT reads these to size LoRA adapters on a QuantLinear
    @property
    def infeatures(self) -> int:
        return self.in_features

    @property
    def outfeatures(self) -> int:
        return self.out_features

    def describe(self) -> str:
        return f"QuantLinear(K={self.in_features}, N={self.out_features}, bits={self.bits}, g={self.group_size})"

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized weight [N, K] (for inspection and tools that read .weight; not a parameter)."""
        return dequantize_layer(self).T.contiguous()

    def post_init(self, backend: str | None = None) -> None:
        """Pick a backend for the current device and let it prepare its layout."""
        self.requested_backend = backend
        self.backend = choose_backend(self, self.qweight.device, backend)
        self.backend.prepare(self)
        self._prepared_on = self.qweight.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend is None or self._prepared_on != self.qweight.device:  # new or moved
            self.post_init(getattr(self, "requested_backend", None))
        if x.requires_grad and torch.is_grad_enabled() and self.backend.name != "torch":
            # training adapters on top (PEFT/LoRA): gradients must flow to x; the packed weights are
            # buffers and stay frozen. Fused kernels have no backward, the torch reference does.
            if getattr(self, "_grad_backend", None) is None or self._grad_prepared_on != self.qweight.device:
                self._grad_backend = _REGISTRY["torch"]()
                self._grad_backend.prepare(self)
                self._grad_prepared_on = self.qweight.device
            return self._grad_backend.forward(self, x)
        return self.backend.forward(self, x)

    def extra_repr(self) -> str:
        be = self.backend.name if self.backend else "unprepared"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, backend={be}")
