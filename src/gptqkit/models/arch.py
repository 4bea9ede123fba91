"""Architecture knowledge, kept as data.

The pipeline needs a few facts about a model, and every one of them is data in an ArchSpec:

- ``blocks``: where the nn.ModuleList of decoder blocks lives;
- ``outside``: the modules outside the blocks (embeddings, final norm, lm_head …), loaded
  before the blocks and written in full precision;
- ``final_norm``: the module that turns the last block's output into the lm_head's input
  (only needed to quantize the lm_head);
- ``skip``: regexes on names inside a block for linears that must stay in full precision
  (MoE routers and gates); embeddings and norms are never nn.Linear, so never quantized.

What a spec does NOT list is the sequential groups of linears inside a block (q/k/v → o →
gate/up → down). The pipeline discovers them at run time: it hooks every quantizable linear
of the block, and a linear is solved the moment its input is complete, in the order the
block's own forward uses them, with linears fed the same tensor sharing one Hessian. So a
block with unusual wiring (parallel attention/MLP as in GPT-J/Falcon/Phi/Cohere, MLA as in
DeepSeek, routed experts) needs no entry for its order. The same goes for the block's inputs
(rotary embeddings, ALiBi, per-layer sliding/global masks, position ids): the pipeline
records what each block received in a normal forward and replays it.

A model_type the registry does not list goes through :func:`discover`, which finds the
largest list of identical blocks holding linears and the final norm after it, and logs what
it found. Most decoder-only models therefore need no entry at all; entries exist to make the
known ones explicit and checked (see the Architectures table in README.md).

Structural rewrites that quantization needs are done here too, generically:
GPT-2's ``Conv1D`` (a Linear with a transposed weight) becomes an nn.Linear, and fused 3-D
MoE expert weights are unfused into per-expert Linears (see :mod:`gptqkit.models.moe`).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

# Linears that route tokens or gate experts are tiny and precision-critical: never quantized.
DEFAULT_SKIP = (r"(^|\.)(router|gate)$", r"shared_expert_gate$", r"(^|\.)mlp\.gate$")


@dataclass(frozen=True)
class ArchSpec:
    blocks: str                       # dotted path of the nn.ModuleList of decoder blocks
    final_norm: str | None = None     # dotted path of the norm before lm_head
    skip: tuple[str, ...] = DEFAULT_SKIP  # regexes on names inside a block: keep full precision
    outside: tuple[str, ...] = ()     # modules outside the blocks (documentation + checks)
    moe: bool = False                 # has routed experts (unfused per expert when fused)
    hf_class: str = ""                # transformers class, for the table
    notes: str = ""


def _spec(blocks: str, final_norm: str, outside: tuple[str, ...], hf_class: str, moe: bool = False,
          notes: str = "") -> ArchSpec:
    return ArchSpec(blocks, final_norm, DEFAULT_SKIP, outside, moe, hf_class, notes)


_LL_OUT = ("model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head")


def _llama_like(hf_class: str, moe: bool = False, notes: str = "") -> ArchSpec:
    return _spec("model.layers", "model.norm", _LL_OUT, hf_class, moe, notes)


_GPT_OUT = ("transformer.wte", "transformer.ln_f", "lm_head")

# model_type -> spec
ARCHS: dict[str, ArchSpec] = {
    "llama": _llama_like("LlamaForCausalLM"),
    "mistral": _llama_like("MistralForCausalLM", notes="sliding-window attention"),
    "mixtral": _llama_like("MixtralForCausalLM", moe=True, notes="fused experts unfused per expert; router kept"),
    "qwen2": _llama_like("Qwen2ForCausalLM", notes="q/k/v bias"),
    "qwen2_moe": _llama_like("Qwen2MoeForCausalLM", moe=True,
                             notes="routed + shared expert; router and shared_expert_gate kept"),
    "qwen3": _llama_like("Qwen3ForCausalLM", notes="q/k norms"),
    "qwen3_moe": _llama_like("Qwen3MoeForCausalLM", moe=True),
    "gemma": _llama_like("GemmaForCausalLM", notes="scaled embeddings, tied lm_head"),
    "gemma2": _llama_like("Gemma2ForCausalLM",
                          notes="sliding/global layers get different masks: per-block inputs replayed"),
    "gemma3_text": _llama_like("Gemma3ForCausalLM",
                               notes="per-layer-type masks and rotary embeddings: per-block inputs replayed"),
    "phi3": _llama_like("Phi3ForCausalLM", notes="fused qkv_proj and gate_up_proj"),
    "olmo": _llama_like("OlmoForCausalLM", notes="non-parametric layer norm"),
    "olmo2": _llama_like("Olmo2ForCausalLM"),
    "cohere": _llama_like("CohereForCausalLM", notes="parallel attention + MLP"),
    "starcoder2": _llama_like("Starcoder2ForCausalLM", notes="c_fc/c_proj MLP with bias"),
    "granite": _llama_like("GraniteForCausalLM"),
    "stablelm": _llama_like("StableLmForCausalLM"),
    "deepseek_v2": _llama_like("DeepseekV2ForCausalLM", moe=True, notes="MLA attention, shared experts"),
    "deepseek_v3": _llama_like("DeepseekV3ForCausalLM", moe=True, notes="MLA attention, shared experts"),
    "olmoe": _llama_like("OlmoeForCausalLM", moe=True),
    "phimoe": _llama_like("PhimoeForCausalLM", moe=True, notes="router is an nn.Linear (kept)"),
    "granitemoe": _llama_like("GraniteMoeForCausalLM", moe=True),
    "cohere2": _llama_like("Cohere2ForCausalLM", notes="sliding/global layers, parallel attention + MLP"),
    "glm": _llama_like("GlmForCausalLM", notes="fused gate_up_proj"),
    "glm4": _llama_like("Glm4ForCausalLM", notes="fused gate_up_proj, extra post-norms"),
    "smollm3": _llama_like("SmolLM3ForCausalLM", notes="some layers without rotary (NoPE)"),
    "helium": _llama_like("HeliumForCausalLM"),
    "ministral": _llama_like("MinistralForCausalLM", notes="sliding window"),
    "exaone4": _llama_like("Exaone4ForCausalLM", notes="sliding/global layers, q/k norms"),
    "seed_oss": _llama_like("SeedOssForCausalLM"),
    "ernie4_5": _llama_like("Ernie4_5ForCausalLM"),
    "hunyuan_v1_dense": _llama_like("HunYuanDenseV1ForCausalLM", notes="q/k norms"),
    "nemotron": _llama_like("NemotronForCausalLM", notes="MLP without gate (up/down only)"),
    "persimmon": _spec("model.layers", "model.final_layernorm",
                       ("model.embed_tokens", "model.final_layernorm", "model.rotary_emb", "lm_head"),
                       "PersimmonForCausalLM", notes="fused query_key_value, q/k layer norms"),
    "gpt_neo": _spec("transformer.h", "transformer.ln_f", ("transformer.wte", "transformer.wpe", "transformer.ln_f",
                                                           "lm_head"),
                     "GPTNeoForCausalLM", notes="local/global attention layers"),
    "codegen": _spec("transformer.h", "transformer.ln_f", ("transformer.wte", "transformer.ln_f", "lm_head"),
                     "CodeGenForCausalLM", notes="fused qkv_proj, parallel attention + MLP"),
    "gpt_oss": _llama_like("GptOssForCausalLM", moe=True,
                           notes="experts interleaved gate/up, transposed, with biases, clamped SwiGLU; "
                                 "attention sinks; sliding/full layers"),
    "phi": _spec("model.layers", "model.final_layernorm",
                 ("model.embed_tokens", "model.final_layernorm", "model.rotary_emb", "lm_head"),
                 "PhiForCausalLM", notes="parallel attention + MLP, partial rotary"),
    "opt": _spec("model.decoder.layers", "model.decoder.final_layer_norm",
                 ("model.decoder.embed_tokens", "model.decoder.embed_positions",
                  "model.decoder.final_layer_norm", "lm_head"), "OPTForCausalLM", notes="learned positions"),
    "gpt2": _spec("transformer.h", "transformer.ln_f", ("transformer.wte", "transformer.wpe", "transformer.ln_f",
                                                        "lm_head"),
                  "GPT2LMHeadModel", notes="Conv1D layers quantized as Linear (transposed weight)"),
    "gpt_bigcode": _spec("transformer.h", "transformer.ln_f", ("transformer.wte", "transformer.wpe",
                                                               "transformer.ln_f", "lm_head"),
                         "GPTBigCodeForCausalLM", notes="multi-query attention"),
    "gptj": _spec("transformer.h", "transformer.ln_f", _GPT_OUT, "GPTJForCausalLM",
                  notes="parallel attention + MLP, rotary"),
    "gpt_neox": _spec("gpt_neox.layers", "gpt_neox.final_layer_norm",
                      ("gpt_neox.embed_in", "gpt_neox.final_layer_norm", "gpt_neox.rotary_emb", "lm_head"),
                      "GPTNeoXForCausalLM", notes="fused query_key_value"),
    "falcon": _spec("transformer.h", "transformer.ln_f", ("transformer.word_embeddings", "transformer.ln_f",
                                                          "lm_head"), "FalconForCausalLM",
                    notes="fused query_key_value, parallel attention"),
    "bloom": _spec("transformer.h", "transformer.ln_f", ("transformer.word_embeddings",
                                                         "transformer.word_embeddings_layernorm",
                                                         "transformer.ln_f", "lm_head"),
                   "BloomForCausalLM", notes="ALiBi passed to each block"),
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


def _is_linear_like(m: nn.Module) -> bool:
    # QuantLinear too, so an already quantized (loaded) model is discovered the same way
    return isinstance(m, nn.Linear) or type(m).__name__ in ("Conv1D", "QuantLinear")


def discover(model: nn.Module) -> ArchSpec:
    """Generic fallback: the largest nn.ModuleList of identical blocks that hold linears."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            kinds = {type(b) for b in mod}
            has_linear = any(_is_linear_like(m) for m in mod[0].modules())
            if len(kinds) == 1 and has_linear and (best is None or len(mod) > len(best[1])):
                best = (name, mod)
    if best is None:
        raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}: no repeated "
                         "nn.ModuleList of blocks with linear layers")
    blocks_path, blocks = best
    # the final norm: a norm-like module outside the blocks, registered after them
    final = None
    outside = []
    for name, mod in model.named_modules():
        if not name or name == blocks_path or name.startswith(blocks_path + "."):
            continue
        if any(c for c in mod.children()):
            continue  # report leaves only
        outside.append(name)
        if re.search(r"norm|ln_f", type(mod).__name__.lower() + " " + name.split(".")[-1].lower()):
            final = name
    spec = ArchSpec(blocks_path, final, DEFAULT_SKIP, tuple(outside), has_fused_or_routed(blocks[0]),
                    type(model).__name__, notes="discovered")
    lin = sorted(n for n, m in blocks[0].named_modules() if _is_linear_like(m))
    skipped = [n for n in lin if is_skipped(n, spec)]
    log.info("architecture %s (model_type %r) is not in the registry; discovered %d blocks of %s at %r, "
             "final norm %r, outside the blocks %s; linears per block %s%s",
             type(model).__name__, getattr(getattr(model, "config", None), "model_type", None), len(blocks),
             type(blocks[0]).__name__, blocks_path, final, outside, lin,
             f", kept in full precision {skipped}" if skipped else "")
    return spec


