"""Mixture of experts: fused 3-D expert weights are unfused into one Linear per expert, each
expert is calibrated on exactly the tokens routed to it, and experts with no or few tokens
still get a sound, logged quantization (never a NaN, never a silently skipped layer)."""
from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from torch import nn

from _arch_helpers import build_tiny, calib_ids, fake_quant_reference, one_thread, quantize_dir, roundtrip  # noqa: F401

V = 128
MIXTRAL = dict(vocab_size=V, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2,
               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _expert_rows(qdir):
    log = json.loads((qdir / "quant_log.json").read_text())
    return [r for r in log["layers"] if ".experts." in r["name"]]


def test_experts_see_only_their_routed_tokens(tmp_path):
    src = build_tiny("mixtral", tmp_path / "src", **MIXTRAL)
    ids = calib_ids(V)
    quantize_dir(src, tmp_path / "q", ids)
    rows = _expert_rows(tmp_path / "q")
    assert len(rows) == 2 * 4 * 3  # layers x experts x (gate, up, down)
    for layer in range(2):
        gate = [r for r in rows if f"layers.{layer}." in r["name"] and r["name"].endswith("gate_proj")]
        # every token goes to exactly top_k = 2 experts
        assert sum(r["tokens"] for r in gate) == ids.numel() * 2
        assert all(0 < r["tokens"] < ids.numel() for r in gate)
        for r in gate:  # gate and up share the routed input; down sees the same tokens
            up = next(x for x in rows if x["name"] == r["name"].replace("gate_proj", "up_proj"))
            down = next(x for x in rows if x["name"] == r["name"].replace("gate_proj", "down_proj"))
            assert up["tokens"] == down["tokens"] == r["tokens"]


def _starve_experts_1_and_2(model):
    """Top-1 router whose logits are c_e·(v·x) with c = (1, .5, .25, -1): experts 1 and 2 never win."""
    for layer in model.model.layers:
        w = layer.mlp.gate.weight
        v = torch.randn(w.shape[1])
        w.copy_(torch.stack([v, 0.5 * v, 0.25 * v, -v]))


def test_unrouted_experts_fall_back_to_rtn_and_say_so(tmp_path, caplog):
    src = build_tiny("mixtral", tmp_path / "src", init=_starve_experts_1_and_2,
                     **{**MIXTRAL, "num_experts_per_tok": 1})
    with caplog.at_level(logging.WARNING, logger="gptqkit"):
        r = roundtrip(src, tmp_path / "q", V)
    rows = {x["name"]: x for x in _expert_rows(tmp_path / "q")}
    for layer in range(2):
        for e in range(4):
            for p in ("gate_proj", "up_proj", "down_proj"):
                row = rows[f"model.layers.{layer}.mlp.experts.{e}.{p}"]
                if e in (1, 2):
                    assert row["tokens"] == 0 and row["method"] == "rtn-no-tokens", row
                    assert f"experts.{e}.{p} received no calibration tokens" in caplog.text
                else:
                    assert row["tokens"] > 0 and row["method"] == "gptq", row
                assert row["loss"] == row["loss"]  # not NaN
    for m in r["model"].modules():  # every expert loaded quantized, no NaN anywhere
        if hasattr(m, "scales"):
            assert torch.isfinite(m.scales.float()).all()


def test_experts_with_few_tokens_use_rtn(tmp_path, caplog, monkeypatch):
    from gptqkit.pipeline import linears
    src = build_tiny("mixtral", tmp_path / "src", **MIXTRAL)
    ids = calib_ids(V)
    quantize_dir(src, tmp_path / "q0", ids)
    counts = sorted({r["tokens"] for r in _expert_rows(tmp_path / "q0")})
    assert len(counts) > 1
    threshold = counts[len(counts) // 2]  # half the experts fall below it
    monkeypatch.setattr(linears, "MIN_GPTQ_TOKENS", threshold)
    with caplog.at_level(logging.WARNING, logger="gptqkit"):
        quantize_dir(src, tmp_path / "q", ids)
    rows = _expert_rows(tmp_path / "q")
    few = [r for r in rows if r["tokens"] < threshold]
    assert few and len(few) < len(rows)
    for r in rows:
        assert r["method"] == ("rtn-few-tokens" if r["tokens"] < threshold else "gptq"), r
        assert r["loss"] == r["loss"]
    for r in few:
        assert f"{r['name']} received only {r['tokens']} calibration tokens" in caplog.text


def test_chunked_calibration_matches_single_batch(tmp_path):
    """Chunks route differently; the replay must still give every expert all its tokens."""
    from gptqkit.formats.checkpoint import iter_tensors
    src = build_tiny("mixtral", tmp_path / "src", **MIXTRAL)
    ids = calib_ids(V)
    quantize_dir(src, tmp_path / "one", ids)
    from gptqkit import QuantizeConfig
    from gptqkit.pipeline import quantize_model
    from gptqkit.models.source import ModelHandle
    quantize_model(ModelHandle(src), ids, QuantizeConfig(bits=4, group_size=32), tmp_path / "chunked",
                   batch_size=1, progress=False)
    a, b = dict(iter_tensors(tmp_path / "one")), dict(iter_tensors(tmp_path / "chunked"))
    assert a.keys() == b.keys()
    ta = {r["name"]: r["tokens"] for r in _expert_rows(tmp_path / "one")}
    tb = {r["name"]: r["tokens"] for r in _expert_rows(tmp_path / "chunked")}
    assert ta == tb  # every expert got all its routed tokens, from every chunk
    # block 0 sees identical inputs in both modes: same solutions up to summation order (GPTQ's
    # rounding cascades, so later blocks drift apart in dense models too)
    for k in a:
        if k.startswith("model.layers.0.") and k.endswith(".qweight"):
            assert (a[k] == b[k]).float().mean() > 0.98, k


# ------------------------------------------------------------------ unfusing, module level
def _experts_of(model_type, **kw):
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw), dtype=torch.float32)
    for name, mod in m.named_modules():
        if name.endswith("mlp.experts"):
            with torch.no_grad():
                for p in mod.parameters():
                    p.normal_(0, 0.1)
            return mod
    raise AssertionError("no experts module")


