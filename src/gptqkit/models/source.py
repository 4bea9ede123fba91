"""Opening a model to quantize: resolve a path or hub id, build it on the meta device, and
bring one module's weights into memory at a time from the safetensors files.

When the checkpoint's tensor names do not match the model's parameters one to one (some
transformers versions rename or fuse weights at load time), the model is loaded whole and
the streaming becomes a no-op; this is logged.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from ..errors import ModelLoadError
from ..formats.checkpoint import TensorSource

log = logging.getLogger(__name__)


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A local folder as is; otherwise a hub id fetched (safetensors only) into the HF cache."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{p} has no config.json; point at a Hugging Face model folder")
        return p
    if p.exists() or str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") > 1:
        raise ModelLoadError(f"model path {name_or_path} does not exist (or is not a folder)")
    try:
        from huggingface_hub import snapshot_download
        local = snapshot_download(str(name_or_path), allow_patterns=[
            "*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken"])
    except Exception as e:
        raise ModelLoadError(
            f"{name_or_path!r} is neither a local folder nor a reachable hub model ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Check the spelling, or download it on a "
            "networked machine and pass the folder") from e
    return Path(local)


class ModelHandle:
    """A causal LM whose weights come into memory one module at a time."""

    def __init__(self, path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 trust_remote_code: bool = False):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.path = resolve_model_path(path)
        self.dtype, self.device = dtype, torch.device(device)
        try:
            self.config = AutoConfig.from_pretrained(self.path, trust_remote_code=trust_remote_code)
        except Exception as e:
            raise ModelLoadError(f"cannot read the config of {self.path}: {e}") from e
        if getattr(self.config, "quantization_config", None):
            raise ModelLoadError(
                f"{self.path} is already quantized ({_qmethod(self.config)}); quantize the original "
                "floating-point model instead")
        self.source = TensorSource(self.path)
        with init_empty_weights():
            self.model = AutoModelForCausalLM.from_config(self.config, trust_remote_code=trust_remote_code,
                                                          dtype=dtype)
        self.model.eval()
        self._tie()
        names = {n for n, _ in self.model.named_parameters(remove_duplicate=True)}
        missing = names - set(self.source.keys())
        self.streaming = not missing
        if not self.streaming:
            log.info("checkpoint names differ from the model's (%d unmatched, e.g. %s); loading the whole "
                     "model instead of streaming it", len(missing), sorted(missing)[:3])
            self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype,
                                                              trust_remote_code=trust_remote_code)
            self.model.to(self.device).eval()

    def _tie(self) -> None:
        if hasattr(self.model, "tie_weights"):
            self.model.tie_weights()

    def materialize(self, prefix: str) -> None:
        """Load every parameter under `prefix` ('' for all) onto the compute device and dtype."""
        if not self.streaming:
            return
        from accelerate.utils import set_module_tensor_to_device
        mod = self.model.get_submodule(prefix) if prefix else self.model
        for n, p in list(mod.named_parameters(recurse=True)):
            full = f"{prefix}.{n}" if prefix else n
            if p.device.type != "meta":
                continue
            if full not in self.source.where:
                continue  # tied to a tensor loaded elsewhere
            t = self.source.get(full)
            set_module_tensor_to_device(self.model, full, self.device,
                                        value=t.to(self.dtype) if t.is_floating_point() else t)

    def materialize_outside(self, blocks_path: str) -> None:
        """Everything that is not a decoder block (embeddings, final norm, lm_head)."""
        if not self.streaming:
            return
        from accelerate.utils import set_module_tensor_to_device
        for full, p in list(self.model.named_parameters()):
            if full.startswith(blocks_path + ".") or p.device.type != "meta" or full not in self.source.where:
                continue
            t = self.source.get(full)
            set_module_tensor_to_device(self.model, full, self.device,
                                        value=t.to(self.dtype) if t.is_floating_point() else t)
        self._tie()

    def release_outside(self, blocks_path: str) -> None:
        """Free everything that is not a decoder block (streaming only): after the inputs of
        block 0 are captured, the embeddings are not needed again (unless lm_head is quantized)."""
        if not self.streaming:
            return
        from accelerate.utils import set_module_tensor_to_device
        # every name of a tied tensor (a tied lm_head is the embedding under a second name):
        # freeing one name alone leaves the other holding the whole tensor
        for full, p in list(self.model.named_parameters(remove_duplicate=False)):
            if not full.startswith(blocks_path + ".") and p.device.type != "meta":
                set_module_tensor_to_device(self.model, full, "meta")

    def release(self, prefix: str) -> None:
        """Free a finished module's weights (streaming only)."""
        if self.streaming:
            self.model.get_submodule(prefix).to("meta")

    def original(self, name: str) -> torch.Tensor:
        """A tensor as stored in the source checkpoint (original dtype)."""
        return self.source.get(name)

    def keys_under(self, prefix: str) -> list[str]:
        return [k for k in self.source.keys() if k.startswith(prefix + ".")]


# [arch] where a config keeps its longest input; ALiBi models (Bloom) and others without one have no limit
_MAX_POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def max_positions(config) -> int | None:
    """The longest sequence the model's position embeddings cover, or None if it has no such limit."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in _MAX_POSITION_KEYS:
        v = getattr(text, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_seqlen(seqlen: int, limit: int | None, what: str = "seqlen") -> None:
    """Refuse sequences longer than the model's positions up front (GPT-2 would fail deep inside
    its embedding with an IndexError; rotary models would silently extrapolate)."""
    from ..errors import ConfigError
    if limit is not None and seqlen > limit:
        raise ConfigError(f"{what} {seqlen} is longer than the model's maximum of {limit} positions; "
                          f"use {what} {limit} or less")


def _qmethod(config) -> str:
    qc = config.quantization_config
    qc = qc if isinstance(qc, dict) else getattr(qc, "to_dict", lambda: {})()
    return json.dumps(qc.get("quant_method", "unknown"))
