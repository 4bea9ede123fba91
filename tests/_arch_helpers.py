"""Shared helpers of the architecture tests: tiny random models of any model_type, quantize →
save → load, and the fake-quantized reference (the original float model with each quantized
weight replaced by the weight dequantized from the checkpoint's own tensors)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

SEQLEN, NSEQ = 16, 4

# transformers 5 fuses MoE experts; the checkpoint holds one Linear per expert
_EXPERT_RX = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)$")

# The tiny configs the architecture and KV-cache tests build their models from
TINY_VOCAB = 128
TINY_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
TINY_MLA = dict(kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
                first_k_dense_replace=1, n_group=1, topk_group=1)


def tiny_llama_config(max_positions: int = 64) -> dict:
    """A 2-layer Llama-shaped config (GQA) that most decoder families accept as is."""
    return dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                tie_word_embeddings=False, **TINY_IDS)

@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one intra-op thread is much faster than two spinning on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def build_tiny(model_type: str, out: Path, seed: int = 0, init=None, **kw) -> Path:
    """A random tiny model of `model_type` saved (float32 safetensors) at `out`; `init(model)`
    may adjust the weights before saving."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # larger than the init std so quantization errors show in the logits
        for n, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in n and "wte" not in n and "wpe" not in n:
                p.normal_(0, 0.1)
        if init is not None:
            init(model)
    model.save_pretrained(out)
    return Path(out)


def calib_ids(vocab: int, seed: int = 0, n: int = NSEQ, L: int = SEQLEN) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (n, L), generator=g)


def quantize_dir(src: Path, out: Path, ids: torch.Tensor, **qkw):
    from gptqkit import QuantizeConfig
    from gptqkit.pipeline import quantize_model
    from gptqkit.models.source import ModelHandle
    qkw.setdefault("bits", 4)
    qkw.setdefault("group_size", 32)
    return quantize_model(ModelHandle(src), ids, QuantizeConfig(**qkw), out, progress=False)


def block_outputs(monkeypatch) -> dict[int, dict[int, torch.Tensor]]:
    """Record what the pipeline passes on from block to block: {block: {chunk: hidden states}}."""
    from gptqkit.pipeline.activations import Activations
    outs: dict[int, dict[int, torch.Tensor]] = {}
    put = Activations.put

    def record(self, c, h, where):
        outs.setdefault(self.block, {})[c] = h
        put(self, c, h, where)
    monkeypatch.setattr(Activations, "put", record)
    return outs


def dequantized_weights(qdir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """name -> (W [N, K] float32 dequantized from the checkpoint tensors, bias or None)."""
    from gptqkit.config import QuantizeConfig
    from gptqkit.formats.checkpoint import iter_tensors
    from gptqkit.formats.packing import unpack_qweight, unpack_qzeros
    from gptqkit.quant.grid import dequantize
    from gptqkit.models.loading import _bits_from_shapes

    qcfg = QuantizeConfig.load(qdir)
    t = dict(iter_tensors(qdir))
    out = {}
    for k in t:
        if not k.endswith(".qweight"):
            continue
        name = k[: -len(".qweight")]
        K = t[f"{name}.g_idx"].numel()
        N = t[f"{name}.scales"].shape[1]
        bits = _bits_from_shapes(t[k].shape[0], K)
        q = unpack_qweight(t[k], bits)
        z = unpack_qzeros(t[f"{name}.qzeros"], bits, N, qcfg.checkpoint_format)
        Wt = dequantize(q, t[f"{name}.scales"], z, t[f"{name}.g_idx"], torch.float32)
        b = t.get(f"{name}.bias")
        out[name] = (Wt.T.contiguous().float(), b.float() if b is not None else None)
    return out


def fake_quant_reference(src: Path, qdir: Path) -> tuple[nn.Module, int]:
    """The original float model with every quantized weight replaced by its dequantized checkpoint
    weight. Returns (model, number of weights that differ from the originals)."""
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    changed = 0
    with torch.no_grad():
        for name, (W, b) in dequantized_weights(qdir).items():
            m = _EXPERT_RX.match(name)
            if m and not isinstance(_get(ref, name), nn.Module):
                experts = ref.get_submodule(m.group(1))  # fused: write into the 3-D parameters
                e, proj = int(m.group(2)), m.group(3)
                target, tb = _fused_slices(experts, e, proj)
                if b is not None:
                    tb.copy_(b)
            else:
                mod = ref.get_submodule(name)
                if type(mod).__name__ == "Conv1D":
                    target, W = mod.weight, W.T
                else:
                    target = mod.weight
                if b is not None:
                    mod.bias.copy_(b)
            assert target.shape == W.shape, (name, target.shape, W.shape)
            changed += int(not torch.equal(target, W))
            target.copy_(W)
    return ref, changed


def _fused_slices(experts, e: int, proj: str):
    """Views [out, in] (and [out] of the bias) of expert e's `proj` inside fused 3-D parameters,
    for every layout transformers declares (concatenated or interleaved gate/up, transposed)."""
    tr = getattr(experts, "is_transposed", False)
    if proj == "down_proj":
        pname, rows = "down_proj", slice(None)
    else:
        pname = "gate_up_proj" if experts.has_gate else "up_proj"
        if experts.has_gate:
            I = getattr(experts, pname).shape[1 if not tr else 2] // 2
            first = proj == "gate_proj"
            if getattr(experts, "is_concatenated", True):
                rows = slice(0, I) if first else slice(I, 2 * I)
            else:
                rows = slice(0, None, 2) if first else slice(1, None, 2)
        else:
            rows = slice(None)
    W = getattr(experts, pname)[e]
    W = W.T if tr else W
    bias = getattr(experts, f"{pname}_bias", None)
    return W[rows], (bias[e][rows] if bias is not None else None)


def _get(root, dotted):
    try:
        return root.get_submodule(dotted)
    except AttributeError:
        return None


def roundtrip(src: Path, qdir: Path, vocab: int, *, generate: bool = True, **qkw) -> dict:
    """quantize → save → load → logits vs the fake-quantized reference; generate runs."""
    from gptqkit.kernels.qlinear import QuantLinear
    from gptqkit.models.loading import load_quantized

    ids = calib_ids(vocab)
    report = quantize_dir(src, qdir, ids, **qkw)
    assert report.layers, "nothing was quantized"
    for lay in report.layers:
        assert torch.isfinite(torch.tensor(lay.loss)), lay
    model = load_quantized(qdir, backend="torch")
    nq = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert nq == len(report.layers)
    ref, changed = fake_quant_reference(src, qdir)
    assert changed > 0, "quantization changed no weight"
    test_ids = calib_ids(vocab, seed=1, n=2)
    with torch.no_grad():
        got = model(input_ids=test_ids).logits
        want = ref(input_ids=test_ids).logits
    assert torch.isfinite(got).all()
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= 1e-4 * max(scale, 1.0), f"max |Δlogits| {err:.3g} vs scale {scale:.3g}"
    if generate:
        out = model.generate(test_ids[:1, :4], max_new_tokens=3, do_sample=False)
        assert out.shape == (1, 7)
    return {"report": report, "model": model, "ref": ref, "err": err, "quantized": nq}
