"""`from gptqkit.compat.auto_gptq import AutoGPTQForCausalLM, BaseQuantizeConfig`: the module path
that mirrors `auto_gptq`, so an AutoGPTQ script needs only its import line changed."""
from .autogptq import AutoGPTQForCausalLM, BaseGPTQForCausalLM, BaseQuantizeConfig  # noqa: F401

__all__ = ["AutoGPTQForCausalLM", "BaseQuantizeConfig", "BaseGPTQForCausalLM"]
