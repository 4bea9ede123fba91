"""Checkpoint files: the GPTQ tensors of one solved layer, safetensors files written atomically
and assembled into shards with their index, a publish step that never leaves a half folder
looking complete, and a reader that follows an index only inside its folder. Safetensors only:
pickled checkpoints are refused, never loaded.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open

from ..errors import CheckpointError, DiskFullError
from .packing import pack_qweight, pack_qzeros

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
COMPLETE_MARK = ".gptqkit-complete"
# The tensors that replace a quantized Linear's weight, in the order they are written (the
# optional float16 `bias` keeps its name). QuantLinear's buffers carry the same names.
GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx")


def gptq_tensors(result, bits: int, fmt: str, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one solved layer (a quant.result.QuantResult)."""
    out = dict(zip(GPTQ_TENSORS, (
        pack_qweight(result.q.T.cpu(), bits),
        pack_qzeros(result.zeros.cpu(), bits, fmt),
        result.scales.cpu().to(torch.float16).contiguous(),
        result.g_idx.cpu().to(torch.int32).contiguous(),
    )))
    if bias is not None:
        out["bias"] = bias.detach().cpu().to(torch.float16).contiguous()
    return out


def publish(tmp: Path, out: Path, overwrite: bool) -> Path:
    """Rename a finished `<out>.partial` folder to `out` (replacing an old `out` if allowed)."""
    old = None
    if out.exists():  # os.replace cannot replace a non-empty folder
        if not overwrite:
            raise CheckpointError(f"{out} appeared while writing; the checkpoint is left in {tmp}")
        old = out.with_name(out.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


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


# ---------------------------------------------------------------- streaming safetensors files
# The pipeline writes each finished block to its own file and assembles the final shards by
# copying bytes, so memory never holds more than one tensor of the output and the shard layout
# does not depend on where a run was interrupted. Files follow the safetensors format exactly
# (8-byte little-endian header length, JSON header padded with spaces to 8 bytes, raw data);
# tensors are laid out by decreasing element size, then name, so every tensor is aligned.

_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
              torch.uint8: "U8", torch.bool: "BOOL"}
_COPY_CHUNK = 16 << 20


def write_error(path: Path, e: OSError) -> CheckpointError:
    if getattr(e, "errno", None) == errno.ENOSPC:
        return DiskFullError(f"disk full while writing {path} ({e}); free space, then run the same command "
                             "with --resume (resume=True): finished blocks are kept in the .partial folder")
    return CheckpointError(f"writing {path} failed ({e}); fix the cause, then run again with --resume")


def _open_for_write(path: Path):
    """Opened here so tests can simulate a full disk."""
    return open(path, "wb")


def _layout(items: list[tuple[str, tuple[str, list[int], int]]]) -> list[tuple[str, tuple[str, list[int], int]]]:
    size = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}
    return sorted(items, key=lambda kv: (-size.get(kv[1][0], 1), kv[0]))


def _header_bytes(items, metadata: dict[str, str] | None) -> bytes:
    head: dict = {}
    if metadata:
        head["__metadata__"] = dict(metadata)
    off = 0
    for name, (dt, shape, nbytes) in items:
        head[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    h = json.dumps(head, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return len(h).to_bytes(8, "little") + h


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                      fsync: bool = True) -> None:
    """Write a safetensors file atomically (temporary name, fsync, rename); one tensor in flight."""
    path = Path(path)
    meta = {}
    for k, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise CheckpointError(f"tensor {k!r} has dtype {t.dtype}, which safetensors cannot store")
        meta[k] = (_ST_DTYPES[t.dtype], list(t.shape), t.numel() * t.element_size())
    items = _layout(list(meta.items()))
    tmp = path.with_name(path.name + ".tmp")
    try:
        with _open_for_write(tmp) as f:
            f.write(_header_bytes(items, metadata or {"format": "pt"}))
            for k, _ in items:
                t = tensors[k].detach().cpu().contiguous()
                if t.numel():
                    f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(path, e) from e


def read_header(path: str | Path) -> tuple[dict, int]:
    """(header dict, byte offset of the data) of a safetensors file, validated."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > 100 << 20:
                raise ValueError(f"header length {n}")
            head = json.loads(f.read(n))
        size = path.stat().st_size
        end = max((v["data_offsets"][1] for k, v in head.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError(f"data ends at {8 + n + end} but the file has {size} bytes")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is truncated or corrupted ({e}); delete it and run again") from e
    return head, 8 + n


def assemble_shards(sources: Iterable[Path | tuple[Path, list[str]]], folder: Path, max_shard_bytes: int
                    ) -> list[str]:
    """Copy every tensor of `sources` (safetensors files, read in order; within a file in the
    order its metadata "order" lists, else name order; a (file, names) pair copies just those)
    into shards of at most `max_shard_bytes` inside `folder`: one shard is model.safetensors,
    several are model-0000i-of-0000n.safetensors with model.safetensors.index.json. Returns the
    shard file names."""
    plan: list[list[tuple[str, Path, dict, int]]] = [[]]
    size = 0
    total = 0
    for src in sources:
        names = None
        if isinstance(src, tuple):
            src, names = src
        head, data = read_header(src)
        order = names or json.loads((head.get("__metadata__") or {}).get("order", "null")) or sorted(
            k for k in head if k != "__metadata__")
        for k in order:
            e = head[k]
            nbytes = e["data_offsets"][1] - e["data_offsets"][0]
            if plan[-1] and size + nbytes > max_shard_bytes:
                plan.append([])
                size = 0
            plan[-1].append((k, src, e, data))
            size += nbytes
            total += nbytes
    plan = [p for p in plan if p]
    n = len(plan)
    names = [SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map: dict[str, str] = {}
    for name, entries in zip(names, plan):
        items = _layout([(k, (e["dtype"], e["shape"], e["data_offsets"][1] - e["data_offsets"][0]))
                         for k, _, e, _ in entries])
        where = {k: (src, e, data) for k, src, e, data in entries}
        dest = folder / name
        try:
            with _open_for_write(dest) as f:
                f.write(_header_bytes(items, {"format": "pt"}))
                for k, _ in items:
                    src, e, data = where[k]
                    a, b = e["data_offsets"]
                    with open(src, "rb") as r:
                        r.seek(data + a)
                        left = b - a
                        while left:
                            buf = r.read(min(left, _COPY_CHUNK))
                            if not buf:
                                raise CheckpointError(f"{src} is truncated; run again with --resume")
                            f.write(buf)
                            left -= len(buf)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise write_error(dest, e) from e
        weight_map.update({k: name for k, *_ in entries})
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names
