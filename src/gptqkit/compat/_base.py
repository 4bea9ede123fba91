"""Shared machinery of the AutoGPTQ and GPTQModel compatibility wrappers.

gptqkit quantizes by streaming a model folder block by block into an output folder, while
AutoGPTQ/GPTQModel scripts load a float model, call `quantize(examples)` and only then name the
output folder. The wrapper therefore remembers the source path, quantizes into a temporary
folder on `quantize()`, and moves the finished checkpoint where `save_quantized()`/`save()` says.
After quantization (or `from_quantized`/`load` of a checkpoint) it wraps the loaded gptqkit model
(an ordinary transformers PreTrainedModel) and forwards everything else to it.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import QuantizeConfig

log = logging.getLogger(__name__)


def pick_device(device: Any = None, device_map: Any = None) -> str:
    """AutoGPTQ/GPTQModel device arguments -> one torch device string; CUDA requests fall back to
    CPU (with a warning) on machines without CUDA, so example scripts run unchanged anywhere."""
    want = device
    if want is None and isinstance(device_map, str):
        want = device_map
    if want is None and isinstance(device_map, dict) and device_map:
        want = next(iter(device_map.values()))
    if want is None or want == "auto" or want == "balanced" or want == "sequential":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if isinstance(want, int):
        want = f"cuda:{want}"
    want = str(want)
    if want.startswith("cuda") and not torch.cuda.is_available():
        warnings.warn(f"device {want!r} requested but CUDA is not available; using the CPU", stacklevel=3)
        return "cpu"
    return want


def examples_from(calibration: Sequence[Any], tokenizer=None, max_len: int | None = None) -> list[dict]:
    """AutoGPTQ examples (dicts / BatchEncodings with input_ids [, attention_mask]) or GPTQModel's
    list of strings -> a list of dicts with 1-D input_ids / attention_mask lists."""
    out = []
    for i, ex in enumerate(calibration):
        if isinstance(ex, str):
            if tokenizer is None:
                raise TypeError("calibration strings need a tokenizer; the model folder has none")
            ex = tokenizer(ex, truncation=max_len is not None, max_length=max_len)
        if not hasattr(ex, "keys") or "input_ids" not in ex:
            raise TypeError(f"calibration example {i} must be a string or a dict with 'input_ids', got "
                            f"{type(ex).__name__}")
        ids = ex["input_ids"]
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if ids and isinstance(ids[0], list):  # [[...]] from return_tensors or batch encodings
            rows = ids
            masks = ex.get("attention_mask")
            masks = masks.tolist() if isinstance(masks, torch.Tensor) else masks
            for j, r in enumerate(rows):
                out.append({"input_ids": r, "attention_mask": masks[j] if masks is not None else [1] * len(r)})
            continue
        mask = ex.get("attention_mask")
        mask = mask.tolist() if isinstance(mask, torch.Tensor) else (list(mask) if mask is not None else [1] * len(ids))
        if ids:
            out.append({"input_ids": ids, "attention_mask": mask})
    if not out:
        raise ValueError("no calibration examples (all empty)")
    return out


class CompatModel:
    """A model in the AutoGPTQ/GPTQModel workflow: float (to quantize) or quantized (to run)."""

    def __init__(self, source: Path | str, quantize_config: QuantizeConfig | None, *, model=None,
                 trust_remote_code: bool = False, device: str = "cpu", dtype: torch.dtype | None = None,
                 backend: str | None = None):
        self.source = source
        self.quantize_config = quantize_config
        self.trust_remote_code = trust_remote_code
        self._device, self._dtype, self._backend = device, dtype, backend
        self._model = model
        self._qdir: Path | None = None      # where the quantized checkpoint currently lies
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._tokenizer = None
        self.quantized = model is not None
        self.report = None

    # ------------------------------------------------------------------ the wrapped model
    @property
    def model(self):
        if self._model is None:
            if self._qdir is not None:
                from ..api import load
                self._model = load(self._qdir, backend=self._backend, device=self._device, dtype=self._dtype,
                                   trust_remote_code=self.trust_remote_code)
            else:  # float model, e.g. to evaluate it before quantizing
                from transformers import AutoModelForCausalLM
                self._model = AutoModelForCausalLM.from_pretrained(
                    self.source, dtype=self._dtype or torch.float32,
                    trust_remote_code=self.trust_remote_code).eval()
        return self._model

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from ..api import load_tokenizer
            try:
                self._tokenizer = load_tokenizer(self._qdir or self.source, self.trust_remote_code)
            except Exception as e:  # noqa: BLE001 - a checkpoint without tokenizer files
                log.info("no tokenizer at %s: %s", self._qdir or self.source, e)
                return None
        return self._tokenizer

    @property
    def config(self):
        if self._model is None:
            from transformers import AutoConfig
            return AutoConfig.from_pretrained(self._qdir or self.source, trust_remote_code=self.trust_remote_code)
        return self._model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __getattr__(self, name: str):
        # only called for attributes not found normally: forward to the transformers model
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    def to(self, *args, **kwargs):
        self.model.to(*args, **kwargs)
        return self

    def eval(self):
        self.model.eval()
        return self

    def train(self, mode: bool = True):
        self.model.train(mode)
        return self

    def __repr__(self) -> str:
        state = f"quantized at {self._qdir}" if self.quantized else f"float, from {self.source}"
        return f"{type(self).__name__}({state})"

    # ------------------------------------------------------------------ quantize / save
    def _quantize(self, calibration: Sequence[Any], batch_size: int | None, tokenizer=None,
                  max_len: int | None = None, calibration_seed: int = 0):
        if self.quantized:
            raise RuntimeError("this model is already quantized")
        if self.quantize_config is None:
            raise ValueError("no quantize config: pass one when loading the float model")
        from ..api import quantize
        tok = tokenizer or self.tokenizer
        examples = examples_from(calibration, tok, max_len)
        seqlen = max(len(e["input_ids"]) for e in examples)
        if max_len:
            seqlen = min(seqlen, max_len)
        from transformers import AutoConfig

        from ..models.source import max_positions
        limit = max_positions(AutoConfig.from_pretrained(self.source, trust_remote_code=self.trust_remote_code))
        if limit and seqlen > limit:  # peers pass long examples through; the model cannot take them
            log.warning("calibration examples of up to %d tokens are cut to the model's %d positions", seqlen, limit)
            seqlen = limit
        self._tmp = tempfile.TemporaryDirectory(prefix="gptqkit-compat-")
        out = Path(self._tmp.name) / "quantized"
        self.report = quantize(self.source, examples, out, self.quantize_config, nsamples=len(examples),
                               seqlen=seqlen, seed=calibration_seed,
                               batch_size=batch_size if batch_size and batch_size < len(examples) else None,
                               dtype=self._dtype or torch.float32, trust_remote_code=self.trust_remote_code,
                               progress=log.isEnabledFor(logging.INFO))
        self._qdir = out
        self._model = None  # the quantized model loads from the checkpoint on first use
        self.quantized = True
        return self.report

    def _save(self, save_dir: str | Path) -> Path:
        save_dir = Path(save_dir)
        if not self.quantized:
            raise RuntimeError("quantize the model before saving it (call .quantize(examples) first)")
        if self._qdir is None:  # loaded from a checkpoint: write the loaded model
            from ..models.loading import save_quantized
            save_quantized(self.model, save_dir)
            return save_dir
        if self._qdir.resolve() == save_dir.resolve():
            return save_dir
        save_dir.mkdir(parents=True, exist_ok=True)
        moving = self._tmp is not None and self._qdir.resolve().is_relative_to(Path(self._tmp.name).resolve())
        for f in self._qdir.iterdir():
            dst = save_dir / f.name
            if dst.is_dir():
                shutil.rmtree(dst)
            (shutil.move if moving else shutil.copy2)(str(f), str(dst))
        if moving:
            self._tmp.cleanup()
            self._tmp = None
        self._qdir = save_dir
        if self._model is not None:
            self._model._gptqkit_source = save_dir
        log.info("quantized checkpoint saved to %s", save_dir)
        return save_dir
