"""GPTQModel's API on top of gptqkit:

    from gptqkit.compat.gptqmodel import GPTQModel, QuantizeConfig

    model = GPTQModel.load(model_id, QuantizeConfig(bits=4, group_size=128))
    model.quantize(calibration_dataset, batch_size=1)   # list of strings (or tokenized dicts)
    model.save(quant_path)
    model = GPTQModel.load(quant_path)                   # inference
    tokens = model.generate("Uncovering deep insights begins with")[0]
    print(model.tokenizer.decode(tokens))

Kernel/backend arguments GPTQModel takes (backend=BACKEND.*, device_map, ...) are accepted;
gptqkit picks its own kernel per layer and device ("torch", "cpu", "triton" may be named).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import QuantizeConfig as _QuantizeConfig
from ._base import CompatModel, pick_device

log = logging.getLogger(__name__)

__all__ = ["GPTQModel", "QuantizeConfig", "BACKEND"]

_GPTQKIT_FIELDS = {"bits", "group_size", "sym", "desc_act", "static_groups", "damp_percent", "damp_auto_increment",
                   "true_sequential", "mse", "checkpoint_format", "lm_head", "method", "gptaq_alpha", "blocksize",
                   "dynamic", "meta", "solve_order"}


class QuantizeConfig(_QuantizeConfig):
    """gptqkit's QuantizeConfig taking GPTQModel's spellings: `format=` for checkpoint_format, `mse` as
    a float (0 = off), `quant_method`, `v2=True` / `gptaq=` (GPTAQ: method="gptaq"), and GPTQModel-only
    keys (device, ...) which are ignored."""

    def __init__(self, **kwargs: Any):
        if "format" in kwargs:
            fmt = kwargs.pop("format")
            kwargs.setdefault("checkpoint_format", getattr(fmt, "value", fmt))
        qm = kwargs.pop("quant_method", "gptq")
        qm = str(getattr(qm, "value", qm)).lower()
        if qm not in ("gptq", "rtn"):
            raise ValueError(f"quant_method={qm!r}: gptqkit quantizes with GPTQ (or rtn) only")
        kwargs.setdefault("method", qm)
        # GPTQModel asks for GPTAQ ("GPTQ v2") with v2=True or gptaq=GPTAQConfig(alpha=...) / a dict
        gptaq = kwargs.pop("gptaq", None)
        if kwargs.pop("v2", False) or gptaq is not None:
            kwargs["method"] = "gptaq"
            alpha = gptaq.get("alpha") if isinstance(gptaq, dict) else getattr(gptaq, "alpha", None)
            if alpha is not None:
                kwargs.setdefault("gptaq_alpha", float(alpha))
        if "mse" in kwargs and not isinstance(kwargs["mse"], bool):
            kwargs["mse"] = bool(kwargs["mse"])
        if "act_order" in kwargs:
            kwargs.setdefault("desc_act", kwargs.pop("act_order"))
        ignored = sorted(set(kwargs) - _GPTQKIT_FIELDS)
        if ignored:
            log.info("QuantizeConfig: ignoring GPTQModel-only settings %s", ignored)
        super().__init__(**{k: v for k, v in kwargs.items() if k in _GPTQKIT_FIELDS})


class BACKEND:
    """GPTQModel's backend names; AUTO lets gptqkit choose, the others map to gptqkit's nearest."""
    AUTO = None
    TORCH = "torch"
    TRITON = "triton"
    CPU = "cpu"


class GPTQModelWrapper(CompatModel):
    def quantize(self, calibration_dataset, batch_size: int = 1, tokenizer=None, calibration_dataset_concat_size=None,
                 calibration_concat_size=None, calibration_sort=None, backend=None, auto_gc: bool = True,
                 buffered_fwd: bool = False, **kwargs):
        """Quantize on a list of strings (each tokenized as one example, at most 2048 tokens) or of
        tokenized dicts. Returns gptqkit's QuantizeReport (per-layer loss, damp, time)."""
        return self._quantize(calibration_dataset, batch_size, tokenizer=tokenizer, max_len=2048)

    def save(self, save_dir: str | Path, **kwargs) -> None:
        self._save(save_dir)

    save_quantized = save

    def generate(self, inputs=None, **kwargs):
        """transformers' generate; a prompt string (or list of them) is tokenized first, as in GPTQModel."""
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], str)):
            tok = self.tokenizer
            enc = tok(inputs, return_tensors="pt", padding=isinstance(inputs, list)).to(self.device)
            kwargs.setdefault("pad_token_id", tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
            return self.model.generate(**enc, **kwargs)
        if inputs is not None:
            return self.model.generate(inputs, **kwargs)
        return self.model.generate(**kwargs)


class GPTQModel:
    """GPTQModel's entry point: `load` opens a float model to quantize (when given a quantize config)
    or a quantized checkpoint to run."""

    def __init__(self):
        raise EnvironmentError("use GPTQModel.load(...)")

    @classmethod
    def load(cls, model_id_or_path: str, quantize_config: Optional[Any] = None, device_map: Any = None,
             device: Any = None, backend: Any = None, trust_remote_code: bool = False, dtype: Any = None,
             torch_dtype: Any = None, **kwargs) -> GPTQModelWrapper:
        from ..api import resolve_model
        from ..models.source import resolve_model_path
        path = resolve_model_path(resolve_model(model_id_or_path))
        dt = dtype if dtype is not None else torch_dtype
        dt = None if dt in (None, "auto") else (getattr(torch, dt) if isinstance(dt, str) else dt)
        if quantize_config is None:
            if _QuantizeConfig.find(path) is None:
                raise ValueError(f"{path} is not quantized: pass a QuantizeConfig to quantize it")
            return cls.from_quantized(path, device_map=device_map, device=device, backend=backend,
                                      trust_remote_code=trust_remote_code, dtype=dt)
        return cls.from_pretrained(path, quantize_config, trust_remote_code=trust_remote_code, dtype=dt)

    @classmethod
    def from_pretrained(cls, model_id_or_path: str, quantize_config: Any, trust_remote_code: bool = False,
                        dtype: Any = None, **kwargs) -> GPTQModelWrapper:
        from .autogptq import _as_config
        return GPTQModelWrapper(model_id_or_path, _as_config(quantize_config), trust_remote_code=trust_remote_code,
                                dtype=dtype)

    @classmethod
    def from_quantized(cls, model_id_or_path: str, device_map: Any = None, device: Any = None, backend: Any = None,
                       trust_remote_code: bool = False, dtype: Any = None, **kwargs) -> GPTQModelWrapper:
        from ..api import load
        from ..models.source import resolve_model_path
        path = resolve_model_path(model_id_or_path)
        dev = pick_device(device, device_map)
        be = getattr(backend, "value", backend)
        be = None if be in (None, "auto") else str(be).lower()
        model = load(path, backend=be, device=dev, dtype=dtype,
                     trust_remote_code=trust_remote_code)
        w = GPTQModelWrapper(path, model.quantize_config, model=model, trust_remote_code=trust_remote_code,
                             device=dev, dtype=dtype, backend=be)
        w._qdir = path
        return w
