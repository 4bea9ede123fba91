"""Every listed architecture end to end on a tiny random model built from a transformers config:
quantize (4-bit, group 32) → save → load (QuantLinear, torch backend) → logits match the
fake-quantized reference (the float model with each quantized weight replaced by the weight
dequantized from the checkpoint) → generate runs.

Tiny configs: hidden 64, 2 layers, 4 heads, vocab 128, 4 sequences of 16 tokens. Model types
the installed transformers does not know are skipped (and say so)."""
from __future__ import annotations

import logging

import pytest
import torch

from _arch_helpers import TINY_IDS, TINY_MLA, TINY_VOCAB, tiny_llama_config  # noqa: E402
from _arch_helpers import build_tiny, one_thread, roundtrip  # noqa: F401 (autouse fixture)

V = TINY_VOCAB
_IDS = TINY_IDS
_LL = tiny_llama_config(64)
_MLA = TINY_MLA

# model_type -> tiny config (kwargs of AutoConfig.for_model)
CASES: dict[str, dict] = {
    "llama": _LL,
    "mistral": {**_LL, "sliding_window": 8},
    "mixtral": {**_LL, "intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2": _LL,
    "qwen2_moe": {**_LL, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64, "num_experts": 4,
                  "num_experts_per_tok": 2, "decoder_sparse_step": 1, "mlp_only_layers": []},
    "qwen3": {**_LL, "head_dim": 16},
    "qwen3_moe": {**_LL, "head_dim": 16, "moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2,
                  "decoder_sparse_step": 1, "mlp_only_layers": []},
    "gemma": {**_LL, "head_dim": 16},
    # sliding window 4 < seqlen 16 and alternating layer types: block 1 needs its own mask
    "gemma2": {**_LL, "head_dim": 16, "sliding_window": 4, "query_pre_attn_scalar": 16,
               "layer_types": ["sliding_attention", "full_attention"]},
    "gemma3_text": {**_LL, "head_dim": 16, "sliding_window": 4,
                    "layer_types": ["sliding_attention", "full_attention"]},
    "phi": {**_LL, "partial_rotary_factor": 0.5},
    "phi3": {**_LL, "num_key_value_heads": 4},
    "opt": dict(vocab_size=V, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                word_embed_proj_dim=64, max_position_embeddings=64, **_IDS),
    "gpt2": dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64, **_IDS),
    "gptj": dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64,
                 tie_word_embeddings=False, **_IDS),
    "gpt_neox": dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, rotary_pct=0.5, **_IDS),
    "gpt_bigcode": dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64, multi_query=True, **_IDS),
    "starcoder2": {**_LL, "use_bias": True},
    "falcon": dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=64, **_IDS),
    "falcon_alibi": dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         alibi=True, max_position_embeddings=64, **_IDS),
    "bloom": dict(vocab_size=V, hidden_size=64, n_layer=2, n_head=4, **_IDS),
    "olmo": _LL,
    "olmo2": _LL,
    "cohere": _LL,
    "granite": _LL,
    "stablelm": _LL,
    "olmoe": {**_LL, "intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2},
    "gpt_oss": {**_LL, "head_dim": 16, "intermediate_size": 32, "num_local_experts": 4, "num_experts_per_tok": 2,
                "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]},
    "phimoe": {**_LL, "intermediate_size": 32, "num_local_experts": 4, "num_experts_per_tok": 2},
    "granitemoe": {**_LL, "intermediate_size": 32, "num_local_experts": 4, "num_experts_per_tok": 2},
    "cohere2": {**_LL, "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]},
    "glm": {**_LL, "head_dim": 16},
    "glm4": {**_LL, "head_dim": 16},
    "smollm3": _LL,
    "helium": {**_LL, "head_dim": 16},
    "ministral": {**_LL, "head_dim": 16, "sliding_window": 4},
    "exaone4": {**_LL, "head_dim": 16, "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]},
    "seed_oss": {**_LL, "head_dim": 16},
    "ernie4_5": {**_LL, "head_dim": 16},
    "hunyuan_v1_dense": {**_LL, "head_dim": 16},
    "nemotron": {**_LL, "head_dim": 16},
    "persimmon": {**_LL, "num_key_value_heads": 4},
    "gpt_neo": dict(vocab_size=V, hidden_size=64, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
                    window_size=4, max_position_embeddings=64, **_IDS),
    "codegen": dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64, **_IDS),
    "deepseek_v2": {**_LL, **_MLA, "topk_method": "greedy"},
    "deepseek_v3": {**_LL, **_MLA},
}


def _model_type(case: str) -> str:
    return {"falcon_alibi": "falcon"}.get(case, case)


@pytest.mark.parametrize("case", list(CASES))
def test_architecture_roundtrip(case, tmp_path, caplog):
    from transformers import CONFIG_MAPPING
    mt = _model_type(case)
    if mt not in CONFIG_MAPPING:
        pytest.skip(f"transformers has no model_type {mt!r}")
    src = build_tiny(mt, tmp_path / "src", **CASES[case])
    with caplog.at_level(logging.INFO, logger="gptqkit"):
        r = roundtrip(src, tmp_path / "q", V)
    from gptqkit.models.arch import ARCHS, get_module
    assert mt in ARCHS, f"{mt} should have a registry entry"
    spec = ARCHS[mt]  # the data is right: every module it names exists (in the float reference)
    for path in (spec.blocks, spec.final_norm, *spec.outside):
        assert get_module(r["ref"], path) is not None, path
    assert "not in the registry" not in caplog.text
    names = [lay.name for lay in r["report"].layers]
    # routers and gates stay in full precision
    assert not any(n.endswith((".gate", ".router", "shared_expert_gate")) for n in names), names
    if ARCHS[mt].moe:
        assert any(".experts.0." in n for n in names), names
    assert all(torch.isfinite(torch.tensor(lay.loss)) for lay in r["report"].layers)


def test_per_block_kwargs_differ_for_gemma2(tmp_path):
    """Gemma2 chooses a sliding or a global mask per layer inside the decoder loop: the pipeline
    must replay what *each* block received (block 0's sliding mask is wrong for block 1)."""
    from transformers import CONFIG_MAPPING
    if "gemma2" not in CONFIG_MAPPING:
        pytest.skip("no gemma2")
    from gptqkit.models.arch import spec_for, get_module
    from gptqkit.pipeline.capture import capture_per_block_inputs
    from gptqkit.models.source import ModelHandle
    from _arch_helpers import calib_ids
    src = build_tiny("gemma2", tmp_path / "src", **CASES["gemma2"])
    h = ModelHandle(src)
    blocks = get_module(h.model, spec_for(h.model).blocks)
    h.materialize_outside(spec_for(h.model).blocks)
    rest = capture_per_block_inputs(h.model, blocks, calib_ids(V), None, 4)
    assert rest is not None
    m0, m1 = rest[0][0][1]["attention_mask"], rest[1][0][1]["attention_mask"]
    assert m0 is not None and m1 is not None and not torch.equal(m0, m1)


@pytest.mark.parametrize("case", ["gemma2", "gemma3_text", "bloom", "falcon_alibi", "gpt2"])
def test_replayed_inputs_match_a_real_forward(case, tmp_path, monkeypatch):
    """The hidden states the pipeline passes from block to block must equal a real forward of the
    fake-quantized model (GPTQ: each block's output comes from its solved weights). Three layers,
    sliding/global/sliding for Gemma, so block 1 needs another mask (and rotary table) than
    block 0; ALiBi for Bloom/Falcon."""
    from transformers import CONFIG_MAPPING
    from gptqkit.pipeline.capture import first_output
    from _arch_helpers import block_outputs, calib_ids, fake_quant_reference, quantize_dir
    mt = _model_type(case)
    if mt not in CONFIG_MAPPING:
        pytest.skip(f"no {mt}")
    kw = dict(CASES[case])
    for k in ("num_hidden_layers", "n_layer"):
        if k in kw or (k == "num_hidden_layers" and "n_layer" not in kw):
            kw[k] = 3
    if "layer_types" in kw:
        kw["layer_types"] = ["sliding_attention", "full_attention", "sliding_attention"]
    src = build_tiny(mt, tmp_path / "src", **kw)
    outs = block_outputs(monkeypatch)
    ids = calib_ids(V)
    quantize_dir(src, tmp_path / "q", ids)
    ref, _ = fake_quant_reference(src, tmp_path / "q")
    from gptqkit.models.arch import get_module, spec_for
    seen = []
    blocks = get_module(ref, spec_for(ref).blocks)
    hooks = [b.register_forward_hook(lambda m, a, o: seen.append(first_output(o))) for b in blocks]
    with torch.no_grad():
        ref(input_ids=ids)
    for h in hooks:
        h.remove()
    assert len(outs) == len(seen) == 3
    for i in range(3):
        torch.testing.assert_close(outs[i][0], seen[i], rtol=1e-4, atol=1e-5)


def test_rtn_runs_no_block_forward(tmp_path, monkeypatch):
    """RTN needs no inputs: no block runs on the calibration set, the head is still quantized when
    asked, and every layer is exactly rtn_solve of its weights."""
    from safetensors.torch import load_file
    from gptqkit import QuantizeConfig
    from gptqkit.quant.rtn import rtn_solve
    from _arch_helpers import block_outputs, calib_ids, dequantized_weights, quantize_dir, tiny_llama_config
    src = build_tiny("llama", tmp_path / "src", **tiny_llama_config())
    outs = block_outputs(monkeypatch)
    rep = quantize_dir(src, tmp_path / "q", calib_ids(V), method="rtn", lm_head=True)
    assert rep.forwards == 0 and outs == {}
    weights = load_file(str(src / "model.safetensors"))
    got = dequantized_weights(tmp_path / "q")
    assert "lm_head" in got and len(got) == 1 + 7 * 2
    for name, (w, _) in got.items():
        W = weights.get(f"{name}.weight", weights["model.embed_tokens.weight"] if name == "lm_head" else None)
        torch.testing.assert_close(w, rtn_solve(W.float(), 4, 32, mse=QuantizeConfig().mse).dequantize(), rtol=0, atol=0)
