"""QuantizeConfig: validation messages, serialization, peer spellings, dynamic per-module rules."""
from __future__ import annotations

import json

import pytest

from gptqkit.config import QuantizeConfig
from gptqkit.errors import CheckpointError, ConfigError


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("bits", [1, 5, 6, 16])
def test_bad_bits_names_allowed_values(bits):
    with pytest.raises(ConfigError) as e:
        QuantizeConfig(bits=bits)
    msg = str(e.value)
    assert f"bits={bits}" in msg
    for b in (2, 3, 4, 8):
        assert str(b) in msg


@pytest.mark.parametrize("gs", [0, -2, -128])
def test_bad_group_size(gs):
    with pytest.raises(ConfigError, match="-1") as e:
        QuantizeConfig(group_size=gs)
    assert f"group_size={gs}" in str(e.value)


def test_bad_checkpoint_format_names_allowed_values():
    with pytest.raises(ConfigError) as e:
        QuantizeConfig(checkpoint_format="marlin")
    msg = str(e.value)
    assert "'marlin'" in msg and "'gptq'" in msg and "'gptq_v2'" in msg


def test_bad_method_names_allowed_values():
    with pytest.raises(ConfigError) as e:
        QuantizeConfig(method="awq")
    msg = str(e.value)
    assert "'awq'" in msg and "'gptq'" in msg and "'rtn'" in msg


@pytest.mark.parametrize("kw", [dict(damp_percent=-0.1), dict(damp_percent=1.5),
                                dict(damp_auto_increment=0.0), dict(blocksize=0)])
def test_other_bad_values(kw):
    with pytest.raises(ConfigError):
        QuantizeConfig(**kw)


def test_config_error_is_value_error():
    with pytest.raises(ValueError):
        QuantizeConfig(bits=7)


def test_valid_values_accepted():
    for bits in (2, 3, 4, 8):
        for gs in (-1, 32, 128):
            c = QuantizeConfig(bits=bits, group_size=gs)
            assert (c.bits, c.group_size) == (bits, gs)
    assert QuantizeConfig(damp_percent=0.0).damp_percent == 0.0
    assert QuantizeConfig(checkpoint_format="gptq_v2", method="rtn").method == "rtn"
    # one group per row makes static groups meaningless: normalized away
    assert QuantizeConfig(group_size=-1, static_groups=True).static_groups is False
    assert QuantizeConfig(group_size=64, static_groups=True).static_groups is True


def test_defaults():
    c = QuantizeConfig()
    assert (c.bits, c.group_size, c.sym, c.desc_act, c.static_groups, c.checkpoint_format, c.method) == \
        (4, 128, True, True, True, "gptq", "gptq")


# --------------------------------------------------------------------------- serialization
def test_to_dict_has_the_fields_peers_need():
    d = QuantizeConfig(bits=3, group_size=64, checkpoint_format="gptq_v2").to_dict()
    for key in ("bits", "group_size", "desc_act", "sym", "static_groups", "damp_percent",
                "true_sequential", "quant_method", "checkpoint_format", "meta"):
        assert key in d, key
    assert d["quant_method"] == "gptq"
    assert d["checkpoint_format"] == "gptq_v2"
    assert d["bits"] == 3 and d["group_size"] == 64
    assert any(str(q).startswith("gptqkit") for q in d["meta"]["quantizer"])
    json.dumps(d)  # JSON-serializable


@pytest.mark.parametrize("kw", [
    dict(),
    dict(bits=3, group_size=64, sym=False, desc_act=True, mse=True, checkpoint_format="gptq_v2"),
    dict(bits=8, group_size=-1, damp_percent=0.1, damp_auto_increment=0.01, true_sequential=False,
         lm_head=True, method="rtn", blocksize=64),
    dict(bits=3, group_size=64, solve_order="groups"),
    dict(bits=2, group_size=32, static_groups=True, desc_act=True,
         dynamic={r"+:.*\.1\..*": {"bits": 8, "group_size": 32}, r"-:.*lm_head": {}},
         meta={"note": "x"}),
])
def test_round_trip(kw, tmp_path):
    c = QuantizeConfig(**kw)
    assert QuantizeConfig.from_dict(c.to_dict()) == c
    assert QuantizeConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    c.save(tmp_path)
    assert (tmp_path / "quantize_config.json").is_file()
    assert QuantizeConfig.load(tmp_path) == c


