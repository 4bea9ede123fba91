"""A KV cache whose append costs O(new tokens): preallocated buffers, attention sees views.

transformers' `DynamicCache` appends with `torch.cat([keys, new], dim=-2)` per layer per step,
which copies the whole cache every decode step (on SmolLM2-135M 4-bit, `aten::cat` was 31 % of
decode self time; BENCHMARKS.md). `GrowingCache` is a `DynamicCache` whose full-attention layers
(`GrowingLayer`) write new keys/values into a preallocated buffer [B, H, capacity, D] and hand
attention the view [B, H, filled, D]. When a step would overflow, the buffer grows to at least
twice its size (rounded up to `STEP` tokens), so growth copies O(total) over a whole generation.
`generate()` knows the final length, so `gptqkit.load`'s models size the buffer once for it.

Everything else is DynamicCache's: sliding-window / linear-attention layers keep their own
classes; `crop` keeps the buffer (the next write overwrites the cropped tokens); operations that
replace `keys`/`values` with new tensors (beam search's reorder, batch select/repeat, offloading)
are noticed on the next `update`, which adopts the new tensors into a fresh buffer. Inputs that
need gradients take DynamicCache's `cat` path (a buffer written in place has no place in autograd).

The views share memory with the buffer: a view returned by an earlier `update` still shows the
tokens it was given (later writes go past its end), unless the cache was cropped in between.
"""
from __future__ import annotations

import logging
import types

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

log = logging.getLogger(__name__)

STEP = 256  # capacity is a multiple of this many tokens


