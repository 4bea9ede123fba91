"""The Python entry points behind `gptqkit.quantize` and `gptqkit.load`."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from .config import QuantizeConfig
from .pipeline import QuantizeReport, quantize_model
from .models.source import ModelHandle

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"


def resolve_model(model: str | Path | None) -> Path | str:
    """None or 'default' -> the built-in SmolLM2-135M folder (converted and cached once)."""
    if model in (None, DEFAULT_MODEL):
        from .models.default import default_model_dir
        return default_model_dir()
    return model


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def quantize(model: str | Path | None, calib: str | Path | Sequence[str] | Sequence[dict], out: str | Path,
             config: QuantizeConfig | None = None, *, nsamples: int = 128, seqlen: int = 512, seed: int = 0,
             batch_size: int | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
             overwrite: bool = False, trust_remote_code: bool = False, progress: bool = True,
             resume: bool = False, max_memory: int | str | None = None, **config_kwargs: Any) -> QuantizeReport:
    """Quantize a causal LM (folder, hub id, or None for the built-in default) and write a GPTQ
    checkpoint to `out`. `calib` is a built-in corpus name, a .txt/.jsonl path, a list of
    strings, or AutoGPTQ-style examples (dicts with input_ids / attention_mask).
    resume=True continues an interrupted run from `<out>.partial` (same inputs required);
    max_memory ('4GB') keeps calibration activations on disk when they would exceed it.
    batch_size: sequences per forward chunk; None chooses it from the free memory and the model."""
    from .data import calibration_batches
    if config is not None and config_kwargs:
        raise TypeError(f"pass either config or keyword settings, not both (got {sorted(config_kwargs)})")
    config = config or QuantizeConfig(**config_kwargs)
    path = resolve_model(model)
    handle = ModelHandle(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    tok = load_tokenizer(handle.path, trust_remote_code)
    cal = calibration_batches(tok, calib, nsamples=nsamples, seqlen=seqlen, seed=seed)
    # record the calibration in the checkpoint's config, without touching the caller's object
    source = str(calib) if isinstance(calib, (str, Path)) else "<python>"
    config = dataclasses.replace(config, meta={**config.meta, "calibration": {
        "source": source, "nsamples": int(cal.input_ids.shape[0]), "seqlen": int(cal.input_ids.shape[1]),
        "seed": seed}})
    return quantize_model(handle, cal.input_ids, config, out, attention_mask=cal.attention_mask, tokenizer=tok,
                          batch_size=batch_size, overwrite=overwrite, progress=progress, resume=resume,
                          max_memory=max_memory)


def load(path: str | Path, *, backend: str | None = None, device: str = "cpu", dtype: torch.dtype | None = None,
         trust_remote_code: bool = False):
    """Load a GPTQ checkpoint (gptqkit's, AutoGPTQ's or GPTQModel's) as a transformers model."""
    from .models.loading import load_quantized
    return load_quantized(path, backend=backend, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
