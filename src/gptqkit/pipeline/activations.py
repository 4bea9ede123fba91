"""The hidden states entering the current block, one tensor per calibration chunk, behind one
interface whether they are held in memory or (--max-memory) kept in the run folder and read one
chunk at a time. After each block the inputs of the next block are saved in the run folder
either way, which is what lets an interrupted run resume exactly where it stopped.

[GPTAQ] A second instance (stream "fp") holds the full-precision model's hidden states alike.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import NumericalError
from . import collective
from .rundir import RunDir


def check_finite(h: torch.Tensor, where: str) -> None:
    if not torch.isfinite(h).all():
        raise NumericalError(f"activations after {where} contain NaN/Inf; try a higher-precision "
                             "compute dtype (float32) or check the source weights")


class Activations:
    def __init__(self, run: RunDir, device: torch.device | str, offload: bool, nchunks: int, start: int = 0,
                 stream: str = "in"):
        """start > 0: resuming; the inputs of block `start` are those the interrupted run saved.
        stream: the run folder's file prefix ('in', or 'fp' for the float model's states)."""
        self.run, self.device, self.offload, self.nchunks, self.stream = run, device, offload, nchunks, stream
        self.block = start              # whose inputs get() returns
        self._held: list[torch.Tensor | None] = [None] * nchunks
        self._next: list[torch.Tensor | None] = [None] * nchunks

    def capture(self, c: int, h: torch.Tensor) -> None:
        """Chunk c's hidden states entering block 0, as the input capture sees them."""
        if self.block:  # resuming: block `start` reads its saved inputs instead
            return
        if self.offload:  # straight to disk, never all in memory
            self.run.write_hidden(0, c, h, self.stream)
        else:
            self._held[c] = h

    def resume(self) -> None:
        if self.block and not self.offload:
            self._held = [self.run.load_hidden(self.block, c, self.stream).to(self.device)
                          for c in range(self.nchunks)]

    def get(self, c: int) -> torch.Tensor:
        if self.offload:
            return self.run.load_hidden(self.block, c, self.stream).to(self.device)
        return self._held[c]

    def put(self, c: int, h: torch.Tensor, where: str) -> None:
        """Chunk c's output of the current block (the next block's input); `where` names the
        block in errors."""
        if self.offload:
            check_finite(h, where)
            self.run.write_hidden(self.block + 1, c, h, self.stream)
        else:
            self._next[c] = h

    def advance(self, where: str) -> None:
        """The outputs put() received become the inputs get() returns."""
        if not self.offload:
            for h in self._next:
                check_finite(h, where)
            self._held, self._next = self._next, [None] * self.nchunks
        self.block += 1

    def save(self) -> None:
        """Write the current inputs to the run folder (offloaded ones are there already); every
        rank writes its own chunks."""
        self.saver()()

    def saver(self) -> Callable[[], None]:
        """save() bound to the current inputs: it may run later (on the commit thread), after
        advance() moved on; the forward never writes into its input, so they stay as they are."""
        if self.offload:
            return lambda: None
        block, held, stream = self.block, list(self._held), self.stream
        return lambda: collective.on_every_rank(lambda: [self.run.write_hidden(block, c, h, stream)
                                                         for c, h in enumerate(held)])