def has_fused_or_routed(block: nn.Module) -> bool:
    from .moe import has_fused_experts
    return has_fused_experts(block) or any(re.search(r"(^|\.)experts$", n) for n, _ in block.named_modules())


def spec_for(model: nn.Module) -> ArchSpec:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = ARCHS.get(model_type)
    if spec is not None and isinstance(get_module(model, spec.blocks), nn.ModuleList):
        log.debug("architecture %r: blocks at %r, final norm %r", model_type, spec.blocks, spec.final_norm)
        return spec
    if spec is not None:
        log.warning("registry entry of %r names blocks at %r, which this model lacks; discovering instead",
                    model_type, spec.blocks)
    return discover(model)


def is_skipped(name_in_block: str, spec: ArchSpec) -> bool:
    return any(re.search(rx, name_in_block) for rx in spec.skip)


def block_linears(block: nn.Module, spec: ArchSpec) -> dict[str, nn.Linear]:
    """The quantizable linears of a block, by name inside the block."""
    return {n: m for n, m in block.named_modules()
            if isinstance(m, nn.Linear) and not is_skipped(n, spec)}


def conv1d_to_linear(m: nn.Module) -> nn.Linear:
    """transformers' Conv1D (weight [in, out], y = x·W + b) as the equivalent nn.Linear."""
    K, N = m.weight.shape
    lin = nn.Linear(K, N, bias=m.bias is not None, device=m.weight.device, dtype=m.weight.dtype)
    with torch.no_grad():
        if m.weight.device.type != "meta":
            lin.weight.copy_(m.weight.T)
            if m.bias is not None:
                lin.bias.copy_(m.bias)
    return lin


def prepare_block(block: nn.Module, spec: ArchSpec, quantized=lambda name: True, prefix: str = "") -> list[str]:
    """Rewrite a materialized block into plain nn.Linears that GPTQ can hook, in place.

    - fused 3-D MoE experts -> one gate_proj/up_proj/down_proj Linear per expert;
    - Conv1D -> nn.Linear, only where `quantized(name_in_block)` is true (a Conv1D left in
      full precision is written unchanged, in the layout the model expects).
    Returns the full names of parameters that no longer exist (fused expert weights).
    """
    from .moe import unfuse_experts
    removed = unfuse_experts(block, prefix)
    for n, m in list(block.named_modules()):
        if type(m).__name__ == "Conv1D" and not is_skipped(n, spec) and quantized(n):
            parent, _, child = n.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, child, conv1d_to_linear(m))
    return removed
