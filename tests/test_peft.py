"""PEFT: LoRA adapters train on top of QuantLinear layers (gradients reach the adapters, the packed
weights stay frozen), the loss falls, and the adapter saves and reloads."""
from __future__ import annotations

import pytest
import torch

from _arch_helpers import one_thread  # noqa: F401  (autouse: 1 torch thread)

peft = pytest.importorskip("peft")

def _one_text(tiny_text_file) -> str:
    """One repeat (~470 chars) of the shared tiny corpus (tests/conftest.py's tiny_text_file)."""
    return tiny_text_file.read_text().split("\n")[0] + "\n"



@pytest.fixture(scope="module")
def qdir(tiny_text_file, tiny_llama_dir, tmp_path_factory):
    import gptqkit
    out = tmp_path_factory.mktemp("peft") / "q4"
    gptqkit.quantize(tiny_llama_dir, [_one_text(tiny_text_file)] * 4, out, gptqkit.QuantizeConfig(bits=4, group_size=32),
                     nsamples=4, seqlen=64, progress=False)
    return out


def test_quantlinear_backward_reaches_input_only(qdir):
    import gptqkit
    from gptqkit.kernels.qlinear import QuantLinear
    m = gptqkit.load(qdir)
    ql = m.model.layers[0].self_attn.q_proj
    assert isinstance(ql, QuantLinear)
    x = torch.randn(3, ql.in_features, requires_grad=True)
    y = ql(x)
    y.sum().backward()
    W = ql.weight  # dequantized [N, K]
    torch.testing.assert_close(x.grad, W.sum(0).expand(3, -1), rtol=1e-4, atol=1e-4)
    assert all(not b.requires_grad for b in ql.buffers())
    with torch.no_grad():  # inference keeps the fast backend's result
        torch.testing.assert_close(ql(x), y.detach(), rtol=1e-4, atol=1e-4)


def test_lora_trains_on_quantized_model_and_reloads(tiny_text_file, qdir, tiny_llama_dir, tmp_path):
    from peft import get_peft_model

    import gptqkit
    from gptqkit.compat.peft import load_adapter, lora_config
    from gptqkit.kernels.qlinear import QuantLinear
    tok = gptqkit.api.load_tokenizer(tiny_llama_dir)
    model = gptqkit.load(qdir)
    packed = {n: b.clone() for n, b in model.named_buffers() if n.endswith(("qweight", "scales", "qzeros"))}
    cfg = lora_config(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                      task_type="CAUSAL_LM")
    pm = get_peft_model(model, cfg)
    wrapped = [m for m in pm.modules() if type(m).__name__ == "GPTQLoraLinear"]
    assert len(wrapped) == 6 and all(isinstance(m.base_layer, QuantLinear) for m in wrapped)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    ids = tok(_one_text(tiny_text_file)[:200], return_tensors="pt")["input_ids"]
    batch = ids.view(1, -1)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    losses = []
    for step in range(12):
        out = pm(input_ids=batch, labels=batch)
        out.loss.backward()
        if step in (0, 1):  # lora_B starts at zero, so lora_A's gradient is zero on the first step
            grads = [p.grad for n, p in pm.named_parameters() if ("lora_B" if step == 0 else "lora_A") in n]
            assert len(grads) == 6 and all(g is not None and g.abs().sum() > 0 for g in grads)
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    for n, b in pm.named_buffers():  # packed weights untouched
        key = n.replace("base_model.model.", "", 1).replace(".base_layer", "")
        if key in packed:
            assert torch.equal(b, packed[key]), n

    pm.eval()
    with torch.no_grad():
        ref = pm(input_ids=batch).logits
    pm.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    reloaded = load_adapter(gptqkit.load(qdir), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=batch).logits, ref, rtol=1e-4, atol=1e-4)
