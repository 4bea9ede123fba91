"""RunPlan: every decision about a run that does not change from block to block, made once
before any work: this rank's share of the calibration set, how it is cut into forward chunks,
whether hidden states live on disk (--max-memory), the zero-point floor of the checkpoint
format, and the fingerprint that a resumed run must match.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, replace

import psutil

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
    auto_chunk: bool = False                # chunk chosen from free memory (not in the fingerprint)

    @property
    def nchunks(self) -> int:
        return len(self.masks)

    def with_chunk(self, chunk: int) -> "RunPlan":
        """The same plan cut into chunks of `chunk` sequences (a resumed run reuses the chunk
        size the interrupted run chose, whatever the free memory is now)."""
        return replace(self, chunk=chunk, masks=_masks(self.input_ids.shape[0], self.attention_mask, chunk))


def _masks(nseq: int, mask: torch.Tensor | None, chunk: int) -> list[torch.Tensor | None]:
    return [mask[s:s + chunk].bool() if mask is not None else None for s in range(0, nseq, chunk)]


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
    chunk, offload, auto = _chunking(handle, ids, batch_size, parse_size(max_memory), world,
                                     gptaq=config.method == "gptaq")
    zero_min = 1 if (config.checkpoint_format == "gptq" and not config.sym) else 0
    if zero_min:
        log.info("asymmetric quantization in checkpoint_format 'gptq' (v1): zero points kept >= 1, "
                 "since v1 cannot store 0 (use checkpoint_format='gptq_v2' to lift this)")
    for i, blk in enumerate(blocks[:1]):
        check_layers_fit(blk, spec, config, f"{spec.blocks}.{i}")
    fp = fingerprint(handle.path, list(set(handle.source.where.values())), config.to_dict(), input_ids,
                     attention_mask, chunk="auto" if auto else chunk, dtype=str(handle.dtype),
                     max_shard_bytes=max_shard_bytes, lm_head=config.lm_head, world=world)
    dev = handle.device
    ids, mask = ids.to(dev), mask.to(dev) if mask is not None else None
    return RunPlan(world, me, ids, mask, chunk, offload, zero_min, calib_tokens, fp,
                   _masks(ids.shape[0], mask, chunk), auto)


def _chunking(handle: ModelHandle, ids: torch.Tensor, batch_size: int | None, max_memory: int | None,
              world: int, gptaq: bool = False) -> tuple[int, bool, bool]:
    """(sequences per chunk, hidden states on disk, chunk chosen automatically). A memory budget
    the hidden states (a block's inputs and outputs; [GPTAQ] of the float model too) exceed sends
    them to disk, in chunks of batch_size or as many sequences as a quarter of the budget holds.
    Otherwise batch_size, or a chunk size from the free memory and the model's shapes (auto_chunk)."""
    nseq = ids.shape[0]
    width = getattr(handle.config.get_text_config(), "hidden_size", None) or getattr(handle.config, "n_embd", 0)
    streams = 2 if gptaq else 1
    per_seq = streams * ids.shape[1] * width * torch.tensor([], dtype=handle.dtype).element_size()
    if max_memory is not None and (not width or 2 * nseq * per_seq > max_memory):
        chunk = batch_size or max(1, min(nseq, max_memory // (4 * max(per_seq, 1))))
        log.info("calibration hidden states (%.0f MB%s) exceed max_memory (%.0f MB): kept on disk, "
                 "%d sequences per chunk", 2 * nseq * per_seq / 1e6, ", both streams" if gptaq else "",
                 max_memory / 1e6, chunk)
        return chunk, True, False
    if batch_size:
        return batch_size, False, False
    if world > 1:  # [torchrun] each rank's share in one chunk, as before (replay across ranks)
        return nseq, False, False
    free = psutil.virtual_memory().available
    return auto_chunk(handle.config.get_text_config(), nseq, ids.shape[1], handle.dtype,
                      min(free, max_memory or free), gptaq=gptaq), False, True


_MIN_BUDGET = 64 << 20


def auto_chunk(cfg, nseq: int, seqlen: int, dtype: torch.dtype, free: int, gptaq: bool = False) -> int:
    """Sequences per chunk for the chunked in-flight mode, from the model's shapes.

    The run holds, whatever the chunking, every sequence's block input and output plus what the
    suspended chunks keep (the MLP's input, the residual, down_proj's input): about
    L·(I + 6H) values per sequence. One chunk's forward adds its transients: the MLP's gate/up
    outputs and their product (3I), attention's q/k/v/output and rotary copies (6H), and the
    attention scores and softmax (2·heads·L) per token. Chunks are sized so that the transients
    stay within a quarter of the held part (the peak stays within ~25 % of the floor), or 64 MiB
    for small jobs (one chunk, no threads), and an eighth of the free memory.

    [GPTAQ] adds to what is held the float model's block input and output (2H) and what each
    suspended chunk keeps of its float forward (pipeline/floats.py): the float inputs of the
    linears it has not reached, at most o_proj's, gate/up's and down_proj's after its first stop
    (2H + I); and to one chunk's transients its q/k/v float input until its first stop (H)."""
    e = torch.tensor([], dtype=dtype).element_size()
    H = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or 1024
    inter = (getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim", None)
             or getattr(cfg, "n_inner", None) or 4 * H)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or max(1, H // 64)
    transient = seqlen * e * (3 * inter + 6 * H + 2 * heads * seqlen + (H if gptaq else 0))
    held = nseq * seqlen * e * (inter + 6 * H + ((inter + 4 * H) if gptaq else 0))
    budget = min(free // 8, max(held // 4, _MIN_BUDGET))
    chunk = max(1, min(nseq, budget // transient))
    chunk = math.ceil(nseq / math.ceil(nseq / chunk))  # equal chunks, same count
    log.info("chunking: %d sequences per chunk (%d chunks); one chunk's transients %.0f MB (%.1f MB per "
             "sequence: hidden %d, intermediate %d, %d heads, %d tokens) within min(free memory %.0f MB / 8, "
             "max(held activations %.0f MB%s / 4, 64 MiB)); --batch-size overrides", chunk, math.ceil(nseq / chunk),
             chunk * transient / 1e6, transient / 1e6, H, inter, heads, seqlen, free / 1e6, held / 1e6,
             " with GPTAQ's float stream and stashes" if gptaq else "")
    return chunk
