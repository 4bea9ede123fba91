"""LoRA (PEFT) on top of gptqkit's QuantLinear.

PEFT chooses a LoRA layer by the type of the module it wraps; its built-in GPTQ path only knows
GPTQModel's classes. `lora_config(...)` (or `register_quantlinear(cfg)` on your own LoraConfig)
maps gptqkit's QuantLinear to PEFT's GPTQLoraLinear, which adds the adapter's output to the
QuantLinear's. The packed weights are buffers, so they stay frozen; QuantLinear.forward uses the
differentiable torch reference path whenever its input needs a gradient.

    from gptqkit.compat.peft import lora_config
    from peft import get_peft_model, PeftModel
    model = gptqkit.load(qdir)
    cfg = lora_config(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)          # train as usual
    peft_model.save_pretrained(adapter_dir)
    model = PeftModel.from_pretrained(gptqkit.load(qdir), adapter_dir, config=register_quantlinear(
        LoraConfig.from_pretrained(adapter_dir)))
"""
from __future__ import annotations

from typing import Any


def register_quantlinear(config):
    """Register gptqkit's QuantLinear -> PEFT's GPTQLoraLinear on a LoraConfig; returns the config."""
    from peft.tuners.lora.gptq import GPTQLoraLinear

    from ..kernels.qlinear import QuantLinear
    config._register_custom_module({QuantLinear: GPTQLoraLinear})
    return config


def lora_config(**kwargs: Any):
    """peft.LoraConfig(**kwargs) that can target QuantLinear layers."""
    from peft import LoraConfig
    return register_quantlinear(LoraConfig(**kwargs))


def load_adapter(model, adapter_dir, **kwargs):
    """PeftModel.from_pretrained for a gptqkit model (registers QuantLinear first)."""
    from peft import LoraConfig, PeftModel
    cfg = register_quantlinear(LoraConfig.from_pretrained(str(adapter_dir)))
    return PeftModel.from_pretrained(model, str(adapter_dir), config=cfg, **kwargs)
