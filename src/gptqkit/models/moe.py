"""Fused mixture-of-experts weights, unfused into one nn.Linear per expert projection.

transformers 5.x stores the experts of Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3, OLMoE, PhiMoE …
as 3-D parameters of one module (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I], marked
by the ``use_experts_implementation`` decorator, which also records the layout:
``has_gate``, ``is_concatenated``, ``is_transposed``, ``has_bias``). GPTQ works on 2-D
matrices and needs each expert's *own* calibration tokens, so before a block is quantized
its fused experts module is replaced by :class:`UnfusedExperts`: a ModuleList of experts,
each with ``gate_proj`` / ``up_proj`` / ``down_proj`` nn.Linear (the per-expert names that
vLLM, GPTQModel and the original Qwen-MoE/DeepSeek checkpoints use), and a forward that
routes each expert only the tokens the router sent to it. The pipeline's hooks therefore see
exactly the routed tokens, and the loader builds the same structure with QuantLinear.

A fused layout this module does not understand (post-expert norms, unknown parameter names)
is reported with a warning and its parameters stay in full precision: never silently.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

_FUSED_NAMES = {"gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj_bias"}


class _Expert(nn.Module):
    def __init__(self, H: int, I: int, has_gate: bool, bias: bool, device, dtype):
        super().__init__()
        if has_gate:
            self.gate_proj = nn.Linear(H, I, bias=bias, device=device, dtype=dtype)
        self.up_proj = nn.Linear(H, I, bias=bias, device=device, dtype=dtype)
        self.down_proj = nn.Linear(I, H, bias=bias, device=device, dtype=dtype)


class UnfusedExperts(nn.ModuleList):
    """Drop-in replacement of a fused experts module: same call signature
    ``(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``.
    A ModuleList of experts, so the names are ``…experts.{e}.gate_proj`` as in the checkpoints."""

    def __init__(self, fused: nn.Module, H: int, I: int, E: int, device, dtype):
        super().__init__(_Expert(H, I, bool(getattr(fused, "has_gate", True)), bool(getattr(fused, "has_bias", False)),
                                 device, dtype) for _ in range(fused_count(fused)))
        assert len(self) == E
        self.num_experts, self.hidden_dim, self.intermediate_dim = E, H, I
        self.has_gate = bool(getattr(fused, "has_gate", True))
        self.is_concatenated = bool(getattr(fused, "is_concatenated", True))
        self.has_bias = bool(getattr(fused, "has_bias", False))
        # the original module (its 3-D parameters removed) supplies act_fn and _apply_gate, so
        # custom gates (clamped SwiGLU of gpt-oss, …) keep working; not registered as a child
        object.__setattr__(self, "_fused", fused)

    def _gate(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        f = self._fused
        if type(f)._apply_gate.__name__ == "_default_apply_gate":
            return f.act_fn(g) * u
        if self.is_concatenated:
            gu = torch.cat([g, u], dim=-1)
        else:
            gu = torch.stack([g, u], dim=-1).flatten(-2)  # interleaved g0 u0 g1 u1 …
        return f._apply_gate(gu)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            hit = torch.nn.functional.one_hot(top_k_index.clamp(max=self.num_experts),
                                              num_classes=self.num_experts + 1).sum(dim=(0, 1))
        for e in torch.nonzero(hit[: self.num_experts]).flatten().tolist():
            tok, pos = torch.where(top_k_index == e)
            x = hidden_states[tok]     # one tensor object: gate_proj and up_proj share its Hessian
            ex = self[e]
            if self.has_gate:
                h = self._gate(ex.gate_proj(x), ex.up_proj(x))
            else:
                h = self._fused.act_fn(ex.up_proj(x))
            y = ex.down_proj(h) * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out


def fused_count(m: nn.Module) -> int:
    return next(p.shape[0] for n, p in m._parameters.items() if p is not None and p.dim() == 3)


def _is_fused_experts(m: nn.Module) -> bool:
    """Any module holding 3-D parameters (other than convolutions) is taken for fused experts:
    either it is unfused, or it is reported as left in full precision."""
    if isinstance(m, nn.modules.conv._ConvNd):
        return False
    return any(p is not None and p.dim() == 3 for p in getattr(m, "_parameters", {}).values())


def _unfuse_one(m: nn.Module) -> UnfusedExperts | str:
    """An UnfusedExperts holding `m`'s weights, or the reason `m`'s layout is not understood."""
    P = m._parameters
    names3 = sorted(n for n, p in P.items() if p is not None and p.dim() == 3)
    if not hasattr(m, "has_gate"):
        return f"not declared with transformers' use_experts_implementation (3-D parameters {names3})"
    if getattr(m, "has_post_expert_norm", False):
        return "experts apply a norm after down_proj, which has no per-expert Linear equivalent"
    has_gate, tr = bool(m.has_gate), bool(getattr(m, "is_transposed", False))
    up_name = "gate_up_proj" if has_gate else "up_proj"
    if up_name not in P or "down_proj" not in P or set(P) - _FUSED_NAMES:
        return f"unexpected parameters {sorted(P)}"
    up, down = P[up_name], P["down_proj"]
    if tr:  # stored [E, in, out]
        up, down = up.transpose(1, 2), down.transpose(1, 2)
    E, H = up.shape[0], up.shape[2]
    I = up.shape[1] // 2 if has_gate else up.shape[1]
    if tuple(down.shape) != (E, H, I):
        return f"shapes {tuple(up.shape)} / {tuple(down.shape)} do not form experts"
    new = UnfusedExperts(m, H, I, E, up.device, up.dtype)
    if up.device.type != "meta":
        ub = P.get(f"{up_name}_bias")
        db = P.get("down_proj_bias")
        with torch.no_grad():
            for e, ex in enumerate(new):
                w = up[e]
                if has_gate:
                    g, u = (w[:I], w[I:]) if new.is_concatenated else (w[0::2], w[1::2])
                    ex.gate_proj.weight.copy_(g)
                    ex.up_proj.weight.copy_(u)
                    if ub is not None:
                        gb, bb = (ub[e, :I], ub[e, I:]) if new.is_concatenated else (ub[e, 0::2], ub[e, 1::2])
                        ex.gate_proj.bias.copy_(gb)
                        ex.up_proj.bias.copy_(bb)
                else:
                    ex.up_proj.weight.copy_(w)
                    if ub is not None:
                        ex.up_proj.bias.copy_(ub[e])
                ex.down_proj.weight.copy_(down[e])
                if db is not None:
                    ex.down_proj.bias.copy_(db[e])
    for n in list(P):  # the fused copies are gone: no double memory, no stale weights
        del P[n]
    return new


def unfuse_experts(root: nn.Module, prefix: str = "") -> list[str]:
    """Replace every fused experts module under `root` by an UnfusedExperts, in place.

    Returns the full names of the fused parameters that were removed (so a writer does not
    copy them). Weights on the meta device give meta Linears (for the loader).
    """
    removed: list[str] = []
    for name, m in list(root.named_modules()):
        if not _is_fused_experts(m):
            continue
        full = f"{prefix}.{name}" if prefix and name else (prefix or name)
        pnames = [f"{full}.{n}" for n, p in m._parameters.items() if p is not None]
        new = _unfuse_one(m)
        if isinstance(new, str):
            log.warning("%s: fused experts (%s) are NOT quantized: %s; they stay in full precision",
                        full, type(m).__name__, new)
            continue
        parent, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, child, new)
        removed += pnames
        log.info("%s: unfused %d experts of %s into per-expert gate_proj/up_proj/down_proj Linears",
                 full, new.num_experts, type(m).__name__)
    return removed


def has_fused_experts(root: nn.Module) -> bool:
    return any(_is_fused_experts(m) for m in root.modules())
