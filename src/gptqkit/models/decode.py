"""A lean one-token decode step for llama-family models: transformers' math without its per-call
machinery.

Once the linears run on the CPU kernel, transformers' own Python is a large share of a 4-bit
SmolLM2-135M decode step: the causal-mask construction, output recording, keyword arguments
threaded through four module levels per layer. Without it the step takes 11.0 instead of 13.3 ms
(2 threads, AVX2 build; BENCHMARKS.md, "The lean decode step"). A decode step (one new token per
sequence, no padding, no gradients, a cache that hands back every key) needs none of it: it is a
short loop of ATen ops and linear calls. `enable(model)`
makes the model's forward take that loop there and fall through to transformers' forward for
everything else (prompts, padding, hooks, gradients, output_attentions, compiled graphs, ...), so
results are transformers' up to fp32 summation order (tests compare them on tiny models of each
family, float and quantized).

Architecture knowledge as data: FAMILIES lists the model types whose decoder layer is exactly

    n = input_layernorm(h);          h += o_proj(attention(rope(q_proj(n)), rope(k_proj(n)), v_proj(n)))
    m = post_attention_layernorm(h); h += down_proj(act_fn(gate_proj(m)) * up_proj(m))

with RMSNorm = w · x / rms(x) (computed in fp32), the rotary embedding `model.rotary_emb` computes
(any rope type it implements), and, where marked, an RMSNorm on each head of q and k before the
rotary (qk_norm). Linears are called through their own forward, so a QuantLinear, an nn.Linear or
an adapter wrapping either all work.
"""
from __future__ import annotations

import functools
import logging
import os
import types

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer

from .kv_cache import GrowingLayer

log = logging.getLogger(__name__)

# model_type -> has per-head q/k RMSNorm before the rotary embedding
FAMILIES: dict[str, bool] = {"llama": False, "mistral": False, "qwen2": False, "qwen3": True}

# keyword arguments a decode step may carry (generate() passes these); any other one, or a
# non-default value of the flags below, sends the call to transformers' forward
_KNOWN = frozenset({"input_ids", "attention_mask", "position_ids", "cache", "past_key_values", "use_cache",
                    "logits_to_keep", "return_dict", "cache_position", "inputs_embeds", "labels",
                    "output_attentions", "output_hidden_states"})
_CACHE_LAYERS = (DynamicLayer, GrowingLayer)  # layers whose update returns every cached key, unmasked


