"""Architecture knowledge, kept as data.

The pipeline needs three facts about a model: where its list of decoder blocks lives, which
module turns the last block's output into the lm_head's input (the final norm), and which
linears inside a block must stay in full precision (MoE routers). Which linears a block has,
and in what order they run, is found at run time by hooking every nn.Linear, so most
architectures need no entry at all: the generic fallback finds the repeated block list.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from torch import nn

log = logging.getLogger(__name__)

# Linears that route tokens or gate experts are tiny and precision-critical: never quantized.
DEFAULT_SKIP = (r"(^|\.)(router|gate)$", r"shared_expert_gate$", r"(^|\.)mlp\.gate$")


@dataclass(frozen=True)
class ArchSpec:
    blocks: str                       # dotted path of the nn.ModuleList of decoder blocks
    final_norm: str | None = None     # dotted path of the norm before lm_head
    skip: tuple[str, ...] = DEFAULT_SKIP  # regexes on names inside a block: keep full precision
    notes: str = ""


_LLAMA = ArchSpec("model.layers", "model.norm")

# model_type -> spec. Families that share Llama's layout share its entry.
ARCHS: dict[str, ArchSpec] = {
    **{t: _LLAMA for t in (
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo",
        "olmo2", "cohere", "mixtral", "qwen2_moe", "qwen3_moe", "starcoder2", "granite",
        "deepseek_v2", "deepseek_v3", "internlm2", "stablelm")},
    "phi": ArchSpec("model.layers", "model.final_layernorm"),
    "opt": ArchSpec("model.decoder.layers", "model.decoder.final_layer_norm"),
    "gpt2": ArchSpec("transformer.h", "transformer.ln_f"),
    "gpt_bigcode": ArchSpec("transformer.h", "transformer.ln_f"),
    "gptj": ArchSpec("transformer.h", "transformer.ln_f"),
    "gpt_neox": ArchSpec("gpt_neox.layers", "gpt_neox.final_layer_norm"),
    "falcon": ArchSpec("transformer.h", "transformer.ln_f"),
    "bloom": ArchSpec("transformer.h", "transformer.ln_f"),
}


def get_module(root: nn.Module, path: str | None) -> nn.Module | None:
    if not path:
        return None
    m = root
    for part in path.split("."):
        m = getattr(m, part, None)
        if m is None:
            return None
    return m


def discover(model: nn.Module) -> ArchSpec:
    """Generic fallback: the largest nn.ModuleList of identical blocks that hold linears."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            kinds = {type(b) for b in mod}
            has_linear = any(isinstance(m, nn.Linear) for m in mod[0].modules())
            if len(kinds) == 1 and has_linear and (best is None or len(mod) > len(best[1])):
                best = (name, mod)
    if best is None:
        raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}: no repeated "
                         "nn.ModuleList of blocks with linear layers")
    blocks_path = best[0]
    # the final norm: a norm-like module outside the blocks, registered after them
    final = None
    for name, mod in model.named_modules():
        if name.startswith(blocks_path) or not name:
            continue
        if re.search(r"norm|ln_f", type(mod).__name__.lower() + " " + name.split(".")[-1].lower()):
            final = name
    spec = ArchSpec(blocks_path, final, notes="discovered")
    log.info("architecture %s is not in the registry; discovered %d blocks at %r, final norm %r",
             type(model).__name__, len(best[1]), blocks_path, final)
    return spec


def spec_for(model: nn.Module) -> ArchSpec:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = ARCHS.get(model_type)
    if spec is not None and isinstance(get_module(model, spec.blocks), nn.ModuleList):
        return spec
    return discover(model)


def is_skipped(name_in_block: str, spec: ArchSpec) -> bool:
    return any(re.search(rx, name_in_block) for rx in spec.skip)


def block_linears(block: nn.Module, spec: ArchSpec) -> dict[str, nn.Linear]:
    """The quantizable linears of a block, by name inside the block."""
    return {n: m for n, m in block.named_modules()
            if isinstance(m, nn.Linear) and not is_skipped(n, spec)}
