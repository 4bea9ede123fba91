"""The lean decode step (models/decode.py): transformers' tokens and logits on tiny random models of
each supported family, float and quantized (the CPU kernel), batch 1 and 2, generate() and a manual
loop; every call it should not serve (padding, hooks, gradients, output_attentions, a sliding window
that cuts keys, another family) goes to transformers' forward."""
from __future__ import annotations

import copy

import pytest
import torch

from _arch_helpers import TINY_VOCAB, tiny_llama_config  # noqa: E402
from _arch_helpers import build_tiny, calib_ids, one_thread, quantize_dir  # noqa: F401 (autouse fixture)

V = TINY_VOCAB
_LL = tiny_llama_config(128)
CASES = {
    "llama": _LL,
    "mistral": {**_LL, "sliding_window": None},
    "qwen2": {**_LL, "attention_bias": True},  # q/k/v biases (qwen2 always has them)
    "qwen3": {**_LL, "head_dim": 16},           # per-head q/k norms, head_dim != hidden / heads
}


def _tiny(case, tmp_path, **over):
    from transformers import AutoModelForCausalLM
    path = build_tiny(case, tmp_path / case, **{**CASES[case], **over})
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _gen(model, ids, n=12, mask=None, **kw):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids) if mask is None else mask,
                              max_new_tokens=n, min_new_tokens=n, do_sample=False, return_dict_in_generate=True,
                              output_logits=True, pad_token_id=0, **kw)


def _same(a, b, atol=1e-5):
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("batch", [1, 2])
def test_same_as_transformers(case, batch, tmp_path):
    from gptqkit.models import decode
    from gptqkit.models.kv_cache import GrowingCache
    model = _tiny(case, tmp_path)
    ids = calib_ids(V, seed=1, n=batch, L=9)
    ref = _gen(model, ids)
    lean = decode.enable(model)
    assert lean is not None, decode._supported(model)
    for cache in (None, GrowingCache(config=model.config, capacity=64)):  # DynamicCache, GrowingCache
        before = lean.steps
        _same(_gen(model, ids, cache=cache), ref)
        assert lean.steps - before == 11  # every step after the prompt
    decode.disable(model)
    assert "forward" not in model.__dict__
    _same(_gen(model, ids), ref)


def test_quantized_model_manual_loop(tmp_path):
    """gptqkit.load turns it on; a manual loop with positional input_ids and inference_mode gives
    the logits of transformers' forward over the same kernels."""
    import gptqkit
    from gptqkit.models.kv_cache import GrowingCache
    src = build_tiny("llama", tmp_path / "f", **_LL)
    quantize_dir(src, tmp_path / "q", calib_ids(V), bits=4, group_size=32)
    model = gptqkit.load(tmp_path / "q")
    lean = model._gptqkit_lean
    ids = calib_ids(V, seed=4, n=1, L=7)

    def loop():
        cache, out, tok = GrowingCache(config=model.config), [], ids
        with torch.inference_mode():
            for _ in range(20):
                o = model(tok, cache=cache, use_cache=True)
                out.append(o.logits[:, -1])
                tok = o.logits[:, -1:].argmax(-1)
        return torch.cat(out)

    got = loop()
    assert lean.steps == 19 and lean.fallbacks == 1  # the prompt went to transformers
    model._gptqkit_lean = None  # transformers' forward for every call
    want = loop()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_falls_back_where_it_must(tmp_path):
    from gptqkit.models import decode
    model = _tiny("llama", tmp_path)
    lean = decode.enable(model)
    ids = calib_ids(V, seed=5, n=2, L=8)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: transformers' masks
    ref_model = copy.deepcopy(model)
    decode.disable(ref_model)
    ref = _gen(ref_model, ids, mask=mask)
    _same(_gen(model, ids, mask=mask), ref)
    assert lean.steps == 0
    # a deep copy has its own lean step, bound to the copy
    twin = copy.deepcopy(model)
    assert twin._gptqkit_lean is not lean and twin._gptqkit_lean.model is twin
    # output_attentions, a forward hook: transformers' forward, and the hook runs
    _same(_gen(model, ids[:1], output_attentions=True), _gen(ref_model, ids[:1], output_attentions=True))
    seen = []
    h = model.model.layers[1].mlp.register_forward_hook(lambda *a: seen.append(1))
    _gen(model, ids[:1], n=4)
    h.remove()
    assert lean.steps == 0 and len(seen) == 4
    # gradients on: transformers' forward
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    model(ids[:1], cache=cache)
    model(ids[:1, :1], cache=cache)
    assert lean.steps == 0
    with torch.no_grad():
        model(ids[:1, :1], cache=cache)
    assert lean.steps == 1


def test_sliding_window_and_other_families(tmp_path):
    from transformers import AutoModelForCausalLM, DynamicCache
    from gptqkit.models import decode
    model = _tiny("mistral", tmp_path, sliding_window=12)
    ref = copy.deepcopy(model)
    lean = decode.enable(model)
    ids = calib_ids(V, seed=6, n=1, L=6)
    # generate()'s own cache has sliding-window layers: transformers' forward throughout
    _same(_gen(model, ids, n=14), _gen(ref, ids, n=14))
    assert lean.steps == 0
    # a config-less DynamicCache holds every key: lean steps while all of them are inside the
    # window (keys 7..12), transformers' masks from then on
    _same(_gen(model, ids, n=14, cache=DynamicCache()), _gen(ref, ids, n=14, cache=DynamicCache()))
    assert lean.steps == 6
    gemma = build_tiny("gemma", tmp_path / "gemma", **{**_LL, "head_dim": 16})
    assert decode.enable(AutoModelForCausalLM.from_pretrained(gemma)) is None


def test_bf16(tmp_path):
    """bf16 activations: the norms compute in fp32 and cast back, as transformers' do."""
    from gptqkit.models import decode
    model = _tiny("qwen3", tmp_path).to(torch.bfloat16)
    ids = calib_ids(V, seed=7, n=1, L=9)
    ref = _gen(model, ids)
    lean = decode.enable(model)
    _same(_gen(model, ids), ref, atol=2e-2)
    assert lean.steps == 11
