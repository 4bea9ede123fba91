"""GPTQModel (>= 4) writes the solver settings under quantize_config.json's "meta"."""
from gptqkit.config import QuantizeConfig

GPTQMODEL_7_7 = {
    "bits": 4, "group_size": 128, "desc_act": True, "lm_head": False, "method": "gptq", "quant_method": "gptq",
    "format": "gptq", "checkpoint_format": "gptq", "pack_dtype": "int32", "sym": True,
    "meta": {"quantizer": ["gptqmodel:7.7.0"], "damp_percent": 0.05, "damp_auto_increment": 0.01,
             "static_groups": True, "true_sequential": False, "mse": 2.4, "act_group_aware": False},
}


def test_settings_read_from_meta():
    c = QuantizeConfig.from_dict(GPTQMODEL_7_7)
    assert (c.damp_percent, c.damp_auto_increment, c.static_groups, c.true_sequential, c.mse) == \
        (0.05, 0.01, True, False, True)
    assert c.desc_act and c.checkpoint_format == "gptq"


def test_top_level_wins_over_meta():
    d = dict(GPTQMODEL_7_7, damp_percent=0.02, static_groups=False)
    c = QuantizeConfig.from_dict(d)
    assert c.damp_percent == 0.02 and c.static_groups is False
