"""A loaded gptqkit model is an ordinary transformers PreTrainedModel: sampling and beam search,
pipeline("text-generation"), save_pretrained round trip (quantization_config included), device and
dtype placement; where gptqmodel/optimum are installed, transformers' own GPTQ loading reads the
checkpoint and gives the same logits."""
from __future__ import annotations

import json

import pytest
import torch

from _arch_helpers import one_thread  # noqa: F401  (autouse: 1 torch thread)

def _one_text(tiny_text_file) -> str:
    """One repeat (~470 chars) of the shared tiny corpus (tests/conftest.py's tiny_text_file)."""
    return tiny_text_file.read_text().split("\n")[0] + "\n"



@pytest.fixture(scope="module")
def qdir(tiny_text_file, tiny_llama_dir, tmp_path_factory):
    import gptqkit
    out = tmp_path_factory.mktemp("tfint") / "q4"
    gptqkit.quantize(tiny_llama_dir, [_one_text(tiny_text_file)] * 4, out, gptqkit.QuantizeConfig(bits=4, group_size=32),
                     nsamples=4, seqlen=64, progress=False)
    return out


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    from gptqkit.api import load_tokenizer
    return load_tokenizer(tiny_llama_dir)


def test_is_pretrained_model_and_generates(qdir, tok):
    from transformers import PreTrainedModel

    import gptqkit
    m = gptqkit.load(qdir)
    assert isinstance(m, PreTrainedModel)
    enc = tok("to be", return_tensors="pt")
    torch.manual_seed(0)
    s = m.generate(**enc, max_new_tokens=8, do_sample=True, temperature=0.9, top_k=20, pad_token_id=3)
    b = m.generate(**enc, max_new_tokens=8, num_beams=3, do_sample=False, pad_token_id=3)
    g = m.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=3)
    assert s.shape == b.shape == g.shape == (1, enc["input_ids"].shape[1] + 8)
    # greedy = argmax of the forward, step by step
    ids = enc["input_ids"]
    for _ in range(8):
        ids = torch.cat([ids, m(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(ids, g)


def test_pipeline_text_generation(qdir, tok):
    from transformers import pipeline

    import gptqkit
    p = pipeline("text-generation", model=gptqkit.load(qdir), tokenizer=tok)
    out = p("all the world", max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"].startswith("all the world")


def test_save_pretrained_roundtrip(qdir, tmp_path):
    import gptqkit
    m = gptqkit.load(qdir)
    m.save_pretrained(tmp_path / "sp")  # transformers' own method
    cj = json.loads((tmp_path / "sp" / "config.json").read_text())
    assert cj["quantization_config"]["quant_method"] == "gptq" and cj["quantization_config"]["bits"] == 4
    m.save(tmp_path / "native")  # gptqkit's: + quantize_config.json, tokenizer, quant_log
    for d in ("sp", "native"):
        r = gptqkit.load(tmp_path / d)
        ids = torch.tensor([[5, 6, 7, 8, 9]])
        torch.testing.assert_close(r(ids).logits, m(ids).logits)
    assert {"quantize_config.json", "tokenizer.json", "quant_log.json"} <= {p.name for p in (tmp_path / "native").iterdir()}
    from safetensors.torch import load_file
    t = load_file(str(tmp_path / "native" / "model.safetensors"))
    assert t["model.layers.0.self_attn.q_proj.qweight"].dtype == torch.int32
    assert t["model.layers.0.self_attn.q_proj.scales"].dtype == torch.float16


def test_device_and_dtype_placement(qdir):
    import gptqkit
    m = gptqkit.load(qdir)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    ref = m(ids).logits
    m = m.to("cpu")
    assert m.device.type == "cpu"
    m16 = gptqkit.load(qdir, dtype=torch.bfloat16)
    y = m16(ids).logits
    assert y.dtype == torch.bfloat16
    assert (y.float() - ref).abs().max() < 0.1 * ref.abs().max()
    m.to(torch.bfloat16)
    assert m(ids).logits.dtype == torch.bfloat16
    if torch.cuda.is_available():
        mc = gptqkit.load(qdir, device="cuda")
        torch.testing.assert_close(mc(ids.cuda()).logits.float().cpu(), ref, rtol=2e-2, atol=2e-2)


def test_transformers_gptq_loading_matches(qdir):
    """transformers' own GPTQ integration (needs gptqmodel + optimum) reads a gptqkit checkpoint."""
    pytest.importorskip("gptqmodel")
    pytest.importorskip("optimum")
    from transformers import AutoModelForCausalLM

    import gptqkit
    hf = AutoModelForCausalLM.from_pretrained(qdir, device_map="cpu", dtype=torch.float16).eval()
    ours = gptqkit.load(qdir, dtype=torch.float16)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits.float(), ours(ids).logits.float(), rtol=2e-2, atol=2e-2)
