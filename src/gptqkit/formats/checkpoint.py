"""Checkpoint files: a sharded safetensors writer that never leaves a half folder looking
complete, a reader that follows an index only inside its folder, and the GPTQ tensors of one
solved layer. Safetensors only: pickled checkpoints are refused, never loaded.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError
from .packing import pack_qweight, pack_qzeros

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
COMPLETE_MARK = ".gptqkit-complete"


def gptq_tensors(result, bits: int, fmt: str, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one solved layer (a quant.result.QuantResult)."""
    out = {
        "qweight": pack_qweight(result.q.T.cpu(), bits),
        "qzeros": pack_qzeros(result.zeros.cpu(), bits, fmt),
        "scales": result.scales.cpu().to(torch.float16).contiguous(),
        "g_idx": result.g_idx.cpu().to(torch.int32).contiguous(),
    }
    if bias is not None:
        out["bias"] = bias.detach().cpu().to(torch.float16).contiguous()
    return out


class ShardWriter:
    """Writes tensors into shards of at most `max_shard_bytes` as they arrive.

    Everything goes to `<out>.partial/`; `finalize()` names the shards, writes the index and
    then renames the folder to `out`, so an interrupted run never leaves a folder at `out`.
    """

    def __init__(self, out: str | Path, max_shard_bytes: int = 2 << 30, overwrite: bool = False):
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise CheckpointError(f"{self.out} already exists; choose another --out or pass overwrite")
        self.tmp = self.out.with_name(self.out.name + ".partial")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self.max_shard_bytes = max_shard_bytes
        self.overwrite = overwrite
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self.total_bytes = 0

    @property
    def directory(self) -> Path:
        """Where side files (config, tokenizer, logs) go before finalize()."""
        return self.tmp

    def add(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().cpu().contiguous()
        nbytes = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self.pending[name] = t
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def add_all(self, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        for k, v in tensors.items():
            self.add(f"{prefix}.{k}" if prefix else k, v)

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"shard-{len(self.shards):05d}.tmp.safetensors"
        try:
            save_file(self.pending, str(self.tmp / name), metadata={"format": "pt"})
        except OSError as e:  # disk full and friends: nothing at `out` was touched
            raise CheckpointError(f"writing {self.tmp / name} failed ({e}); free disk space and "
                                  "run again (finished work in the partial folder is not used)") from e
        self.shards.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finalize(self) -> Path:
        self.flush()
        n = len(self.shards)
        weight_map: dict[str, str] = {}
        for i, (tmpname, names) in enumerate(self.shards):
            final = SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.tmp / tmpname, self.tmp / final)
            weight_map.update({k: final for k in names})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (self.tmp / COMPLETE_MARK).write_text("")
        old = None
        if self.out.exists():  # os.replace cannot replace a non-empty folder
            if not self.overwrite:
                raise CheckpointError(f"{self.out} appeared while writing; the checkpoint is left in {self.tmp}")
            old = self.out.with_name(self.out.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out


def _inside(folder: Path, name: str) -> Path:
    p = (folder / name).resolve()
    if folder.resolve() not in p.parents:
        raise CheckpointError(f"checkpoint index names {name!r}, which lies outside {folder}; refusing to read it")
    return p


def shard_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, via its index when there is one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder")
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from e
        files = [_inside(folder, f) for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard files that are missing: {missing}; "
                                  "the download or copy is incomplete")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickles:
            raise CheckpointError(f"{folder} holds only pickled weights ({pickles[:3]}); gptqkit never loads "
                                  "pickles. Convert them to safetensors first")
        raise CheckpointError(f"{folder} holds no *.safetensors files")
    return files


def iter_tensors(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of a checkpoint, one shard open at a time."""
    for f in shard_files(folder):
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    yield k, sf.get_tensor(k)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"{f} is truncated or corrupted ({e}); download or copy it again") from e


class TensorSource:
    """Random access to the tensors of a safetensors folder, read one tensor at a time."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.where: dict[str, Path] = {}
        for f in shard_files(self.folder):
            try:
                with safe_open(str(f), framework="pt") as sf:
                    for k in sf.keys():
                        self.where[k] = f
            except Exception as e:
                raise CheckpointError(f"{f} is truncated or corrupted ({e}); download or copy it again") from e

    def keys(self) -> list[str]:
        return list(self.where)

    def get(self, name: str) -> torch.Tensor:
        try:
            with safe_open(str(self.where[name]), framework="pt") as sf:
                return sf.get_tensor(name)
        except KeyError as e:
            raise CheckpointError(f"tensor {name!r} is not in {self.folder}") from e
        except Exception as e:
            raise CheckpointError(f"reading {name!r} from {self.where[name]} failed ({e}); "
                                  "the file is truncated or corrupted") from e