def test_load_from_config_json(tmp_path):
    c = QuantizeConfig(bits=4, group_size=32, sym=False)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama",
                                                      "quantization_config": c.to_dict()}))
    assert QuantizeConfig.load(tmp_path) == c


def test_load_missing_or_broken(tmp_path):
    with pytest.raises(CheckpointError):
        QuantizeConfig.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="quantization"):
        QuantizeConfig.load(tmp_path)
    (tmp_path / "quantize_config.json").write_text("{not json")
    with pytest.raises(CheckpointError):
        QuantizeConfig.load(tmp_path)


# --------------------------------------------------------------------------- peer spellings
def test_from_dict_autogptq_spelling():
    d = {"bits": 4, "group_size": 128, "damp_percent": 0.01, "desc_act": True, "static_groups": False,
         "sym": True, "true_sequential": True, "model_name_or_path": None,
         "model_file_base_name": "model", "quant_method": "gptq", "checkpoint_format": "gptq"}
    c = QuantizeConfig.from_dict(d)
    assert (c.bits, c.group_size, c.desc_act, c.sym, c.checkpoint_format) == (4, 128, True, True, "gptq")
    # very old AutoGPTQ files carry neither quant_method nor checkpoint_format: v1 gptq
    old = {"bits": 3, "group_size": -1, "damp_percent": 0.01, "desc_act": False, "sym": False,
           "true_sequential": True}
    c = QuantizeConfig.from_dict(old)
    assert (c.bits, c.group_size, c.sym, c.checkpoint_format) == (3, -1, False, "gptq")


def test_from_dict_gptqmodel_spelling():
    d = {"bits": 4, "group_size": 64, "desc_act": False, "sym": False, "lm_head": False,
         "quant_method": "gptq", "format": "gptq_v2", "pack_dtype": "int32",
         "dynamic": {r"+:.*\.18\..*gate.*": {"bits": 8, "group_size": 32}, r"-:.*\.3\..*": {}},
         "meta": {"quantizer": ["gptqmodel:2.0.0"], "uri": "https://github.com/modelcloud/gptqmodel",
                  "damp_percent": 0.01, "damp_auto_increment": 0.0025},
         "mse": 2.4}
    c = QuantizeConfig.from_dict(d)
    assert c.checkpoint_format == "gptq_v2"
    assert c.group_size == 64 and c.sym is False and c.mse is True
    assert c.dynamic == d["dynamic"]
    assert c.for_module("model.layers.3.mlp.up_proj") is None
    sub = c.for_module("model.layers.18.mlp.gate_proj")
    assert sub is not None and (sub.bits, sub.group_size) == (8, 32)
    # checkpoint_format wins over format when both are present
    d2 = dict(d, checkpoint_format="gptq")
    assert QuantizeConfig.from_dict(d2).checkpoint_format == "gptq"


def test_from_dict_hf_spelling():
    d = {"bits": 4, "tokenizer": None, "dataset": None, "group_size": 128, "damp_percent": 0.1,
         "desc_act": False, "sym": True, "true_sequential": True, "use_cuda_fp16": False,
         "model_seqlen": None, "block_name_to_quantize": None, "module_name_preceding_first_block": None,
         "batch_size": 1, "pad_token_id": None, "use_exllama": True, "max_input_length": None,
         "exllama_config": {"version": 1}, "cache_block_outputs": True,
         "modules_in_block_to_quantize": None, "checkpoint_format": "gptq", "meta": None,
         "backend": None, "quant_method": "gptq"}
    c = QuantizeConfig.from_dict(d)
    assert (c.bits, c.group_size, c.damp_percent, c.checkpoint_format) == (4, 128, 0.1, "gptq")
    assert QuantizeConfig.from_dict(dict(d, quant_method="GPTQ")).bits == 4


