"""What each decoder block receives: its hidden states, and the other positional and keyword
arguments the decoder loop passes it (attention mask, position ids or rotary tables, cache
position, ALiBi ...), recorded once per calibration chunk by running the model up to its blocks.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

# A chunk's arguments to one block besides its hidden states: (positional args after them, kwargs).
Extras = tuple[tuple, dict]
Keep = Callable[[int, torch.Tensor], None]  # keep(chunk, hidden states entering block 0)


class Stop(Exception):
    """Raised inside a forward to stop it early (input capture, replay early exit)."""


def first_output(out: Any) -> torch.Tensor:
    """The hidden states of a block's output (a tensor, or a tuple that starts with them)."""
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class BlockInputs:
    first: list[Extras]                    # per chunk, what block 0 received
    per_block: list[list[Extras]] | None   # per block, per chunk; None: every block gets block 0's

    def for_block(self, i: int) -> list[Extras]:
        return self.per_block[i] if self.per_block is not None else self.first


def capture_inputs(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None, chunk_size: int, keep: Keep) -> BlockInputs:
    """Every block's extras, per chunk, and block 0's hidden states handed to keep()."""
    per_block = capture_per_block_inputs(model, blocks, input_ids, attention_mask, chunk_size, keep)
    if per_block is not None:
        return BlockInputs(per_block[0], per_block)
    return BlockInputs(capture_block_inputs(model, blocks, input_ids, attention_mask, chunk_size, keep), None)


def _run_until_stopped(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       chunk_size: int) -> None:
    """Run the model over each chunk of sequences; a hook raising Stop ends that chunk's forward."""
    with torch.inference_mode():
        for s in range(0, input_ids.shape[0], chunk_size):
            am = attention_mask[s:s + chunk_size] if attention_mask is not None else None
            try:
                model(input_ids=input_ids[s:s + chunk_size], attention_mask=am, use_cache=False)
            except Stop:
                pass


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor | None, chunk_size: int, keep: Keep) -> list[Extras]:
    """Run the model up to block 0 for each chunk of sequences: block 0's extras per chunk."""
    captured: list[Extras] = []

    def hook(module, args, kwargs):
        keep(len(captured), args[0])
        captured.append((tuple(args[1:]), kwargs))
        raise Stop

    h = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        _run_until_stopped(model, input_ids, attention_mask, chunk_size)
    finally:
        h.remove()
    if len(captured) != -(-input_ids.shape[0] // chunk_size):
        raise RuntimeError("could not capture the inputs of the first decoder block")
    return captured


def capture_per_block_inputs(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor,
                             attention_mask: torch.Tensor | None, chunk_size: int, keep: Keep | None = None
                             ) -> list[list[Extras]] | None:
    """[arch] What every block receives besides its hidden states, from one normal forward.

    Blocks may get per-layer inputs chosen inside the decoder loop (Gemma2/3 pick a sliding or
    global mask and rotary table by layer type), so block 0's kwargs are not always right for
    block i. Every block's forward is replaced by a stub that records its arguments and passes
    its hidden states through unchanged (as a 1-tuple, which suits loops that take `out[0]`
    and loops that pass the output on as is); the last one stops the forward. Returns per
    block, per chunk, the extras, or None if the decoder loop does not tolerate the stubs (the
    caller then reuses block 0's).
    """
    n = len(blocks)
    seen: list[list[Extras]] = [[] for _ in range(n)]

    def stub(i):
        def forward(*args, **kwargs):
            if not args and "hidden_states" in kwargs:
                kwargs = dict(kwargs)
                args = (kwargs.pop("hidden_states"),)
            h = args[0]
            if i == 0 and keep is not None:
                keep(len(seen[0]), h)
            seen[i].append((tuple(args[1:]), kwargs))
            if i == n - 1:
                raise Stop
            return (first_output(h),)
        return forward

    for i, b in enumerate(blocks):
        b.forward = stub(i)  # instance attribute shadows the class's forward
    try:
        _run_until_stopped(model, input_ids, attention_mask, chunk_size)
    except Exception as e:  # noqa: BLE001 - any failure means: fall back to block 0's kwargs
        log.info("per-block input capture failed (%s: %s); every block replays block 0's inputs",
                 type(e).__name__, e)
        return None
    finally:
        for b in blocks:
            del b.forward
    nchunks = -(-input_ids.shape[0] // chunk_size)
    if any(len(x) != nchunks for x in seen):
        return None
    return seen
