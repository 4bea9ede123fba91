"""Quantizing the linears of one decoder block over the calibration chunks.

Every quantizable linear gets a forward pre-hook. When all calibration sequences pass through
the block as one chunk ("in flight"), the hook of a linear sees that linear's complete input:
it forms the Hessian, solves GPTQ, swaps the quantized weight in, and lets the forward
continue. So each linear is solved on inputs that every earlier linear of the block already
quantized (true-sequential), and one forward per block yields both all the solutions and the
next block's input: the minimum work.

When the calibration set is split into several chunks (to bound activation memory), a
linear's Hessian is complete only after every chunk reached it, so the block is replayed:
each pass accumulates the linears whose inputs are final (their earlier linears solved, or
they share their input tensor with one that is, like q/k/v) and stops each chunk at the first
linear that is not; those are solved, and the next pass goes further. Both modes give the
same solutions up to floating-point summation order (GPTQ rounding can cascade from one
flipped tie, so a few layers may differ in many codes).

With several chunks and one process, the default is the chunked in-flight mode (relay.py):
every chunk's forward runs as a coroutine; a chunk that reaches a linear whose Hessian is not
complete adds its input and hands over to the next chunk; the last one solves the linear and
every chunk continues its suspended forward. That is one forward per block, as in flight, with
one chunk's transients alive at a time, and the same Hessians (same chunks, same order, same
per-chunk forwards) as the replay, so the same bytes. Blocks with routed experts (a chunk may
skip a linear or call it twice) and chunks that stop at different linears use the replay.

Under torch.distributed each rank holds its own share of the chunks; the replay is used,
completeness of each linear is agreed over the ranks, and collective.solve_linears() sums the
Hessians and spreads the solves over the ranks.

[GPTAQ] With `floats` (floats.py), each chunk's float-model forward runs just before the chunk's
first quantized hook in every strategy, and each accumulation pairs the linear's input with the
float model's input of the same chunk (the cross term next to the Hessian).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..errors import NumericalError
from ..models.arch import has_fused_or_routed
from ..quant.gptq import Hessian
from . import collective
from .activations import Activations
from .capture import Extras, Stop, first_output
from .floats import FloatInputs
from .linears import LinearJob, solve
from .relay import Relay, Undecided

log = logging.getLogger(__name__)

# False forces the replay for several chunks (tests compare the two modes byte for byte).
CHUNKED_IN_FLIGHT = True


@dataclass
class ChunkPass:
    """State of one chunk's forward through the block, dropped when the forward ends."""
    chunk: int
    mask: torch.Tensor | None
    shared: list[tuple[torch.Tensor, Hessian]] = field(default_factory=list)  # (input, its Hessian)
    seen: list[torch.Tensor] = field(default_factory=list)  # inputs of the linears accumulated (replay)
    blocked: bool = False  # a linear was accumulated: later ones wait unless they share its input


# on_input(pass, linear, its input x) runs before each quantizable linear; it may raise Stop
OnInput = Callable[[ChunkPass, LinearJob, torch.Tensor], None]


