"""AutoGPTQ's API on top of gptqkit: change the import line of an AutoGPTQ script and it runs.

    from gptqkit.compat.auto_gptq import AutoGPTQForCausalLM, BaseQuantizeConfig

    quantize_config = BaseQuantizeConfig(bits=4, group_size=128, desc_act=False)
    model = AutoGPTQForCausalLM.from_pretrained(pretrained_model_dir, quantize_config)
    model.quantize(examples)                  # list of tokenizer(...) outputs
    model.save_quantized(quantized_model_dir, use_safetensors=True)
    model = AutoGPTQForCausalLM.from_quantized(quantized_model_dir, device="cuda:0")

Arguments that only tune AutoGPTQ's own kernels (use_triton, use_cuda_fp16, inject_fused_*,
disable_exllama, warmup_triton, ...) are accepted and ignored: gptqkit picks its kernel per layer
and device. `device="cuda:0"` on a machine without CUDA loads on the CPU with a warning.
Checkpoints are always written as safetensors; `use_safetensors=False` is accepted with a warning.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import QuantizeConfig
from ._base import CompatModel, pick_device

log = logging.getLogger(__name__)

__all__ = ["AutoGPTQForCausalLM", "BaseQuantizeConfig", "BaseGPTQForCausalLM"]


@dataclass
class BaseQuantizeConfig:
    """AutoGPTQ's quantize config, with AutoGPTQ's defaults (group_size=-1, desc_act=True)."""
    bits: int = 4
    group_size: int = -1
    damp_percent: float = 0.01
    desc_act: bool = True
    static_groups: bool = False
    sym: bool = True
    true_sequential: bool = True
    quant_method: str = "gptq"
    checkpoint_format: str = "gptq"
    model_name_or_path: Optional[str] = None
    model_file_base_name: Optional[str] = None
    awq_gemm_checkpoint: Optional[bool] = False
    is_marlin_format: bool = False
    meta: dict = field(default_factory=dict)

    def to_gptqkit(self) -> QuantizeConfig:
        return QuantizeConfig(bits=self.bits, group_size=self.group_size, damp_percent=self.damp_percent,
                              desc_act=self.desc_act, static_groups=self.static_groups, sym=self.sym,
                              true_sequential=self.true_sequential, checkpoint_format=self.checkpoint_format,
                              meta=dict(self.meta))

    def to_dict(self) -> dict[str, Any]:
        return self.to_gptqkit().to_dict()

    def save_pretrained(self, save_dir: str | Path) -> None:
        self.to_gptqkit().save(save_dir)

    @classmethod
    def from_pretrained(cls, save_dir: str | Path, **kwargs) -> "BaseQuantizeConfig":
        q = QuantizeConfig.load(save_dir)
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in q.__dict__.items() if k in names}
        d.update({k: v for k, v in kwargs.items() if k in names})
        return cls(**d)


def _as_config(qc: Any) -> QuantizeConfig | None:
    if qc is None or isinstance(qc, QuantizeConfig):
        return qc
    if isinstance(qc, BaseQuantizeConfig):
        return qc.to_gptqkit()
    if isinstance(qc, dict):
        return QuantizeConfig.from_dict({"quant_method": "gptq", **qc})
    raise TypeError(f"quantize_config must be a BaseQuantizeConfig, gptqkit.QuantizeConfig or dict, "
                    f"got {type(qc).__name__}")


def _dtype(torch_dtype: Any) -> torch.dtype | None:
    if torch_dtype in (None, "auto"):
        return None
    return getattr(torch, torch_dtype) if isinstance(torch_dtype, str) else torch_dtype


class BaseGPTQForCausalLM(CompatModel):
    """What AutoGPTQForCausalLM.from_pretrained / from_quantized return."""

    def quantize(self, examples, batch_size: int = 1, use_triton: bool = False, use_cuda_fp16: bool = True,
                 autotune_warmup_after_quantized: bool = False, cache_examples_on_gpu: bool = True):
        """Quantize on `examples` (a list of tokenizer outputs: dicts with input_ids[, attention_mask])."""
        return self._quantize(examples, batch_size)

    def save_quantized(self, save_dir: str | Path, use_safetensors: bool = True,
                       safetensors_metadata: Optional[dict] = None, max_shard_size: Optional[str] = None,
                       model_base_name: Optional[str] = None) -> None:
        if not use_safetensors:
            warnings.warn("gptqkit always writes safetensors; use_safetensors=False is ignored", stacklevel=2)
        if model_base_name:
            log.info("model_base_name=%r ignored: gptqkit names its shards model*.safetensors", model_base_name)
        self._save(save_dir)

    def save_pretrained(self, save_dir: str | Path, **kwargs) -> None:
        """AutoGPTQ: alias of save_quantized once quantized."""
        if self.quantized:
            self.save_quantized(save_dir, **{k: v for k, v in kwargs.items() if k == "use_safetensors"})
        else:
            self.model.save_pretrained(save_dir, **kwargs)

    def push_to_hub(self, repo_id: str, save_dir: Optional[str] = None, use_safetensors: bool = True,
                    commit_message: str = "Upload of AutoGPTQ quantized model", use_auth_token: Any = None,
                    private: bool = False, token: Any = None, create_pr: bool = False, **kwargs):
        from ..hub import push_to_hub
        if save_dir is not None:
            self.save_quantized(save_dir, use_safetensors=use_safetensors)
        if self._qdir is None:
            raise RuntimeError("quantize and save the model before pushing it")
        return push_to_hub(self._qdir, repo_id, token=token or (use_auth_token if isinstance(use_auth_token, str)
                                                               else None),
                           private=private, commit_message=commit_message, create_pr=create_pr)


class AutoGPTQForCausalLM:
    """Factory with AutoGPTQ's class methods; never instantiated."""

    def __init__(self):
        raise EnvironmentError("AutoGPTQForCausalLM is designed to be instantiated using "
                               "from_pretrained(...) or from_quantized(...)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, quantize_config: Any,
                        max_memory: Optional[dict] = None, trust_remote_code: bool = False,
                        torch_dtype: Any = None, **model_init_kwargs) -> BaseGPTQForCausalLM:
        """Remember a float model (folder or hub id) to quantize with `quantize_config`."""
        from ..api import resolve_model
        from ..models.source import resolve_model_path
        path = resolve_model_path(resolve_model(pretrained_model_name_or_path))
        return BaseGPTQForCausalLM(path, _as_config(quantize_config), trust_remote_code=trust_remote_code,
                                   dtype=_dtype(torch_dtype))

    @classmethod
    def from_quantized(cls, model_name_or_path: str, device_map: Any = None, max_memory: Optional[dict] = None,
                       device: Any = None, low_cpu_mem_usage: bool = False, use_triton: bool = False,
                       use_qigen: bool = False, use_marlin: bool = False, torch_dtype: Any = None,
                       use_cuda_fp16: bool = True, quantize_config: Any = None, model_basename: Optional[str] = None,
                       use_safetensors: bool = True, trust_remote_code: bool = False, warmup_triton: bool = False,
                       trainable: bool = False, disable_exllama: Optional[bool] = None,
                       disable_exllamav2: bool = False, use_tritonv2: bool = False,
                       checkpoint_format: Optional[str] = None, inject_fused_attention: bool = False,
                       inject_fused_mlp: bool = False, backend: Optional[str] = None,
                       **kwargs) -> BaseGPTQForCausalLM:
        """Load a GPTQ checkpoint (gptqkit's, AutoGPTQ's or GPTQModel's) for inference."""
        from ..api import load
        from ..models.source import resolve_model_path
        if kwargs:
            log.info("from_quantized: ignoring AutoGPTQ arguments %s", sorted(kwargs))
        path = resolve_model_path(model_name_or_path)
        dev = pick_device(device, device_map)
        if backend is None and (use_triton or use_tritonv2) and dev.startswith("cuda"):
            backend = "triton"
        model = load(path, backend=backend, device=dev, dtype=_dtype(torch_dtype),
                     trust_remote_code=trust_remote_code)
        if trainable:
            model.train()
        w = BaseGPTQForCausalLM(path, model.quantize_config, model=model, trust_remote_code=trust_remote_code,
                                device=dev, dtype=_dtype(torch_dtype), backend=backend)
        w._qdir = path
        return w

