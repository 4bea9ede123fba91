"""RunPlan: every decision about a run that does not change from block to block, made once
before any work: this rank's share of the calibration set, how it is cut into forward chunks,
whether hidden states live on disk (--max-memory), the zero-point floor of the checkpoint
format, and the fingerprint that a resumed run must match.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..config import QuantizeConfig
from ..errors import ConfigError
from ..models.arch import ArchSpec
from ..models.source import ModelHandle
from . import collective
from .linears import check_layers_fit
from .rundir import fingerprint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPlan:
    world: int
    rank: int
    input_ids: torch.Tensor                 # this rank's sequences [n, L], on the compute device
    attention_mask: torch.Tensor | None
    chunk: int                              # sequences per forward
    offload: bool                           # hidden states kept in files under <out>.partial/hidden
    zero_min: int                           # 1: asymmetric v1 checkpoints cannot store a zero point of 0
    calib_tokens: int                       # over all ranks
    fingerprint: str
    masks: list[torch.Tensor | None]        # each chunk's attention mask as booleans (None: no padding)

    @property
    def nchunks(self) -> int:
        return len(self.masks)


def parse_size(v: int | str | None) -> int | None:
    """'4GB', '512MiB', '2e9' or an int -> bytes; None stays None."""
    if v is None or isinstance(v, int):
        return v
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(v))
    if not m:
        raise ConfigError(f"max_memory={v!r} is not a size; write it like 4GB, 512MB or 2e9 (bytes)")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " kmgt".index(m.group(2).lower() or " "))


def make_plan(handle: ModelHandle, spec: ArchSpec, blocks: nn.ModuleList, input_ids: torch.Tensor,
              attention_mask: torch.Tensor | None, config: QuantizeConfig, *, batch_size: int | None,
              max_memory: int | str | None, max_shard_bytes: int) -> RunPlan:
    """Validate the inputs (before any file is touched) and decide how the run proceeds."""
    world, me = collective.start(handle.device)
    if input_ids.shape[0] < world:
        raise ConfigError(f"{input_ids.shape[0]} calibration sequences cannot be split over {world} processes; "
                          "use more samples or fewer processes")
    calib_tokens = int(attention_mask.sum()) if attention_mask is not None else input_ids.numel()
    ids, mask = input_ids, attention_mask
    if world > 1:  # this rank's share of the calibration sequences
        sl = collective.local_slice(input_ids.shape[0])
        ids = ids[sl]
        mask = mask[sl] if mask is not None else None
    chunk, offload = _chunking(handle, ids, batch_size, parse_size(max_memory))
    zero_min = 1 if (config.checkpoint_format == "gptq" and not config.sym) else 0
    if zero_min:
        log.info("asymmetric quantization in checkpoint_format 'gptq' (v1): zero points kept >= 1, "
                 "since v1 cannot store 0 (use checkpoint_format='gptq_v2' to lift this)")
    for i, blk in enumerate(blocks[:1]):
        check_layers_fit(blk, spec, config, f"{spec.blocks}.{i}")
    fp = fingerprint(handle.path, list(set(handle.source.where.values())), config.to_dict(), input_ids,
                     attention_mask, chunk=chunk, dtype=str(handle.dtype),
                     max_shard_bytes=max_shard_bytes, lm_head=config.lm_head, world=world)
    dev = handle.device
    ids, mask = ids.to(dev), mask.to(dev) if mask is not None else None
    masks = [mask[s:s + chunk].bool() if mask is not None else None for s in range(0, ids.shape[0], chunk)]
    return RunPlan(world, me, ids, mask, chunk, offload, zero_min, calib_tokens, fp, masks)


def _chunking(handle: ModelHandle, ids: torch.Tensor, batch_size: int | None, max_memory: int | None
              ) -> tuple[int, bool]:
    """(sequences per chunk, hidden states on disk). All sequences in one chunk is the least
    work; a memory budget the hidden states (a block's inputs and outputs) exceed sends them to
    disk, in chunks of batch_size or as many sequences as a quarter of the budget holds."""
    nseq = ids.shape[0]
    chunk = batch_size or nseq
    if max_memory is None:
        return chunk, False
    width = getattr(handle.config.get_text_config(), "hidden_size", None) or getattr(handle.config, "n_embd", 0)
    per_seq = ids.shape[1] * width * torch.tensor([], dtype=handle.dtype).element_size()
    offload = not width or 2 * nseq * per_seq > max_memory
    if offload:
        chunk = batch_size or max(1, min(nseq, max_memory // (4 * max(per_seq, 1))))
        log.info("calibration hidden states (%.0f MB) exceed max_memory (%.0f MB): kept on disk, "
                 "%d sequences per chunk", 2 * nseq * per_seq / 1e6, max_memory / 1e6, chunk)
    return chunk, offload