def _round_up(n: int) -> int:
    return -(-n // STEP) * STEP


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer over a preallocated buffer (see the module docstring).

    `capacity`: tokens to allocate at the first update (at least what that update brings), e.g.
    prompt + max_new_tokens; None allocates what the first update needs, rounded up to STEP."""

    def __init__(self, capacity: int | None = None, **kwargs):
        super().__init__()
        self.capacity_hint = capacity
        self._kbuf: torch.Tensor | None = None
        self._vbuf: torch.Tensor | None = None
        self._handed: tuple | None = None  # the (keys, values) views handed out last

    @property
    def capacity(self) -> int:
        return 0 if self._kbuf is None else self._kbuf.shape[-2]

    def _owns_views(self) -> bool:
        """Whether keys/values are still the views of our buffers handed out last (not replaced by
        crop, reorder_cache, batch_select_indices, offloading ...)."""
        k, v, kb, vb = self.keys, self.values, self._kbuf, self._vbuf
        if kb is None or k is None or v is None:
            return False
        if k.data_ptr() != kb.data_ptr() or v.data_ptr() != vb.data_ptr():
            return False
        if kb.is_inference() and not torch.is_inference_mode_enabled():
            return False  # filled under inference_mode, continued outside: in-place writes are refused
        # same storage start: a view of the buffer's first tokens (as handed out, or cropped) iff
        # the strides are the buffer's and the leading shapes match
        return (k.stride() == kb.stride() and v.stride() == vb.stride()
                and k.shape[:2] == kb.shape[:2] and k.shape[-1] == kb.shape[-1]
                and v.shape[:2] == vb.shape[:2] and v.shape[-1] == vb.shape[-1]
                and k.shape[-2] == v.shape[-2] and k.dtype == kb.dtype and k.device == kb.device)

    def _allocate(self, like_k: torch.Tensor, like_v: torch.Tensor, capacity: int) -> None:
        B, Hk, _, Dk = like_k.shape
        Hv, Dv = like_v.shape[1], like_v.shape[-1]
        self._kbuf = torch.empty(B, Hk, capacity, Dk, dtype=like_k.dtype, device=like_k.device)
        self._vbuf = torch.empty(B, Hv, capacity, Dv, dtype=like_v.dtype, device=like_v.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.requires_grad or value_states.requires_grad:
            # autograd: DynamicCache's cat (and drop the buffer, whose views are no longer handed out)
            self._kbuf = self._vbuf = self._handed = None
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        h = self._handed
        # the views handed out last, still in place (the common case: one check by identity), or
        # an equivalent view (after a crop, say)
        if ((h is not None and self.keys is h[0] and self.values is h[1]
             and (torch.is_inference_mode_enabled() or not h[0].is_inference())) or self._owns_views()):
            old_k, old_v, filled = None, None, self.keys.shape[-2]
        else:  # first update, or keys/values replaced by someone else: adopt them
            filled = self.get_seq_length()
            old_k, old_v = (self.keys, self.values) if filled else (None, None)
            self._kbuf = self._vbuf = None
        need = filled + n
        if self._kbuf is None or need > self.capacity:
            if self._kbuf is None and (self.capacity_hint or 0) >= need:
                cap = self.capacity_hint  # the caller knows the final length: no rounding, no growth
            else:
                cap = _round_up(max(need, 2 * self.capacity))
            if self._kbuf is not None and old_k is None:  # grow: carry the filled part over
                old_k, old_v = self._kbuf[..., :filled, :], self._vbuf[..., :filled, :]
            self._allocate(key_states, value_states, cap)
            if old_k is not None:
                self._kbuf[..., :filled, :].copy_(old_k)
                self._vbuf[..., :filled, :].copy_(old_v)
        self._kbuf[..., filled:need, :].copy_(key_states)
        self._vbuf[..., filled:need, :].copy_(value_states)
        self.keys = self._kbuf[..., :need, :]
        self.values = self._vbuf[..., :need, :]
        self._handed = (self.keys, self.values)
        return self.keys, self.values

    def reset(self) -> None:
        self._kbuf = self._vbuf = self._handed = None
        super().reset()


class GrowingCache(DynamicCache):
    """`DynamicCache` with `GrowingLayer` for every full-attention layer (other layer kinds, e.g.
    sliding windows, keep DynamicCache's classes). `capacity`: tokens each layer allocates at its
    first update, e.g. prompt length + max_new_tokens (None: what the first update needs; the
    buffers grow by doubling either way). Usable wherever a DynamicCache is:
    `model.generate(..., cache=GrowingCache(config=model.config, capacity=n))` or a model forward's
    `cache=` (`past_key_values=` in older transformers)."""

    def __init__(self, config=None, capacity: int | None = None, **kwargs):
        super().__init__(config=config, **kwargs)
        self.capacity = capacity
        if self.layer_class_to_replicate is DynamicLayer:  # no config: layers are made lazily
            self.layer_class_to_replicate = self._new_layer
        self.layers = [self._convert(layer) if type(layer) is DynamicLayer else layer for layer in self.layers]

    def _convert(self, layer: DynamicLayer) -> GrowingLayer:
        new = GrowingLayer(self.capacity)
        if layer.is_initialized:  # filled from ddp_cache_data: adopted into a buffer on the next update
            new.keys, new.values, new.device, new.is_initialized = layer.keys, layer.values, layer.device, True
        return new

    def _new_layer(self) -> GrowingLayer:
        return GrowingLayer(self.capacity)


def _prepare_cache_growing(self, *args, **kwargs):
    """`generate`'s cache set-up, with a GrowingCache sized to the generation's length where
    transformers would make a plain DynamicCache (no cache given, no cache_implementation)."""
    names = ("generation_config", "model_kwargs", "generation_mode", "batch_size", "max_cache_length")
    bound = dict(zip(names, args)) | kwargs
    model_kwargs = bound.get("model_kwargs")
    given = isinstance(model_kwargs, dict) and (model_kwargs.get("cache") is not None
                                                or model_kwargs.get("past_key_values") is not None)
    type(self)._prepare_cache_for_generation(self, *args, **kwargs)
    if given or not isinstance(model_kwargs, dict):
        return  # the caller's cache is used as given
    try:
        cache = model_kwargs.get("cache")
        if type(cache) is DynamicCache and not cache.offloading and \
                not any(layer.is_initialized for layer in cache.layers):
            model_kwargs["cache"] = GrowingCache(config=self.config.get_text_config(decoder=True),
                                                 capacity=int(bound["max_cache_length"]))
    except Exception as e:  # noqa: BLE001  a transformers change here costs speed, never the generation
        log.debug("GrowingCache not installed for this generate() call: %s", e)


def use_growing_cache(model) -> None:
    """Make `model.generate()` use a GrowingCache (sized to prompt + max_new_tokens) wherever it
    would make a DynamicCache; a cache the caller passes, `use_cache=False` and
    `cache_implementation=...` are left as they are. Instance-level: other models are untouched."""
    if hasattr(type(model), "_prepare_cache_for_generation"):
        model._prepare_cache_for_generation = types.MethodType(_prepare_cache_growing, model)