@pytest.mark.parametrize("qm", ["awq", "bitsandbytes", "exl2"])
def test_unknown_quant_method_raises(qm):
    with pytest.raises(CheckpointError, match=qm):
        QuantizeConfig.from_dict({"bits": 4, "group_size": 128, "quant_method": qm})


@pytest.mark.parametrize("key", ["checkpoint_format", "format"])
@pytest.mark.parametrize("fmt", ["marlin", "bitblas", "gptq_v3"])
def test_unknown_checkpoint_format_raises(key, fmt):
    with pytest.raises(CheckpointError, match=fmt):
        QuantizeConfig.from_dict({"bits": 4, "group_size": 128, "quant_method": "gptq", key: fmt})


def test_marlin_flag_and_missing_bits_raise():
    with pytest.raises(CheckpointError, match="Marlin"):
        QuantizeConfig.from_dict({"bits": 4, "group_size": 128, "is_marlin_format": True})
    with pytest.raises(CheckpointError, match="bits"):
        QuantizeConfig.from_dict({"group_size": 128, "quant_method": "gptq"})


# --------------------------------------------------------------------------- dynamic rules
def test_for_module_rules():
    c = QuantizeConfig(bits=4, group_size=128, dynamic={
        r"-:.*\.0\.self_attn\..*": {},
        r"+:.*\.0\..*": {"bits": 8},
        r".*down_proj": {"bits": 3, "group_size": 32, "sym": False},
    })
    assert c.for_module("model.layers.0.self_attn.q_proj") is None
    m0 = c.for_module("model.layers.0.mlp.up_proj")
    assert (m0.bits, m0.group_size) == (8, 128)
    assert m0.dynamic is None
    d = c.for_module("model.layers.5.mlp.down_proj")  # no prefix = positive override
    assert (d.bits, d.group_size, d.sym) == (3, 32, False)
    # first matching rule wins
    assert c.for_module("model.layers.0.mlp.down_proj").bits == 8
    # no rule: the config itself
    assert c.for_module("model.layers.5.mlp.up_proj") is c
    plain = QuantizeConfig()
    assert plain.for_module("anything") is plain
    # rules match anywhere in the name (re.search)
    assert QuantizeConfig(dynamic={"-:lm_head": {}}).for_module("model.lm_head") is None


def test_dynamic_rules_validated():
    with pytest.raises(ConfigError, match="regex"):
        QuantizeConfig(dynamic={"+:model.(layers": {"bits": 8}})
    with pytest.raises(ConfigError, match="unknown keys"):
        QuantizeConfig(dynamic={"+:.*": {"bitz": 8}})
    with pytest.raises(ConfigError, match="bits"):
        QuantizeConfig(dynamic={"+:.*": {"bits": 5}})
    with pytest.raises(ConfigError, match="group_size"):
        QuantizeConfig(dynamic={".*": {"group_size": 0}})
    QuantizeConfig(dynamic={"-:.*": {}})  # negative rules carry no overrides


def test_solve_order():
    assert QuantizeConfig().solve_order == "columns"
    assert "solve_order" not in QuantizeConfig().to_dict()["meta"]  # the default's file is unchanged
    c = QuantizeConfig(solve_order="groups")
    assert c.to_dict()["meta"]["solve_order"] == "groups"
    with pytest.raises(ConfigError, match="solve_order='cols' is unknown"):
        QuantizeConfig(solve_order="cols")
    for kw in (dict(desc_act=False), dict(static_groups=False)):
        with pytest.raises(ConfigError, match="desc_act=True and static_groups=True"):
            QuantizeConfig(solve_order="groups", **kw)
    # one group per row: the orders coincide, so it is accepted as the default order
    assert QuantizeConfig(group_size=-1, solve_order="groups").solve_order == "columns"
