"""QuantLinear: a Linear layer whose weight is stored in the standard GPTQ tensors.

The buffers are the checkpoint's (`qweight`, `qzeros`, `scales`, `g_idx`, `bias`), so loading and
`save_pretrained` are plain state-dict operations. After the buffers are filled, `post_init()`
asks the chosen backend to `prepare` a layout: a typed object (`CpuLayout`, `TritonLayout`,
`TorchLayout`) holding what that backend computes from (the on-disk layout never changes), kept
in `layer.layout` and passed back to the backend's `forward`.

Codes held once: a layout whose `codes()` gives back every integer weight (the CPU backend's
repacked copy does) makes the checkpoint `qweight` redundant, so the layer drops that buffer
after `prepare` and rebuilds it, bit for bit, whenever it is read: `layer.qweight`,
`state_dict()` (hence `save_pretrained`), or a move to a device whose backend needs it.

Backends live in `kernels/<name>.py` and register here. The act-order permutation and the
forward prologue/epilogue every fused backend needs are defined here once.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Protocol

import torch
from torch import nn

from ..errors import BackendError
from ..formats.packing import SUPPORTED_BITS, pack_qweight
from .torch_ref import TorchBackend, dequantize_layer

log = logging.getLogger(__name__)


class Layout(Protocol):
    """What a backend's `prepare` returns. Optional: `codes() -> int32 [K, N]`, the integer weights
    in checkpoint row order, for layouts that hold all of them (then the layer drops `qweight`)."""


class Backend(Protocol):
    name: str

    def supports(self, layer: "QuantLinear", device: torch.device) -> str | None:
        """None if this backend can run `layer` on `device`, else the reason it cannot."""

    def prepare(self, layer: "QuantLinear") -> Layout:
        """Build this backend's layout from the GPTQ buffers (once, after loading)."""

    def forward(self, layer: "QuantLinear", layout: Layout, x: torch.Tensor) -> torch.Tensor:
        """y = x @ Wᵀ (+ bias) for x [..., K]."""


# ---- act-order and the forward prologue, shared by the fused backends (cpu, triton) ----------

def group_order(g_idx: torch.Tensor) -> torch.Tensor | None:
    """The row permutation that makes every group a contiguous run of K (act-order checkpoints,
    where g_idx is not sorted), or None when g_idx is already sorted (then no call pays for it)."""
    g = g_idx.long()
    if g.numel() < 2 or bool((g[1:] >= g[:-1]).all()):
        return None
    return torch.argsort(g, stable=True)


