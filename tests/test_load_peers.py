"""Loading peers' GPTQ checkpoints (AutoGPTQ, GPTQModel, transformers/optimum spellings).

The checkpoints are built BY HAND from the format spec in docs/ARCHITECTURE.md with an independent packer
(a plain per-bit loop in numpy, written here), never with gptqkit's writer or packers, so a bug
shared by gptqkit's packer and unpacker cannot hide. The reference is the float model whose
linears hold W = scale·(q − z) computed here from the integer codes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import gptqkit
from gptqkit.kernels.qlinear import QuantLinear

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# ------------------------------------------------------------------ independent packer
def pack_bits(values: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Pack unsigned ints along `axis` LSB-first: 32 consecutive values form one bit string of
    32·bits bits, value j at bits [bits·j, bits·j+bits), cut into `bits` 32-bit words (so for
    3 bits values 10 and 21 straddle words). Length along axis must be a multiple of 32."""
    v = np.moveaxis(np.asarray(values, dtype=np.uint64), axis, 0)
    n = v.shape[0]
    assert n % 32 == 0, n
    assert v.max() < (1 << bits)
    words = np.zeros((n // 32 * bits, *v.shape[1:]), dtype=np.uint64)
    for grp in range(n // 32):
        for j in range(32):
            val = v[grp * 32 + j]
            for bit in range(bits):
                pos = bits * j + bit              # position in the group's bit string
                word = grp * bits + pos // 32
                words[word] |= ((val >> np.uint64(bit)) & np.uint64(1)) << np.uint64(pos % 32)
    out = words.astype(np.uint32).view(np.int32)
    return np.ascontiguousarray(np.moveaxis(out, 0, axis))


def test_independent_packer_matches_spec_for_3_bits():
    # docs/ARCHITECTURE.md: word0 holds v0-v9 and the low 2 bits of v10; word1 bit 2 of v10 at bit 0,
    # v11-v20, low bit of v21 at 31; word2 the top 2 bits of v21 at 0-1, v22-v31 at 2-31.
    v = np.zeros(32, dtype=np.int64)
    v[10] = 0b101
    v[21] = 0b011
    w = pack_bits(v[:, None], 3, axis=0)[:, 0].astype(np.int64) & 0xFFFFFFFF
    assert w[0] == 0b01 << 30 and w[1] == (1 | (1 << 31)) and w[2] == 0b01
    v = np.arange(8).repeat(4)
    w4 = pack_bits(v.reshape(32, 1), 4, axis=0)[:, 0].astype(np.int64) & 0xFFFFFFFF
    assert w4[0] == 0x11110000 and w4[3] == 0x77776666


# ------------------------------------------------------------------ hand-built checkpoints
@dataclass
class Variant:
    producer: str          # "autogptq" | "gptqmodel" | "transformers"
    fmt: str               # "gptq" (v1) | "gptq_v2"
    bits: int
    group_size: int
    desc_act: bool = False
    sym: bool = True
    bias: bool = False
    sharded: bool = False
    lm_head: bool = False
    zero_bias: bool = False  # old AutoGPTQ wrote an all-zero bias for every QuantLinear


    def __str__(self) -> str:
        return (f"{self.producer}-{self.fmt}-{self.bits}b-g{self.group_size}{'-act' if self.desc_act else ''}"
                f"{'-sym' if self.sym else '-asym'}{'-bias' if self.bias else ''}"
                f"{'-sharded' if self.sharded else ''}{'-lmhead' if self.lm_head else ''}"
                f"{'-zerobias' if self.zero_bias else ''}")


VARIANTS = [
    Variant("autogptq", "gptq", 4, 32),
    Variant("autogptq", "gptq", 4, 32, desc_act=True, zero_bias=True),
    Variant("autogptq", "gptq", 4, 32, desc_act=True, sym=False, bias=True),
    Variant("autogptq", "gptq", 3, 32, sym=False),
    Variant("autogptq", "gptq", 2, -1, desc_act=True),
    Variant("autogptq", "gptq", 8, 64, sym=False, bias=True),
    Variant("gptqmodel", "gptq_v2", 4, 32, desc_act=True, sym=False),
    Variant("gptqmodel", "gptq_v2", 3, 32, desc_act=True, bias=True, sharded=True),
    Variant("gptqmodel", "gptq", 8, 32, lm_head=True),
    Variant("gptqmodel", "gptq_v2", 2, 32, sym=False),
    Variant("transformers", "gptq", 4, 64, sym=False, sharded=True),
]


@pytest.fixture(scope="module")
def tiny_llama_bias_dir(tmp_path_factory, tiny_llama_factory) -> Path:
    """Tiny Llama with biases in the attention projections (Qwen2-like)."""
    return tiny_llama_factory(tmp_path_factory.mktemp("tiny_llama_bias") / "model", seed=1, attention_bias=True)


def _quant_config(v: Variant) -> dict:
    if v.producer == "autogptq":  # what AutoGPTQ 0.7 writes
        return {"bits": v.bits, "group_size": v.group_size, "damp_percent": 0.01, "desc_act": v.desc_act,
                "static_groups": False, "sym": v.sym, "true_sequential": True, "model_name_or_path": None,
                "model_file_base_name": f"gptq_model-{v.bits}bit-{v.group_size}g", "quant_method": "gptq",
                "checkpoint_format": v.fmt, "meta": {"quantizer": "autogptq:0.7.1"}}
    if v.producer == "gptqmodel":  # newer GPTQModel: "format", list quantizer, knobs in meta
        return {"bits": v.bits, "group_size": v.group_size, "desc_act": v.desc_act, "sym": v.sym,
                "lm_head": v.lm_head, "quant_method": "gptq", "format": v.fmt, "pack_dtype": "int32",
                "dynamic": None, "meta": {"quantizer": ["gptqmodel:2.2.0"], "uri": "https://github.com/modelcloud/gptqmodel",
                                          "damp_percent": 0.01, "damp_auto_increment": 0.0025,
                                          "static_groups": False, "true_sequential": True, "mse": 0.0}}
    # transformers / optimum GPTQConfig.to_dict()
    return {"bits": v.bits, "group_size": v.group_size, "desc_act": v.desc_act, "sym": v.sym,
            "damp_percent": 0.1, "true_sequential": True, "quant_method": "gptq", "checkpoint_format": v.fmt,
            "use_exllama": True, "exllama_config": {"version": 1}, "dataset": None, "tokenizer": None,
            "use_cuda_fp16": False, "model_seqlen": None, "block_name_to_quantize": None,
            "module_name_preceding_first_block": None, "batch_size": 1, "pad_token_id": None,
            "max_input_length": None, "cache_block_outputs": True, "modules_in_block_to_quantize": None}


def _quantized_layer(K: int, N: int, v: Variant, gen: torch.Generator, bias: torch.Tensor | None,
                     bits: int | None = None):
    """Random codes/zeros/scales/g_idx, the packed checkpoint tensors and W [N, K]."""
    b = bits or v.bits
    g = K if v.group_size == -1 else v.group_size
    G = -(-K // g)
    q = torch.randint(0, 2 ** b, (K, N), generator=gen)
    if v.sym:
        z = torch.full((G, N), 2 ** (b - 1))
    elif v.fmt == "gptq":  # v1 stores z - 1: z = 0 cannot be stored
        z = torch.randint(1, 2 ** b, (G, N), generator=gen)
    else:
        z = torch.randint(0, 2 ** b, (G, N), generator=gen)
        z[0, :4] = 0  # the value v1 could not hold
        z[-1, -4:] = 2 ** b - 1
    scales = (torch.rand(G, N, generator=gen) * 0.04 / 2 ** (b - 2) + 0.002).half()
    if v.desc_act:
        perm = torch.randperm(K, generator=gen)
        invperm = torch.argsort(perm)
        g_idx = (invperm // g).to(torch.int32)
        assert G == 1 or not torch.equal(g_idx, (torch.arange(K) // g).to(torch.int32))
    else:
        g_idx = (torch.arange(K) // g).to(torch.int32)
    stored_z = z - 1 if v.fmt == "gptq" else z
    tensors = {
        "qweight": torch.from_numpy(pack_bits(q.numpy(), b, axis=0)),
        "qzeros": torch.from_numpy(pack_bits(stored_z.numpy(), b, axis=1)),
        "scales": scales,
        "g_idx": g_idx,
    }
    assert tensors["qweight"].shape == (K * b // 32, N) and tensors["qzeros"].shape == (G, N * b // 32)
    if bias is not None:
        tensors["bias"] = bias.detach().half()
    gl = g_idx.long()
    W_T = scales[gl].float() * (q[:, :].float() - z[gl].float())  # [K, N], w = scale * (q - z)
    return tensors, W_T.T.contiguous()


def build_peer_checkpoint(src: Path, out: Path, v: Variant, seed: int = 0, dynamic: dict | None = None):
    """Write a peer-style GPTQ checkpoint of the float model at `src` into `out`; return the
    float reference model holding the dequantized weights.

    dynamic: GPTQModel-style per-module rules, {"+:regex": {"bits": b}} or {"-:regex": {}}
    (skipped: the float weight is stored instead)."""
    import re
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    deq: dict[str, torch.Tensor] = {}
    qnames = [f"model.layers.{i}.{n}" for i in range(len(model.model.layers)) for n in LINEARS]
    if v.lm_head:
        qnames.append("lm_head")
    bits_of: dict[str, int] = {}
    for name in list(qnames):
        for rule, over in (dynamic or {}).items():
            if re.search(rule[2:], name):
                if rule.startswith("-:"):
                    qnames.remove(name)
                else:
                    bits_of[name] = over["bits"]
                break
    for name in qnames:
        lin = model.get_submodule(name)
        bias = lin.bias if lin.bias is not None or not v.zero_bias else torch.zeros(lin.out_features)
        tensors, W = _quantized_layer(lin.in_features, lin.out_features, v, gen, bias, bits_of.get(name))
        state.update({f"{name}.{k}": t for k, t in tensors.items()})
        deq[name] = W
    other_dtype = torch.float16 if v.producer == "autogptq" else torch.float32
    for k, t in model.state_dict().items():
        owner = k.rsplit(".", 1)[0]
        if owner not in deq:
            state[k] = t.detach().to(other_dtype).contiguous()
    out.mkdir(parents=True)
    cfg = model.config.to_dict()
    qc = _quant_config(v)
    if dynamic:
        qc["dynamic"] = dynamic
    cfg["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    if v.producer != "transformers":
        (out / "quantize_config.json").write_text(json.dumps(qc, indent=2))
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (src / f).is_file():
            (out / f).write_bytes((src / f).read_bytes())
    if v.producer == "autogptq":
        save_file(state, str(out / f"gptq_model-{v.bits}bit-{v.group_size}g.safetensors"), metadata={"format": "pt"})
    elif v.sharded:
        keys = sorted(state)
        half = len(keys) // 2
        files = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
        wm = {}
        for fname, ks in files.items():
            save_file({k: state[k] for k in ks}, str(out / fname), metadata={"format": "pt"})
            wm.update({k: fname for k in ks})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": wm}))
    else:
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})

    # reference: the float model with the same non-quantized tensors and W = scale·(q − z)
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        for k, p in ref.state_dict().items():
            if k in state and state[k].is_floating_point() and state[k].shape == p.shape:
                p.copy_(state[k].float())
        for name, W in deq.items():
            lin = ref.get_submodule(name)
            lin.weight.copy_(W)
            if lin.bias is not None:
                lin.bias.copy_(state[f"{name}.bias"].float())
    return ref, len(qnames)


def _ids() -> torch.Tensor:
    return torch.randint(4, 60, (2, 12), generator=torch.Generator().manual_seed(3))


def _assert_close_logits(got: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    err = (got.double() - ref.double()).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rel * scale + 1e-6, f"max |diff| {err:.3g} vs max |ref| {scale:.3g}"


@pytest.mark.parametrize("v", VARIANTS, ids=str)
def test_load_peer_checkpoint(v, tiny_llama_dir, tiny_llama_bias_dir, tmp_path):
    src = tiny_llama_bias_dir if v.bias else tiny_llama_dir
    out = tmp_path / "peer"
    ref, nq = build_peer_checkpoint(src, out, v)
    ids = _ids()
    with torch.no_grad():
        ref_logits = ref(ids).logits
    model = gptqkit.load(out, backend="torch")
    qls = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(qls) == nq
    assert all(m.bits == v.bits and m.checkpoint_format == v.fmt for m in qls.values())
    assert ("lm_head" in qls) == v.lm_head
    if v.bias or v.zero_bias:
        assert qls["model.layers.0.self_attn.q_proj"].bias is not None
    assert model.quantize_config.bits == v.bits and model.quantize_config.desc_act == v.desc_act
    with torch.no_grad():
        logits = model(ids).logits
    _assert_close_logits(logits, ref_logits)
    # and the model has not silently stayed the float one: quantized logits differ from fp
    from transformers import AutoModelForCausalLM
    fp = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (fp(ids).logits - ref_logits).abs().max() > 1e-2

    gen_kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=3)
    with torch.no_grad():
        got = model.generate(ids[:1], **gen_kw)
        want = ref.generate(ids[:1], **gen_kw)
    assert got.shape == (1, ids.shape[1] + 4)
    assert torch.equal(got, want)

    auto = gptqkit.load(out)  # default backend choice (cpu kernel where it applies)
    with torch.no_grad():
        _assert_close_logits(auto(ids).logits, ref_logits, rel=1e-3)
        assert auto.generate(ids[:1], **gen_kw).shape == (1, ids.shape[1] + 4)


def test_gptqmodel_dynamic_mixed_bits_and_skipped_layers(tiny_llama_dir, tmp_path):
    v = Variant("gptqmodel", "gptq", 4, 32, sym=False)
    out = tmp_path / "peer"
    dynamic = {"+:.*down_proj": {"bits": 8}, "+:.*layers\\.1\\..*gate_proj": {"bits": 2}, "-:.*o_proj": {}}
    ref, nq = build_peer_checkpoint(tiny_llama_dir, out, v, dynamic=dynamic)
    assert nq == 12
    model = gptqkit.load(out, backend="torch")
    qls = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(qls) == 12
    assert qls["model.layers.0.mlp.down_proj"].bits == 8 and qls["model.layers.1.mlp.gate_proj"].bits == 2
    assert qls["model.layers.0.mlp.gate_proj"].bits == 4
    assert isinstance(model.model.layers[0].self_attn.o_proj, nn.Linear)
    ids = _ids()
    with torch.no_grad():
        _assert_close_logits(model(ids).logits, ref(ids).logits)


def test_autogptq_single_file_name_without_index(tiny_llama_dir, tmp_path):
    v = Variant("autogptq", "gptq", 4, 32)
    out = tmp_path / "peer"
    build_peer_checkpoint(tiny_llama_dir, out, v)
    assert [p.name for p in out.glob("*.safetensors")] == ["gptq_model-4bit-32g.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()
    from gptqkit.formats.checkpoint import shard_files
    assert [p.name for p in shard_files(out)] == ["gptq_model-4bit-32g.safetensors"]


def test_qzeros_decoding_v1_vs_v2_differs(tiny_llama_dir, tmp_path):
    """The same tensors read as v1 and as v2 must differ: the format flag is honoured."""
    v = Variant("gptqmodel", "gptq_v2", 4, 32, sym=False)
    out = tmp_path / "peer"
    ref, _ = build_peer_checkpoint(tiny_llama_dir, out, v)
    for f in ("config.json", "quantize_config.json"):
        d = json.loads((out / f).read_text())
        qc = d.get("quantization_config", d)
        qc["format"] = "gptq"
        (out / f).write_text(json.dumps(d))
    model = gptqkit.load(out, backend="torch")
    ids = _ids()
    with torch.no_grad():
        diff = (model(ids).logits - ref(ids).logits).abs().max().item()
    assert diff > 1e-3


def test_cross_load_with_gptqmodel(tiny_llama_dir, tmp_path):
    pytest.importorskip("gptqmodel")
    from gptqmodel import GPTQModel  # pragma: no cover - not installed in CI

    v = Variant("gptqmodel", "gptq", 4, 32)
    peer = tmp_path / "peer"
    ref, _ = build_peer_checkpoint(tiny_llama_dir, peer, v)
    theirs = GPTQModel.load(str(peer), device="cpu")
    ours = gptqkit.load(peer, backend="torch")
    ids = _ids()
    with torch.no_grad():
        _assert_close_logits(ours(ids).logits, theirs(ids).logits.float(), rel=1e-2)
    out = tmp_path / "ours"
    gptqkit.quantize(tiny_llama_dir, ["hello world " * 20] * 4, out, bits=4, group_size=32, seqlen=32,
                     nsamples=4, progress=False)
    theirs = GPTQModel.load(str(out), device="cpu")
    ours = gptqkit.load(out, backend="torch")
    with torch.no_grad():
        _assert_close_logits(theirs(ids).logits.float(), ours(ids).logits, rel=1e-2)
