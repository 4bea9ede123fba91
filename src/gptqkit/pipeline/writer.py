"""What goes into the checkpoint besides the run folder's bookkeeping: the tensors of each block
(GPTQ tensors of the solved linears, every other tensor in its stored dtype), the tensors
outside the blocks, and the side files (config.json with quantization_config,
quantize_config.json, generation config, tokenizer, quant_log).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from ..config import QuantizeConfig
from ..formats.checkpoint import gptq_tensors
from ..models.source import ModelHandle
from .linears import LinearJob
from .quant_log import QuantizeReport, write_quant_log


class Tensors(dict):
    """Output tensors by name, in the order they are written; `copies` lists source tensors to be
    copied byte for byte when the shards are assembled (never read into memory)."""

    def __init__(self):
        super().__init__()
        self.copies: list[tuple[Path, list[str]]] = []

    def add_copy(self, name: str, file: Path) -> None:
        if self.copies and self.copies[-1][0] == file:
            self.copies[-1][1].append(name)
        else:
            self.copies.append((file, [name]))

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self[name] = tensor.detach().cpu().contiguous()

    def add_solved(self, job: LinearJob, fmt: str, written: set[str]) -> None:
        """The GPTQ tensors of a solved linear, in place of its weight and bias."""
        for k, v in gptq_tensors(job.result, job.cfg.bits, fmt, job.module.bias).items():
            self.add(f"{job.name}.{k}", v)
        written.update({f"{job.name}.weight", f"{job.name}.bias"})


def write_originals(handle: ModelHandle, tensors: Tensors, prefix: str, written: set[str],
                    skip_prefix: str | None = None, copy: bool = False) -> None:
    """Add the not-quantized tensors under `prefix` ('' = all remaining, except those under
    `skip_prefix`) in their stored dtype; copy=True copies them from the source files as stored."""
    if handle.streaming:
        names = handle.keys_under(prefix) if prefix else list(handle.source.keys())
        for k in names:
            if skip_prefix and k.startswith(skip_prefix):
                continue
            if k not in written:
                if copy:  # as stored, straight from the source file (the embeddings are large)
                    tensors.add_copy(k, handle.source.where[k])
                else:
                    tensors.add(k, handle.original(k))
                written.add(k)
        return
    for k, v in handle.model.state_dict().items():
        if skip_prefix and k.startswith(skip_prefix):
            continue
        if (not prefix or k.startswith(prefix + ".")) and k not in written and v.device.type != "meta":
            if prefix == "" and _is_tied_copy(handle.model, k):
                continue
            tensors.add(k, v)
            written.add(k)


def _is_tied_copy(model: nn.Module, name: str) -> bool:
    return name == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


def write_side_files(handle: ModelHandle, folder: Path, config: QuantizeConfig, tokenizer,
                     report: QuantizeReport) -> None:
    cfg = handle.model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.save_pretrained(folder)
    cj = json.loads((folder / "config.json").read_text())
    cj["quantization_config"] = config.to_dict()
    (folder / "config.json").write_text(json.dumps(cj, indent=2, sort_keys=True) + "\n")
    config.save(folder)
    for extra in ("generation_config.json",):
        if (handle.path / extra).is_file():
            shutil.copy(handle.path / extra, folder / extra)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    write_quant_log(folder, report)