@pytest.mark.parametrize("model_type,kw", [
    ("mixtral", MIXTRAL),
    ("gpt_oss", dict(vocab_size=V, hidden_size=64, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2)),
])
def test_unfused_forward_equals_fused(model_type, kw):
    """Layouts: concatenated [gate; up] (Mixtral) and interleaved, transposed, with biases and a
    custom clamped gate (gpt-oss)."""
    from transformers import CONFIG_MAPPING
    from gptqkit.models.moe import UnfusedExperts, unfuse_experts
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"no {model_type}")
    fused = _experts_of(model_type, **kw)
    holder = nn.Module()
    holder.experts = copy.deepcopy(fused)
    removed = unfuse_experts(holder)
    assert isinstance(holder.experts, UnfusedExperts) and len(holder.experts) == 4
    assert {r.split(".")[-1] for r in removed} >= {"down_proj"}
    assert not any(p.dim() == 3 for p in holder.parameters())
    T, k = 24, 2
    x = torch.randn(T, 64)
    idx = torch.stack([torch.randperm(4)[:k] for _ in range(T)])
    idx[:, :][idx == 3] = 2  # expert 3 unrouted
    idx[:, 1] = torch.where(idx[:, 1] == idx[:, 0], (idx[:, 0] + 1) % 3, idx[:, 1])
    w = torch.softmax(torch.randn(T, k), -1)
    with torch.no_grad():
        torch.testing.assert_close(holder.experts(x, idx, w), fused(x, idx, w), rtol=1e-5, atol=1e-6)


def test_unknown_fused_layout_is_reported_not_skipped_silently(caplog):
    from gptqkit.models.moe import unfuse_experts

    class OddExperts(nn.Module):
        def __init__(self):
            super().__init__()
            self.w_in = nn.Parameter(torch.zeros(4, 8, 16))

    root = nn.Module()
    root.experts = OddExperts()
    with caplog.at_level(logging.WARNING, logger="gptqkit"):
        assert unfuse_experts(root, "model.layers.0.mlp") == []
    assert "fused experts (OddExperts) are NOT quantized" in caplog.text
    assert "model.layers.0.mlp.experts" in caplog.text
