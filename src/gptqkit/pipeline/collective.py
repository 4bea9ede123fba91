"""Every torch.distributed step of a quantization run, in one place.

Under `torchrun` each rank holds a contiguous share of the calibration sequences. The ranks meet
only here: they sum each linear's Hessian over all ranks' tokens, solve the linears of a block
round-robin (linear j on rank j % world) and broadcast the solutions so every rank swaps in the
same weights, agree on which linears a replay pass completed, and let rank 0 alone create,
commit and finish the run folder. With one process every step is a plain local call.
No collective runs inside a forward: with routed experts the hooks of different ranks may fire
in different orders.
"""
from __future__ import annotations

from pathlib import Path
import torch

from .. import distributed as D
from ..quant.gptq import Hessian
from ..quant.result import QuantResult
from .linears import LinearJob, check_weights, hessian_dtype, install, solve
from .rundir import RunDir

active = D.active
on_rank0 = D.on_rank0      # fn on rank 0; its error raised on every rank
on_every_rank = D.all_ok   # fn on every rank; an error anywhere raised everywhere


def start(device: str | torch.device) -> tuple[int, int]:
    """(world size, this rank), creating the process group when torchrun launched us."""
    D.maybe_init(device)
    return D.world(), D.rank()


def local_slice(n: int) -> slice:
    """This rank's contiguous share of n calibration sequences."""
    return D.local_slice(n)


def open_run(out: str | Path, fingerprint: str, *, overwrite: bool, resume: bool, max_shard_bytes: int
             ) -> RunDir:
    """The run folder: rank 0 validates or creates it first, the other ranks open it after."""
    world, me = D.world(), D.rank()
    kw = dict(overwrite=overwrite, resume=resume, max_shard_bytes=max_shard_bytes)
    run = D.on_rank0(lambda: RunDir(out, fingerprint, rank=me if world > 1 else None, **kw))
    if me:
        run = RunDir(out, fingerprint, rank=me, **kw)
    return run


def agree(flags: list[bool]) -> list[bool]:
    """Element-wise AND over ranks (a linear is complete only where it is complete everywhere)."""
    return D.all_min_flags(flags)


def reduce_hessian(job: LinearJob) -> None:
    """Replace job's Hessian by the one over every rank's tokens (Σ n·H / Σ n), [GPTAQ] and its
    cross term alike (job.cross is the same on every rank: it depends on the name only)."""
    K = job.module.in_features
    h = job.hessian
    parts = 2 if job.cross else 1
    buf = torch.zeros(parts * K * K + 1, dtype=torch.float64)
    if h is not None and h.n:
        buf[:K * K] = (h.H.double().cpu() * h.n).reshape(-1)
        if job.cross:
            buf[K * K:-1] = (h.dXXt.double().cpu() * h.n).reshape(-1)
        buf[-1] = h.n
    tot = D.all_sum(buf)
    n = int(tot[-1].item())
    w = job.module.weight
    new = Hessian(K, device=w.device, dtype=hessian_dtype(w.dtype, w.device), cross=job.cross)
    if n:
        new.H = (tot[:K * K].reshape(K, K) / n).to(new.H)
        if job.cross:
            new.dXXt = (tot[K * K:-1].reshape(K, K) / n).to(new.dXXt)
        new.n = n
    job.hessian = new


def solve_linears(jobs: list[LinearJob], zero_min: int) -> None:
    """Solve `jobs`. Under torch.distributed: Hessians summed over ranks, linear j solved on rank
    j % world, its codes/scales/zeros/g_idx broadcast, and every rank swaps in the same weight."""
    if not D.active():
        for job in jobs:
            solve(job, zero_min)
        return
    for job in jobs:  # the same check on every rank, before any rank waits for another
        check_weights(job)
        if job.cfg.method != "rtn":
            reduce_hessian(job)
    world, me = D.world(), D.rank()
    for j, job in enumerate(jobs):
        if j % world == me:
            solve(job, zero_min)
    for j, job in enumerate(jobs):
        _broadcast_solution(job, j % world)


def _broadcast_solution(job: LinearJob, src: int) -> None:
    me = D.rank()
    r = job.result
    meta = D.broadcast_object(None if me != src else (r.loss, r.damp, r.method, job.tokens, job.seconds,
                                                      tuple(r.scales.shape)), src)
    loss, damp, method, tokens, seconds, gshape = meta
    N, K = job.module.weight.shape
    q = D.broadcast_tensor(r.q if me == src else None, src, ((N, K), torch.int32))
    scales = D.broadcast_tensor(r.scales if me == src else None, src, (gshape, torch.float32))
    zeros = D.broadcast_tensor(r.zeros if me == src else None, src, (gshape, torch.int32))
    g_idx = D.broadcast_tensor(r.g_idx if me == src else None, src, ((K,), torch.int32))
    if me != src:
        dev = job.module.weight.device
        install(job, QuantResult(q=q.to(dev), scales=scales.to(dev), zeros=zeros.to(dev), g_idx=g_idx.to(dev),
                                 loss=loss, damp=damp, method=method))
        job.tokens, job.seconds = tokens, seconds

