"""Compatibility layers: the AutoGPTQ and GPTQModel APIs, and PEFT LoRA on gptqkit models.

    from gptqkit.compat.auto_gptq import AutoGPTQForCausalLM, BaseQuantizeConfig
    from gptqkit.compat.gptqmodel import GPTQModel, QuantizeConfig

`alias_auto_gptq()` registers this layer as the module `auto_gptq` in the running interpreter
only (nothing is installed), so `from auto_gptq import ...` lines work unchanged. Do not call it in
a process that also loads GPTQ checkpoints through transformers' own GPTQ integration, which
would take the alias for the real package.
"""
from __future__ import annotations

import sys


def alias_auto_gptq() -> None:
    """Make `import auto_gptq` resolve to gptqkit.compat.auto_gptq in this interpreter."""
    from . import auto_gptq
    sys.modules.setdefault("auto_gptq", auto_gptq)
