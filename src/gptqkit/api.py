"""The Python entry points behind `gptqkit.quantize` and `gptqkit.load`."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import threading
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import ModelLoadError
from .config import DEFAULT_NSAMPLES, DEFAULT_SEQLEN, QuantizeConfig
from .pipeline import QuantizeReport, quantize_model
from .pipeline.rundir import check_out
from .models.source import ModelHandle, check_seqlen, max_positions

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"


def resolve_model(model: str | Path | None) -> Path | str:
    """None or 'default' -> the built-in SmolLM2-135M folder (converted and cached once); the name
    of another built-in model (models.default.BUILTINS, e.g. 'gemma3-270m') -> its folder, unless
    a local path of that name exists."""
    from .models.default import BUILTINS, builtin_model_dir, default_model_dir
    if model in (None, DEFAULT_MODEL):
        return default_model_dir()
    if str(model) in BUILTINS and not Path(model).exists():
        return builtin_model_dir(str(model))
    return model


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The device to quantize on: 'auto' (or None) picks CUDA when torch sees a GPU, else the CPU,
    and logs the choice; an explicit 'cuda' without a usable GPU is an error, not a silent CPU run."""
    from .errors import ConfigError
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            try:
                name = torch.cuda.get_device_name()
            except Exception:  # noqa: BLE001  (the name is only for the log line)
                name = "CUDA device"
            log.info("CUDA is available (%s): quantizing on the GPU (block forward, fp32 Hessians and the "
                     "solver on cuda; weights still stream from disk per block). Pass device='cpu' "
                     "(--device cpu) to stay on the CPU", name)
            return torch.device("cuda")
        log.info("no CUDA device visible to torch: quantizing on the CPU")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device={device!r} is not a device; use 'auto', 'cpu' or 'cuda' (or 'cuda:1')") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} was asked for, but torch sees no CUDA GPU (torch {torch.__version__}); "
                          "install a CUDA build of torch, or use device='cpu' or 'auto'")
    return dev


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """The tokenizer saved with a model or checkpoint; a folder without a usable one is refused
    with what to copy there (transformers' own error names converters, not the missing files)."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        raise ModelLoadError(
            f"no usable tokenizer in {path} ({type(e).__name__}: {str(e).splitlines()[0].rstrip(': ')}); copy the model's "
            "tokenizer files (tokenizer.json, tokenizer_config.json, and special_tokens_map.json or "
            "tokenizer.model where it has them) into that folder") from e


def quantize(model: str | Path | None, calib: str | Path | Sequence[str] | Sequence[dict], out: str | Path,
             config: QuantizeConfig | None = None, *, nsamples: int = DEFAULT_NSAMPLES, seqlen: int | None = None, seed: int = 0,
             batch_size: int | None = None, device: str | torch.device | None = "auto", dtype: torch.dtype = torch.float32,
             overwrite: bool = False, trust_remote_code: bool = False, progress: bool = True,
             resume: bool = False, max_memory: int | str | None = None, holdout: int = 0,
             **config_kwargs: Any) -> QuantizeReport:
    """Quantize a causal LM (folder, hub id, or None for the built-in default) and write a GPTQ
    checkpoint to `out`. `calib` is a built-in corpus name, a .txt/.jsonl path, a list of
    strings, or AutoGPTQ-style examples (dicts with input_ids / attention_mask).
    resume=True continues an interrupted run from `<out>.partial` (same inputs required);
    max_memory ('4GB') keeps calibration activations on disk when they would exceed it.
    seqlen: tokens per calibration window (pre-tokenized examples are cut to it); default 512, or
    the model's maximum positions if fewer. A longer seqlen than the model covers is refused.
    holdout: tokens at the end of a text `calib` never drawn (kept for evaluation).
    device: 'auto' (CUDA when available, logged), 'cpu', 'cuda' or 'cuda:N'; the blocks, the
    fp32 Hessians and the solver run there while weights stream from disk one block at a time.
    batch_size: sequences per forward chunk; None chooses it from the free memory and the model.
    SIGTERM is treated like Ctrl-C while this runs: finished blocks are kept for `resume`."""
    from .data import calibration_batches
    if config is not None and config_kwargs:
        raise TypeError(f"pass either config or keyword settings, not both (got {sorted(config_kwargs)})")
    config = config or QuantizeConfig(**config_kwargs)
    path = resolve_model(model)
    out = check_out(out, path, overwrite=overwrite, resume=resume)
    handle = ModelHandle(path, dtype=dtype, device=resolve_device(device), trust_remote_code=trust_remote_code)
    limit = max_positions(handle.config)
    if seqlen is None:  # the default, capped at what the model's positions cover
        seqlen = min(DEFAULT_SEQLEN, limit) if limit else DEFAULT_SEQLEN
    check_seqlen(seqlen, limit)
    tok = load_tokenizer(handle.path, trust_remote_code)
    cal = calibration_batches(tok, calib, nsamples=nsamples, seqlen=seqlen, seed=seed, holdout=holdout)
    # record the calibration in the checkpoint's config, without touching the caller's object
    source = str(calib) if isinstance(calib, (str, Path)) else "<python>"
    config = dataclasses.replace(config, meta={**config.meta, "calibration": {
        "source": source, "nsamples": int(cal.input_ids.shape[0]), "seqlen": int(cal.input_ids.shape[1]),
        "seed": seed, **({"holdout_tokens": holdout} if holdout else {})}})
    with sigterm_as_interrupt():
        return quantize_model(handle, cal.input_ids, config, out, attention_mask=cal.attention_mask,
                              tokenizer=tok, batch_size=batch_size, overwrite=overwrite, progress=progress,
                              resume=resume, max_memory=max_memory)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (kill, a job scheduler's stop) raises KeyboardInterrupt like Ctrl-C, so an
    interrupted run keeps its finished blocks and says how to resume. Main thread only: Python
    lets no other thread set signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def load(path: str | Path, *, backend: str | None = None, device: str = "cpu", dtype: torch.dtype | None = None,
         trust_remote_code: bool = False, int8_activations: bool | int | None = None):
    """Load a GPTQ checkpoint (gptqkit's, AutoGPTQ's or GPTQModel's) as a transformers model.

    int8_activations (CPU backend, 4-bit layers): True rounds each layer's input to int8 from 16
    rows on (prefill), ~1.6-2x faster linears on AVX2/AVX-512 for slightly different numbers
    (perplexity +0.3 %); an int gives the rows; None (default) keeps the exact kernel unless
    GPTQKIT_CPU_I8_MIN_M says otherwise. `gptqkit.kernels.cpu.set_int8_activations` changes it
    on a loaded model."""
    from .models.loading import load_quantized
    model = load_quantized(path, backend=backend, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    if int8_activations is not None:
        from .kernels.cpu import set_int8_activations
        if not set_int8_activations(model, int8_activations) and int8_activations:
            log.warning("int8_activations: no layer of %s can take it (it needs the cpu backend, 4-bit or "
                        "3-bit layers, group sizes that are multiples of 4 and an AVX2 build); the exact "
                        "kernels run", path)
    return model