def _user_hooks(m: torch.nn.Module) -> bool:
    """Whether `m` has forward hooks other than the output-recording ones transformers 5 leaves
    installed after a call with output_attentions / output_hidden_states (idle unless recording,
    which a lean step never does)."""
    hooks = (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
    # (transformers spells the installer "install_output_capuring_hook"; a fixed spelling matches too)
    return not all(getattr(f, "__qualname__", "").startswith("install_output_cap") for f in hooks)


def _rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """transformers' RMSNorm: normalized in fp32, cast back, then scaled by the weight."""
    w, eps = norm.weight, norm.variance_epsilon
    if x.dtype is torch.float32 and w.dtype is torch.float32:
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    return w * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


def _rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, ±sin) with the sign of rotate_half folded into sin, for `_rope`."""
    h = sin.shape[-1] // 2
    return cos, torch.cat((-sin[..., :h], sin[..., h:]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x · cos + rotate_half(x) · sin with rotate_half(x) = [-x2, x1] (transformers' convention),
    as x · cos + roll(x, D/2) · [-sin1, sin2]: four ops instead of six, and the same products and
    sums as transformers' (moving the negation onto sin is exact), so the same bits in any dtype."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


class LeanDecode:
    """The decode step of one model; `steps` / `fallbacks` count the calls that took it or not."""

    def __init__(self, model, qk_norm: bool):
        self.model = model
        self.qk_norm = qk_norm
        cfg = model.config
        self.n_layers = cfg.num_hidden_layers
        self.window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
        self.steps = 0
        self.fallbacks = 0
        # the modules whose hooks the step would bypass (linears are called through .forward),
        # listed once: hooks on a module swapped in after enable() are not seen; call enable()
        # again after disable() to list the new ones
        self._modules = list(model.modules())
        self._cache_field = "cache"
        from transformers.modeling_outputs import CausalLMOutputWithPast
        self._out = CausalLMOutputWithPast
        if "cache" not in CausalLMOutputWithPast.__dataclass_fields__:
            self._cache_field = "past_key_values"  # transformers 4.x

    # ---- when the step applies
    def _applies(self, kwargs: dict):
        """The (input_ids, cache, position_ids) of a call the lean step computes exactly, else None."""
        if not kwargs.keys() <= _KNOWN or torch.is_grad_enabled() or self.model.training:
            return None
        cfg = self.model.config
        if (kwargs.get("inputs_embeds") is not None or kwargs.get("labels") is not None
                or kwargs.get("output_attentions", getattr(cfg, "output_attentions", False))
                or kwargs.get("output_hidden_states", getattr(cfg, "output_hidden_states", False))
                or kwargs.get("use_cache") is False or kwargs.get("return_dict") is False):
            return None
        ids = kwargs.get("input_ids")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if ids is None or cache is None or ids.dim() != 2 or ids.shape[1] != 1 or ids.device.type != "cpu":
            return None
        if torch.compiler.is_compiling() or getattr(cache, "offloading", False):
            return None
        layers = getattr(cache, "layers", None)
        if (layers is None or len(layers) != self.n_layers
                or not all(type(c) in _CACHE_LAYERS and c.is_initialized for c in layers)):
            return None
        filled = layers[0].keys.shape[-2]
        if self.window is not None and filled + 1 > self.window:
            return None  # the sliding window would cut keys off: transformers' masks do that
        mask = kwargs.get("attention_mask")
        if mask is not None and (mask.dim() != 2 or mask.shape[1] != filled + 1 or not bool(mask.all())):
            return None  # padding: transformers' masks
        if (torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks
                or any((m._forward_hooks or m._forward_pre_hooks) and _user_hooks(m) for m in self._modules)):
            return None  # hooks see the modules they were registered on run
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = torch.full((ids.shape[0], 1), filled, dtype=torch.long)
        return ids, cache, pos

    # ---- the step
    def step(self, ids: torch.Tensor, cache, pos: torch.Tensor):
        inner = self.model.model
        h = inner.embed_tokens(ids)                                     # [B, 1, hidden]
        cos, sin = inner.rotary_emb(h, pos)                             # [B, 1, D]
        cos, sin = _rope_tables(cos.unsqueeze(1), sin.unsqueeze(1))     # [B, 1, 1, D]: heads broadcast
        B = ids.shape[0]
        for i, layer in enumerate(inner.layers[:self.n_layers]):
            a = layer.self_attn
            D = a.head_dim
            n = _rms_norm(h, layer.input_layernorm)
            q = a.q_proj.forward(n).view(B, 1, -1, D)
            k = a.k_proj.forward(n).view(B, 1, -1, D)
            v = a.v_proj.forward(n).view(B, 1, -1, D).transpose(1, 2)
            if self.qk_norm:
                q, k = _rms_norm(q, a.q_norm), _rms_norm(k, a.k_norm)
            q = _rope(q.transpose(1, 2), cos, sin)                      # [B, H, 1, D]
            k = _rope(k.transpose(1, 2), cos, sin)
            keys, values = cache.layers[i].update(k, v)
            # one query per sequence sees every cached key: the causal mask is all ones here
            o = F.scaled_dot_product_attention(q, keys, values, scale=a.scaling,
                                               enable_gqa=q.shape[1] != keys.shape[1])
            h = h + a.o_proj.forward(o.transpose(1, 2).reshape(B, 1, -1))
            mlp = layer.mlp
            m = _rms_norm(h, layer.post_attention_layernorm)
            h = h + mlp.down_proj.forward(mlp.act_fn(mlp.gate_proj.forward(m)) * mlp.up_proj.forward(m))
        h = _rms_norm(h, inner.norm)
        logits = self.model.get_output_embeddings().forward(h)
        return self._out(logits=logits, **{self._cache_field: cache})


def _supported(model) -> str | None:
    """Why the lean step cannot serve `model` (None: it can)."""
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt not in FAMILIES:
        return f"model type {mt!r} is not one of {sorted(FAMILIES)}"
    inner = getattr(model, "model", None)
    need = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or not all(hasattr(inner, n) for n in need):
        return f"no model.{{{','.join(need)}}}"
    for layer in inner.layers:
        a, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if a is None or mlp is None or not all(hasattr(a, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                       "head_dim", "scaling")):
            return "a decoder layer without self_attn.{q,k,v,o}_proj"
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return "a decoder layer without mlp.{gate,up,down}_proj"
        norms = [layer.input_layernorm, layer.post_attention_layernorm]
        norms += [a.q_norm, a.k_norm] if FAMILIES[mt] else []
        if not all(type(n).__name__.endswith("RMSNorm") and hasattr(n, "variance_epsilon") for n in norms):
            return "a norm that is not transformers' RMSNorm"
    if model.get_output_embeddings() is None:
        return "no output embeddings"
    if any(p.device.type != "cpu" for p in model.parameters()):
        return "parameters off the CPU"
    return None


def enable(model) -> LeanDecode | None:
    """Route `model`'s one-token decode steps through the lean step (instance-level; other models
    and every other call are untouched). Returns the LeanDecode (its `steps` / `fallbacks` count
    calls), or None where the model is not a supported family (logged at debug level) or
    GPTQKIT_LEAN_DECODE=0."""
    if os.environ.get("GPTQKIT_LEAN_DECODE", "1") == "0":
        return None
    why = _supported(model)
    if why is not None:
        log.debug("lean decode step not used: %s", why)
        return None
    if isinstance(getattr(model, "_gptqkit_lean", None), LeanDecode):
        return model._gptqkit_lean
    lean = LeanDecode(model, FAMILIES[model.config.model_type])
    original = type(model).forward

    @functools.wraps(original)  # generate() reads forward's signature (through __wrapped__)
    def forward(self, *args, **kwargs):
        lean = self.__dict__.get("_gptqkit_lean")
        if lean is not None:
            if not args:
                call = kwargs
            else:  # forward(input_ids, ...) positionally
                call = dict(kwargs, input_ids=args[0]) if len(args) == 1 and "input_ids" not in kwargs else None
            got = lean._applies(call) if call is not None else None
            if got is not None:
                lean.steps += 1
                return lean.step(*got)
            lean.fallbacks += 1
        return original(self, *args, **kwargs)

    # bound to the instance (a deep copy rebinds it to the copy, with the copy's LeanDecode)
    model.forward = types.MethodType(forward, model)
    model._gptqkit_lean = lean
    return lean


def disable(model) -> None:
    """Undo `enable`."""
    if isinstance(getattr(model, "_gptqkit_lean", None), LeanDecode):
        del model.forward
        del model._gptqkit_lean
