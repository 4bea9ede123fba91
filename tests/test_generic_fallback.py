"""A decoder-only model type the registry does not list quantizes through the generic fallback,
and the log says what was discovered. The custom model is defined here and registered with the
Auto classes; its blocks take an unusual input (a per-layer bias passed as a keyword argument
from the decoder loop), which works because the pipeline replays what each block received."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig,
                          PreTrainedModel)
from transformers.modeling_outputs import CausalLMOutput

from _arch_helpers import build_tiny, one_thread, roundtrip  # noqa: F401

V = 128


class TinyDecConfig(PreTrainedConfig):
    model_type = "gptqkit_tinydec"

    def __init__(self, vocab_size=V, width=64, depth=3, heads=4, **kw):
        self.vocab_size, self.width, self.depth, self.heads = vocab_size, width, depth, heads
        super().__init__(**kw)


class TinyBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.h, self.d = c.heads, c.width // c.heads
        self.ln1, self.ln2 = nn.LayerNorm(c.width), nn.LayerNorm(c.width)
        self.qkv = nn.Linear(c.width, 3 * c.width)
        self.out = nn.Linear(c.width, c.width)
        self.ff_in = nn.Linear(c.width, 2 * c.width)
        self.ff_out = nn.Linear(2 * c.width, c.width)
        self.router = nn.Linear(c.width, 2, bias=False)  # a gate: must stay in full precision

    def forward(self, x, *, layer_bias, window):
        B, L, W = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.h, self.d).permute(2, 0, 3, 1, 4)
        i = torch.arange(L)
        allowed = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
        att = (q @ k.transpose(-1, -2)) / self.d ** 0.5 + layer_bias
        att = att.masked_fill(~allowed, float("-inf")).softmax(-1)
        x = x + self.out((att @ v).transpose(1, 2).reshape(B, L, W))
        g = torch.sigmoid(self.router(x)).mean(-1, keepdim=True)
        return x + g * self.ff_out(torch.nn.functional.gelu(self.ff_in(self.ln2(x))))


class TinyDecModel(PreTrainedModel, GenerationMixin):
    config_class = TinyDecConfig
    base_model_prefix = "backbone"
    _no_split_modules = ["TinyBlock"]

    def __init__(self, config):
        super().__init__(config)
        self.backbone = nn.Module()
        self.backbone.tok = nn.Embedding(config.vocab_size, config.width)
        self.backbone.stack = nn.ModuleList(TinyBlock(config) for _ in range(config.depth))
        self.backbone.final_ln = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids=None, attention_mask=None, **kw):
        x = self.backbone.tok(input_ids)
        for i, blk in enumerate(self.backbone.stack):  # per-layer inputs chosen in the loop
            x = blk(x, layer_bias=0.1 * (i + 1), window=4 if i % 2 == 0 else 1 << 30)
        return CausalLMOutput(logits=self.head(self.backbone.final_ln(x)))

    def prepare_inputs_for_generation(self, input_ids, **kw):
        return {"input_ids": input_ids}


@pytest.fixture(scope="module", autouse=True)
def registered():
    try:
        AutoConfig.register("gptqkit_tinydec", TinyDecConfig)
        AutoModelForCausalLM.register(TinyDecConfig, TinyDecModel)
    except ValueError:
        pass  # already registered in this process
    yield


def test_unknown_model_type_uses_the_generic_fallback(tmp_path, caplog):
    from gptqkit.models.arch import ARCHS
    assert "gptqkit_tinydec" not in ARCHS
    src = build_tiny("gptqkit_tinydec", tmp_path / "src")
    with caplog.at_level(logging.INFO, logger="gptqkit"):
        r = roundtrip(src, tmp_path / "q", V, generate=False)
    text = caplog.text
    assert "not in the registry" in text
    assert "discovered 3 blocks of TinyBlock at 'backbone.stack'" in text
    assert "final norm 'backbone.final_ln'" in text
    assert "kept in full precision ['router']" in text
    names = {lay.name.split(".", 3)[-1] for lay in r["report"].layers}
    assert names == {"qkv", "out", "ff_in", "ff_out"}
    assert len(r["report"].layers) == 3 * 4
    out = r["model"].generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=3, do_sample=False, use_cache=False)
    assert out.shape == (1, 7)


@pytest.mark.parametrize("per_block", [True, False])
def test_per_layer_kwargs_are_replayed_per_block(tmp_path, monkeypatch, per_block):
    """The pipeline's block outputs (each block's, from its solved weights) must equal a real
    forward of the fake-quantized model block by block; block 1 gets another window than block 0.
    per_block=False disables the per-block capture (every block replays block 0's kwargs) and
    shows the check is sensitive."""
    from gptqkit.pipeline import capture
    from _arch_helpers import block_outputs, calib_ids, fake_quant_reference, quantize_dir
    src = build_tiny("gptqkit_tinydec", tmp_path / "src")
    if not per_block:
        monkeypatch.setattr(capture, "capture_per_block_inputs", lambda *a, **k: None)
    outs = block_outputs(monkeypatch)
    ids = calib_ids(V)
    quantize_dir(src, tmp_path / "q", ids)
    ref, _ = fake_quant_reference(src, tmp_path / "q")
    seen = []
    hooks = [b.register_forward_hook(lambda m, a, o: seen.append(o)) for b in ref.backbone.stack]
    with torch.no_grad():
        ref(input_ids=ids)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(outs[0][0], capture.first_output(seen[0]), rtol=1e-5, atol=1e-5)
    match = [torch.allclose(outs[i][0], capture.first_output(seen[i]), rtol=1e-5, atol=1e-5) for i in (1, 2)]
    assert match == ([True, True] if per_block else [False, False])