class BlockQuantizer:
    def __init__(self, block: nn.Module, jobs: list[LinearJob], extras: list[Extras], acts: Activations,
                 masks: list[torch.Tensor | None], zero_min: int, sequential: bool, where: str,
                 float_acts: Activations | None = None):
        """float_acts: [GPTAQ] the float model's hidden states (the block's float input, and
        where its float output goes)."""
        self.block, self.jobs, self.extras, self.acts, self.masks = block, jobs, extras, acts, masks
        self.zero_min, self.sequential, self.where = zero_min, sequential, where
        self.by_module = {id(job.module): job for job in jobs}
        self.forwards = 0.0   # block forwards over the whole calibration set
        self.floats = FloatInputs(block, jobs, extras, float_acts, where) if float_acts is not None else None

    def _float_call(self) -> bool:
        """True while the float forward runs: the quantized side's hooks stay out of it."""
        return self.floats is not None and self.floats.capturing

    def _prepare(self, c: int) -> None:
        if self.floats is not None:
            self.floats.prepare(c)

    def _done(self, c: int) -> None:
        if self.floats is not None:
            self.floats.done(c)

    def _discard(self, job: LinearJob) -> None:
        """Drop an incomplete Hessian: the linear is accumulated again (a later replay pass)."""
        job.hessian = None
        if self.floats is not None:
            self.floats.forget(job)

    def run(self) -> None:
        """Solve every linear, then hand each chunk's output to acts.put() (and, with GPTAQ, its
        float output to the float stream)."""
        self._run()
        if self.floats is not None:
            self.floats.finish()
            self.forwards += self.floats.forwards

    def _run(self) -> None:
        hook = None
        if self.jobs and self.jobs[0].cfg.method == "rtn":
            collective.solve_linears(self.jobs, self.zero_min)  # needs no inputs
        elif self.jobs and not self.sequential:
            self._all_at_once()
        elif self.jobs and len(self.extras) == 1 and not collective.active():
            hook = self._in_flight
        elif self.jobs and self._relay_applies() and self._chunked_in_flight():
            self.forwards += 1  # the chunks' outputs went to acts.put() already
            self._solve_unreached()
            return
        elif self.jobs:  # also when the chunked in-flight mode gave up (returned False)
            self._replay()
        if self.jobs:
            self.forwards += 1
        self._forward(hook, final=True)
        self._solve_unreached()

    def _solve_unreached(self) -> None:
        for job in self.jobs:  # never called in the forward (no tokens routed to it)
            if job.result is None:
                solve(job, self.zero_min)

    def _relay_applies(self) -> bool:
        # [arch/MoE] routed experts may be skipped or called twice by a chunk: the stop points
        # of the chunks cannot be known to agree, so those blocks replay; [torchrun] so do ranks
        return CHUNKED_IN_FLIGHT and not collective.active() and not has_fused_or_routed(self.block)

    # ------------------------------------------------------------------ strategies
    def _all_at_once(self) -> None:
        """Classic GPTQ: every Hessian from the unquantized block, then solve them all."""
        self._forward(self._accumulate)
        self.forwards += 1
        collective.solve_linears(self.jobs, self.zero_min)

    def _in_flight(self, p: ChunkPass, job: LinearJob, x: torch.Tensor) -> None:
        """One chunk holds every sequence: a linear's input is complete when its hook fires."""
        if job.result is None:
            self._accumulate(p, job, x)
            solve(job, self.zero_min)

    def _chunked_in_flight(self) -> bool:
        """Every chunk's forward as a coroutine (relay.py); False: the chunks stopped at different
        linears, the unsolved linears are left for the replay."""
        complete: dict[int, Hessian] = {}   # Hessians every chunk has added its input to
        passes = [ChunkPass(c, self.masks[c]) for c in range(len(self.extras))]
        mine = threading.local()            # the ChunkPass of the chunk a worker thread runs
        nthreads = torch.get_num_threads()

        def on_round(job: LinearJob) -> None:   # the last chunk reached job
            complete[id(job.hessian)] = job.hessian
            solve(job, self.zero_min)

        relay = Relay(len(passes), on_round)

        def pre_hook(module, args):
            if self._float_call():
                return
            job, p, x = self.by_module[id(module)], mine.p, args[0]
            if job.result is not None:
                return
            if not any(x is s for s, _ in p.shared):
                p.shared.clear()  # inputs are shared only by consecutive linears: free the old one
            self._accumulate(p, job, x)
            if id(job.hessian) in complete:  # shares a complete input (k/v after q, up after gate)
                solve(job, self.zero_min)
            else:
                relay.stop(p.chunk, job)

        def work(c: int) -> None:
            mine.p = passes[c]
            torch.set_num_threads(nthreads)  # grad mode and intra-op threads are per thread
            args, kwargs = self.extras[c]
            with torch.no_grad():
                self._prepare(c)  # before the chunk's first stop: no linear is solved yet
                out = self.block(self.acts.get(c), *args, **kwargs)
            self._done(c)
            self.acts.put(c, first_output(out), self.where)
            passes[c] = mine.p = None

        handles = [job.module.register_forward_pre_hook(pre_hook) for job in self.jobs]
        try:
            relay.run(work)
        except Undecided as e:
            log.info("%s: %s; replaying the block instead", self.where, e)
            for job in self.jobs:
                if job.result is None:
                    self._discard(job)
            return False
        finally:
            for h in handles:
                h.remove()
        return True

    def _replay(self) -> None:
        """Several chunks (or ranks): pass after pass, solve the linears every chunk completed."""
        order = {id(job.module): k for k, job in enumerate(self.jobs)}  # registration order
        while any(job.result is None for job in self.jobs):
            fresh, per_chunk, ran_through = self._replay_pass()
            self.forwards += 1  # an upper bound: early exits make passes cheaper

            def complete(lid: int) -> bool:
                # [arch/MoE] with routed experts, chunks may reach different linears first (a
                # chunk skips the experts it routes no token to). A linear's Hessian is complete
                # only if every chunk accumulated it, ran to the end, or went past it
                # (accumulated a linear registered after it: experts run in index order).
                return all(lid in acc or done or any(order[o] > order[lid] for o in acc)
                           for acc, done in zip(per_chunk, ran_through))

            if collective.active():
                self._solve_agreed(complete)
            else:
                self._solve_complete(fresh, complete)

    def _replay_pass(self) -> tuple[set[int], list[set[int]], list[bool]]:
        """Accumulate the linears whose inputs are final; -> (linears accumulated, the same per
        chunk, which chunks ran to the end)."""
        fresh: set[int] = set()
        per_chunk: list[set[int]] = [set() for _ in self.extras]

        def replay(p: ChunkPass, job: LinearJob, x: torch.Tensor) -> None:
            if job.result is not None:
                return
            if p.blocked and not any(x is s for s in p.seen):
                raise Stop
            p.blocked = True  # later linears depend on this one unless they share x
            p.seen.append(x)
            self._accumulate(p, job, x)
            fresh.add(id(job.module))
            per_chunk[p.chunk].add(id(job.module))

        ran_through = [o is not None for o in self._forward(replay)]
        return fresh, per_chunk, ran_through

    def _solve_complete(self, fresh: set[int], complete: Callable[[int], bool]) -> None:
        if not fresh:  # linears no token reached (e.g. unrouted experts)
            fresh = {id(job.module) for job in self.jobs if job.result is None}
        else:
            # incomplete ones start over next pass; the earliest accumulated linear always
            # completes, so this terminates
            for job in self.jobs:
                lid = id(job.module)
                if lid in fresh and not complete(lid):
                    fresh.discard(lid)
                    self._discard(job)
        for job in self.jobs:
            if id(job.module) in fresh:
                solve(job, self.zero_min)

    def _solve_agreed(self, complete: Callable[[int], bool]) -> None:
        """[distributed] solved when complete on every rank (the earliest linear accumulated
        anywhere always is, so the replay terminates)."""
        unsolved = [job for job in self.jobs if job.result is None]
        flags = collective.agree([complete(id(job.module)) for job in unsolved])
        ready = []
        for job, ok in zip(unsolved, flags):
            if ok:
                ready.append(job)
            else:
                self._discard(job)
        collective.solve_linears(ready, self.zero_min)

    # ------------------------------------------------------------------ forwards
    def _forward(self, on_input: OnInput | None, final: bool = False) -> list[bool | None]:
        """Every chunk once through the block; per chunk True (ran to the end) or None (stopped).
        final: the outputs go to acts.put()."""
        p: ChunkPass | None = None

        def pre_hook(module, args):
            if not self._float_call():
                on_input(p, self.by_module[id(module)], args[0])

        handles = [job.module.register_forward_pre_hook(pre_hook) for job in self.jobs] if on_input else []
        ran: list[bool | None] = []
        try:
            for c, (args, kwargs) in enumerate(self.extras):
                p = ChunkPass(c, self.masks[c])
                if on_input is not None:
                    self._prepare(c)
                try:
                    out = self.block(self.acts.get(c), *args, **kwargs)
                except Stop:
                    ran.append(None)
                    continue
                if on_input is not None:
                    self._done(c)
                if final:
                    self.acts.put(c, first_output(out), self.where)
                ran.append(True)
        finally:
            for h in handles:
                h.remove()
        return ran

    def _accumulate(self, p: ChunkPass, job: LinearJob, x: torch.Tensor) -> None:
        # Linears fed the very same tensor (q/k/v, gate/up) share one Hessian: XᵀX is
        # the dominant cost of quantization, so it is formed once per distinct input.
        for seen, h in p.shared:
            if seen is x:
                job.hessian = h
                return
        # [GPTAQ] the float model's input of the same tokens (None: plain GPTQ)
        x_float = self.floats.take(p.chunk, job, x) if self.floats is not None else None
        if job.hessian is None:
            job.hessian = job.new_hessian(x)
        p.shared.append((x, job.hessian))
        mask = p.mask
        t0 = time.perf_counter()
        job.hessian.add(x, mask if mask is not None and mask.shape == x.shape[:-1] else None, x_float)
        job.seconds += time.perf_counter() - t0
        # NaN/Inf in the inputs shows on the Hessian's diagonal: a K-element check instead of a
        # pass over every input element (which cost ~8 % of the block forwards)
        if not job.hessian.finite():
            raise NumericalError(f"the inputs of {job.name} contain NaN/Inf (activations of the earlier layers "
                                 "overflowed or the source weights are damaged); try dtype float32 or check "
                                 "the source checkpoint")
