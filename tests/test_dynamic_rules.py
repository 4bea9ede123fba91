"""Mixed precision per module: QuantizeConfig.dynamic (GPTQModel's spelling) sets bits/group size
per layer or leaves a layer in full precision; it is written into the checkpoint and the loader
honours it (which modules are quantized from the tensors, bits from the qweight shape, group
size from the rule and the scales)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from _arch_helpers import build_tiny, one_thread, roundtrip  # noqa: F401
from test_architectures import CASES

V = 128
DYNAMIC = {
    r"-:.*self_attn\.o_proj$": {},                                   # full precision
    r"+:.*mlp\.(gate|up)_proj$": {"bits": 8, "group_size": 32},
    r"+:.*layers\.1\.mlp\.down_proj$": {"bits": 3, "group_size": 64},
    r".*layers\.0\.self_attn\.q_proj$": {"bits": 2, "group_size": 16},  # no prefix = "+:"
}


def test_dynamic_rules_roundtrip(tmp_path):
    from gptqkit.formats.checkpoint import iter_tensors
    from gptqkit.kernels.qlinear import QuantLinear
    src = build_tiny("llama", tmp_path / "src", **CASES["llama"])
    r = roundtrip(src, tmp_path / "q", V, bits=4, group_size=32, dynamic=DYNAMIC)
    q = tmp_path / "q"
    cfg = json.loads((q / "config.json").read_text())["quantization_config"]
    assert cfg["dynamic"] == DYNAMIC
    assert json.loads((q / "quantize_config.json").read_text())["dynamic"] == DYNAMIC
    t = dict(iter_tensors(q))
    model = r["model"]
    expect = {  # name inside a block -> (bits, group size, K)
        "self_attn.k_proj": (4, 32, 64), "self_attn.v_proj": (4, 32, 64),
        "mlp.gate_proj": (8, 32, 64), "mlp.up_proj": (8, 32, 64),
    }
    for i in range(2):
        p = f"model.layers.{i}."
        # skipped: plain float weight in the checkpoint, nn.Linear after loading
        assert f"{p}self_attn.o_proj.weight" in t and f"{p}self_attn.o_proj.qweight" not in t
        assert type(model.get_submodule(f"{p}self_attn.o_proj")) is nn.Linear
        want = dict(expect)
        want["self_attn.q_proj"] = (2, 16, 64) if i == 0 else (4, 32, 64)
        want["mlp.down_proj"] = (3, 64, 128) if i == 1 else (4, 32, 128)
        for n, (bits, gs, K) in want.items():
            m = model.get_submodule(p + n)
            assert isinstance(m, QuantLinear), n
            assert (m.bits, m.group_size) == (bits, gs), (p + n, m.bits, m.group_size)
            assert t[f"{p}{n}.qweight"].shape[0] == K * bits // 32
            assert t[f"{p}{n}.scales"].shape[0] == K // gs
            assert torch.equal(t[f"{p}{n}.g_idx"].long(), torch.arange(K) // gs)
    log = {x.name: x for x in r["report"].layers}
    assert log["model.layers.1.mlp.down_proj"].bits == 3 and log["model.layers.1.mlp.down_proj"].group_size == 64
    assert "model.layers.0.self_attn.o_proj" not in log


def test_dynamic_rules_on_moe_experts(tmp_path):
    """Rules address single experts by their unfused names."""
    from gptqkit.kernels.qlinear import QuantLinear
    from test_moe import MIXTRAL
    dyn = {r"-:.*experts\.0\.down_proj$": {}, r"+:.*experts\.1\.": {"bits": 8, "group_size": 64}}
    src = build_tiny("mixtral", tmp_path / "src", **MIXTRAL)
    r = roundtrip(src, tmp_path / "q", V, dynamic=dyn)
    m = r["model"]
    for i in range(2):
        e = f"model.layers.{i}.mlp.experts"
        assert type(m.get_submodule(f"{e}.0.down_proj")) is nn.Linear
        assert isinstance(m.get_submodule(f"{e}.0.up_proj"), QuantLinear)
        ql = m.get_submodule(f"{e}.1.gate_proj")
        assert (ql.bits, ql.group_size) == (8, 64)
        ql = m.get_submodule(f"{e}.2.gate_proj")
        assert (ql.bits, ql.group_size) == (4, 32)


def test_dynamic_rule_that_does_not_fit_fails_early(tmp_path):
    from gptqkit.errors import ConfigError
    from _arch_helpers import calib_ids, quantize_dir
    src = build_tiny("llama", tmp_path / "src", **{**CASES["llama"], "intermediate_size": 80})
    with pytest.raises(ConfigError, match="multiple of 32"):  # down_proj K=80 cannot pack 3-bit
        quantize_dir(src, tmp_path / "q", calib_ids(V), dynamic={r"+:.*down_proj$": {"bits": 3}})