def sort_rows(q: torch.Tensor, g_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(codes [K, N], their groups [K], perm) in group order: rows permuted once at prepare time so
    kernels see contiguous groups; `prologue` applies the same permutation to x's columns."""
    perm = group_order(g_idx)
    g = g_idx.long()
    if perm is None:
        return q, g, None
    return q[perm], g[perm], perm


def unsort_rows(q: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """Inverse of `sort_rows` on the codes."""
    if perm is None:
        return q
    out = torch.empty_like(q)
    out[perm] = q
    return out


def prologue(x: torch.Tensor, K: int, perm: torch.Tensor | None) -> torch.Tensor:
    """x [..., K] -> [M, K] with its columns in the layout's row order."""
    x2 = x.reshape(-1, K)
    return x2.index_select(1, perm) if perm is not None else x2


def epilogue(y: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """fp32 y [M, N] -> x's float dtype and leading shape, bias added in fp32."""
    if bias is not None:
        y += bias
    out_dtype = x.dtype if x.dtype.is_floating_point else torch.float32
    return y.to(out_dtype).reshape(*x.shape[:-1], y.shape[-1])


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
    codes_in_layout = False  # (class default: read by the qweight property during __init__)

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
        # set by post_init: the backend, the layout it prepared, and for what
        self.requested_backend: str | None = None
        self.backend: Backend | None = None
        self.layout: Any = None
        self.prepared_on: torch.device | None = None
        # the torch reference, prepared on first use, for inputs that need gradients (PEFT/LoRA)
        self.grad_backend: Backend | None = None
        self.grad_layout: Any = None
        self.grad_prepared_on: torch.device | None = None
        # True while `layout` holds the only copy of the codes and the qweight buffer is dropped
        self.codes_in_layout = False
        # rows of input from which the cpu backend rounds x to int8 (4-bit layers; None: the backend's
        # default, GPTQKIT_CPU_I8_MIN_M; 0: never). Set by gptqkit.load(int8_activations=...) and
        # kernels.cpu.set_int8_activations; read at prepare, so it outlives a move or reload.
        self.int8_from: int | None = None

    # ---- qweight: a buffer, or rebuilt from the layout when the layout holds the codes --------
    # The buffer keeps its slot in _buffers (set to None while dropped), so state_dict order,
    # .to() and named_buffers() behave as for any buffer; this property gives readers the tensor.
    @property
    def qweight(self) -> torch.Tensor:
        t = self._buffers.get("qweight")
        if t is not None:
            return t
        if self.codes_in_layout:
            return self._rebuild_qweight()
        raise AttributeError("qweight")

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "qweight" and self.codes_in_layout:
            # new codes while the layout holds the old ones: the buffer becomes the source of truth
            # again, and the layout is prepared afresh on the next forward
            self._restore_qweight(value)
            return
        super().__setattr__(name, value)

    def _rebuild_qweight(self) -> torch.Tensor:
        q = self.layout.codes()
        return pack_qweight(q, self.bits).to(self.scales.device)

    def _restore_qweight(self, value: torch.Tensor | None = None) -> None:
        if self.codes_in_layout and value is None:
            value = self._rebuild_qweight()
        self._buffers["qweight"] = value
        self.codes_in_layout = False
        self.backend = self.layout = self.prepared_on = None
        self.grad_backend = self.grad_layout = self.grad_prepared_on = None

    def _qweight_roundtrips(self) -> bool:
        """Whether packing the codes gives back this exact qweight: true when every bit of every
        word is a code (K·b/32 rows), which the loader's shape check guarantees."""
        t = self._buffers.get("qweight")
        return t is not None and t.dim() == 2 and t.shape[0] * 32 == self.in_features * self.bits \
            and t.shape[1] == self.out_features

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not self.codes_in_layout:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        self._buffers["qweight"] = self._rebuild_qweight()  # same slot: same key order
        try:
            super()._save_to_state_dict(destination, prefix, keep_vars)
        finally:
            self._buffers["qweight"] = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        if self.codes_in_layout and prefix + "qweight" in state_dict:  # overwritten just below
            self._restore_qweight(torch.empty(self.in_features * self.bits // 32, self.out_features,
                                              dtype=torch.int32, device=self.scales.device))
        elif any(prefix + k in state_dict for k in ("qweight", "qzeros", "scales", "g_idx", "bias")):
            # new tensors: the layouts were built from the old ones, prepare again on the next call
            self.backend = self.layout = self.prepared_on = None
            self.grad_backend = self.grad_layout = self.grad_prepared_on = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

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
        """Pick a backend for the current device and let it prepare its layout; drop `qweight`
        when the layout holds every code (it is rebuilt exactly whenever it is read)."""
        if self.codes_in_layout:
            self._restore_qweight()  # on the device the buffers are on now
        device = self.scales.device
        self.requested_backend = backend
        self.backend = choose_backend(self, device, backend)
        self.layout = None  # the old layout's memory is free before the new one is built
        self.layout = self.backend.prepare(self)
        self.prepared_on = device
        if callable(getattr(self.layout, "codes", None)) and self._qweight_roundtrips():
            self._buffers["qweight"] = None
            self.codes_in_layout = True

    def _apply(self, fn, recurse=True):
        # .to(device) / .cuda() / .cpu(): a layout belongs to the device it was prepared for, so a
        # move makes the next forward prepare again (there, not on every call, is the device check)
        out = super()._apply(fn, recurse)
        if self.prepared_on is not None and self.scales.device != self.prepared_on:
            self.backend = None
        if self.grad_prepared_on is not None and self.scales.device != self.grad_prepared_on:
            self.grad_backend = None
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = self.backend
        if backend is None:  # new, reloaded or moved
            self.post_init(self.requested_backend)
            backend = self.backend
        if x.requires_grad and backend.name != "torch" and torch.is_grad_enabled():
            # training adapters on top (PEFT/LoRA): gradients must flow to x; the packed weights are
            # buffers and stay frozen. Fused kernels have no backward, the torch reference does.
            if self.grad_backend is None:
                self.grad_backend = _REGISTRY["torch"]()
                self.grad_layout = self.grad_backend.prepare(self)
                self.grad_prepared_on = self.scales.device
            return self.grad_backend.forward(self, self.grad_layout, x)
        return backend.forward(self, self.layout, x)

    def extra_repr(self) -> str:
        be = self.backend.name if self.backend else "unprepared"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, backend={be}")
