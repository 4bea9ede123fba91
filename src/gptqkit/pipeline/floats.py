"""[GPTAQ] The full-precision model's side of a block.

GPTAQ solves each linear for ||W·X̃ − Q·X||²: X is what the linear receives in the partially
quantized model (the pipeline's usual stream), X̃ what it receives in the float model. So a
second activation stream runs alongside the first (an Activations of its own, saved in the run
folder like the quantized one, so a resumed run gets the same X̃): block k's float output is
block k with its ORIGINAL weights applied to block k's float input.

Per calibration chunk, `prepare(c)` runs that float forward and keeps (`stash`) the input each
paired linear receives (q/k/v get the same tensor, like their shared Hessian); the quantized
forward's pre-hook then `take`s the X̃ of the same chunk (same tokens, same order) to add the
cross term next to the Hessian, and the stash drops it at once, with the entries of the linears
called right after it on the very same input (they share that Hessian: pipeline/block.py), so
the tensor is freed. A linear fed that input again later (GPT-J's MLP after its attention output)
keeps its own entry until it takes it; whatever a chunk did not take is dropped when its
forward ends (`done`).

The float forward must see the block's original weights: every strategy runs a chunk's float
forward before that chunk's first quantized hook, hence before any linear of the block is
solved; should one run later (a replay that must accumulate a linear again), the solved linears
get their original weights back for its duration (so the block's original weights stay
referenced until the block is done: one block's weights more).

Speed: on a CPU with native bf16 and at ≤ 4 bits the float forward runs under bf16 autocast
(quant/gptq.py, float_forward_dtype: why that is safe there and not at 8 bits); its output goes on
in the stream's own dtype.

Memory: in the chunked in-flight mode every suspended chunk holds its stash (at most the inputs
of the linears it has not reached yet: ~2·hidden + intermediate values per token after the first
stop), and both streams hold a block's inputs and outputs; plan.py counts both.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from ..quant.gptq import float_forward_dtype
from .activations import Activations
from .capture import Extras, first_output
from .linears import LinearJob

log = logging.getLogger(__name__)


class FloatInputs:
    def __init__(self, block: nn.Module, jobs: list[LinearJob], extras: list[Extras], acts: Activations, where: str):
        self.block, self.extras, self.acts, self.where = block, extras, acts, where
        self.jobs = jobs
        self.bits = max((job.cfg.bits for job in jobs), default=0)  # the float forward's bf16 rule reads it
        self.paired = {id(job.module): job for job in jobs if job.cross}
        # the weights every linear had before it was solved (install() swaps in a new tensor)
        self.original = {id(job.module): job.module.weight.data for job in jobs}
        self.stash: list[dict[int, torch.Tensor] | None] = [None] * len(extras)
        # per chunk: linear -> the linears called right after it on the same input tensor
        self.followers: list[dict[int, list[int]]] = [{} for _ in extras]
        self.sent = [False] * len(extras)    # chunk's float output handed to the float stream
        # per chunk: linears whose X̃ the chunk consumed into a Hessian since discarded
        self.lost: list[set[int]] = [set() for _ in extras]
        self.chunk_forwards = 0
        self.capturing = False          # quantized-side hooks ignore the float forward's calls
        unpaired = [job.name for job in jobs if not job.cross]
        if unpaired:
            log.info("%s: %d routed-expert linears get plain GPTQ (their tokens differ between the float and "
                     "the quantized model, so X̃ cannot be paired with X)", where, len(unpaired))

    @property
    def forwards(self) -> float:
        """Float block forwards over the whole calibration set (chunk forwards / chunks)."""
        return self.chunk_forwards / max(1, len(self.extras))

    def prepare(self, c: int) -> None:
        """Make sure chunk c's X̃ is there for every paired linear that still needs one."""
        if self.stash[c] is None or any(self.paired[i].result is None for i in self.lost[c]):
            self._capture(c)
        self.lost[c].clear()

    def forget(self, job: LinearJob) -> None:
        """job's Hessian was discarded unsolved: chunks that consumed its X̃ need it again."""
        i = id(job.module)
        if i in self.paired:
            for c, st in enumerate(self.stash):
                if st is not None and i not in st:
                    self.lost[c].add(i)

    def _capture(self, c: int) -> None:
        st: dict[int, torch.Tensor] = {}
        calls: list[tuple[int, torch.Tensor]] = []   # every quantizable linear, in call order

        def grab(module, args):
            calls.append((id(module), args[0]))
            if id(module) in self.paired:
                # a linear called twice pairs its first call, the one its Hessian is formed from
                st.setdefault(id(module), args[0])

        handles = [job.module.register_forward_pre_hook(grab) for job in self.jobs]
        args, kwargs = self.extras[c]
        try:
            x = self.acts.get(c)
            fast = float_forward_dtype(x.dtype, x.device, self.bits) if self.bits else None
            with self._original_weights(), torch.no_grad(), \
                    (torch.autocast(x.device.type, fast) if fast is not None else nullcontext()):
                self.capturing = True
                out = self.block(x, *args, **kwargs)
        finally:
            self.capturing = False
            for h in handles:
                h.remove()
        self.chunk_forwards += 1
        if not self.sent[c]:
            self.acts.put(c, first_output(out).to(x.dtype), self.where)
            self.sent[c] = True
        del out
        for i, job in self.paired.items():  # solved ones need no X̃ any more
            if job.result is not None:
                st.pop(i, None)
        followers: dict[int, list[int]] = {}
        for k, (i, t) in enumerate(calls):
            run = followers.setdefault(i, [])
            for j, u in calls[k + 1:]:
                if u is not t:
                    break
                run.append(j)
        self.stash[c], self.followers[c] = st, followers

    @contextmanager
    def _original_weights(self):
        swapped = [job for job in self.jobs if job.result is not None]
        for job in swapped:
            job.module.weight.data, self.original[id(job.module)] = self.original[id(job.module)], job.module.weight.data
        try:
            yield
        finally:
            for job in swapped:
                job.module.weight.data, self.original[id(job.module)] = self.original[id(job.module)], job.module.weight.data

    def take(self, c: int, job: LinearJob, x: torch.Tensor) -> torch.Tensor | None:
        """X̃ of chunk c for `job` (whose input in the quantized forward is x), dropped from the
        stash with the entries of the linears that will share job's Hessian; None if job is
        unpaired."""
        if not job.cross:
            return None
        st = self.stash[c]
        xt = st.pop(id(job.module), None) if st is not None else None
        if xt is None:
            raise RuntimeError(f"{job.name}: no full-precision input recorded for calibration chunk {c} "
                               "(GPTAQ pairs each linear's input in the float and the quantized model)")
        for i in self.followers[c].get(id(job.module), ()):
            if st.get(i) is xt:
                del st[i]
        if xt.shape != x.shape:
            raise RuntimeError(f"{job.name}: the float model's input {tuple(xt.shape)} does not pair with the "
                               f"quantized model's {tuple(x.shape)} token for token; this architecture cannot "
                               "use GPTAQ (quantize with method 'gptq')")
        return xt

    def done(self, c: int) -> None:
        """Chunk c's quantized forward ran to its end: it needs none of what it did not take."""
        if self.stash[c] is not None:
            self.stash[c] = {}

    def finish(self) -> None:
        """Every chunk's float output handed on (blocks with nothing to solve run the float
        forward only here), the stashes and the original weights released."""
        for c in range(len(self.extras)):
            if not self.sent[c]:
                self._capture(c)
        self.stash = [None] * len(self.extras)
        self.followers = [{} for _ in self.extras]
        self.original.clear()
