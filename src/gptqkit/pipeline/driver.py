"""The loop over decoder blocks: calibration ids in, a standard GPTQ checkpoint out.

Data flow (docs/ARCHITECTURE.md): plan the run (plan.py), open the run folder (rundir.py),
capture what block 0 receives (capture.py), then for each block: read its weights, solve its
linears while the calibration chunks flow through it (block.py), keep its outputs as the next
block's inputs (activations.py), write its tensors and commit (writer.py, rundir.py), free it.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import QuantizeConfig
from ..errors import InterruptedRunError
from ..heap import release_heap, return_large_buffers, reuse_large_buffers
from ..models.arch import ArchSpec, get_module, prepare_block, spec_for
from ..models.source import ModelHandle
from . import collective
from .activations import Activations
from .block import BlockQuantizer
from .capture import BlockInputs, capture_inputs
from .head import quantize_lm_head
from .linears import block_jobs, check_layers_fit
from .plan import RunPlan, make_plan, parse_size
from .quant_log import LayerLog, QuantizeReport
from .commits import Commits
from .rundir import RunDir, fault_hook
from .writer import Tensors, write_originals, write_side_files

log = logging.getLogger(__name__)


@dataclass
class _Run:
    """Everything the blocks of one run share."""
    handle: ModelHandle
    spec: ArchSpec
    blocks: nn.ModuleList
    config: QuantizeConfig
    plan: RunPlan
    dir: RunDir
    report: QuantizeReport
    t_start: float
    prior_seconds: float = 0.0      # of the interrupted run this one resumes
    acts: Activations | None = None
    facts: Activations | None = None   # [GPTAQ] the float model's hidden states
    inputs: BlockInputs | None = None
    written: set[str] = field(default_factory=set)   # checkpoint names already produced
    commits: Commits = field(default_factory=lambda: Commits(background=False))

    def seconds(self) -> float:
        return self.prior_seconds + time.perf_counter() - self.t_start


def quantize_model(handle: ModelHandle, input_ids: torch.Tensor, config: QuantizeConfig, out: str | Path, *,
                   attention_mask: torch.Tensor | None = None, tokenizer=None, batch_size: int | None = None,
                   overwrite: bool = False, max_shard_bytes: int = 2 << 30, progress: bool = True,
                   resume: bool = False, max_memory: int | str | None = None) -> QuantizeReport:
    """Quantize `handle`'s model on calibration `input_ids` [n, L] and write a checkpoint at `out`.

    batch_size: sequences per forward chunk; None chooses it from the free memory and the model's
    shapes (plan.auto_chunk, logged). Several chunks still cost one forward per block (block.py).
    resume: continue the unfinished run in `<out>.partial` (see pipeline/rundir.py); the result is
    byte-identical to an uninterrupted run. Ctrl-C raises InterruptedRunError and keeps that folder.
    max_memory ('4GB' or bytes): when the calibration hidden states (inputs and outputs of a block)
    would exceed it, they stay in files under `<out>.partial/hidden` and blocks run chunk by chunk
    (batch_size, or as many sequences as a quarter of the budget holds).
    """
    t_start = time.perf_counter()
    return_large_buffers()
    release_heap()  # tokenizing the calibration text leaves ~150 MB of freed heap on SmolLM2
    spec = spec_for(handle.model)
    blocks = get_module(handle.model, spec.blocks)
    plan = make_plan(handle, spec, blocks, input_ids, attention_mask, config, batch_size=batch_size,
                     max_memory=max_memory, max_shard_bytes=max_shard_bytes)
    run_dir = collective.open_run(out, plan.fingerprint, overwrite=overwrite, resume=resume,
                                  max_shard_bytes=max_shard_bytes)
    plan = _resumed_chunk(plan, run_dir)
    r = _Run(handle, spec, blocks, config, plan, run_dir, QuantizeReport(out=str(out), calib_tokens=plan.calib_tokens),
             t_start)
    r.commits = Commits(background=not collective.active() and not plan.offload
                        and not os.environ.get("GPTQKIT_FAULT"))
    i = start = run_dir.next_block
    cache = reuse_large_buffers(_buffer_cache_cap(handle, max_memory)).__enter__()
    try:
        _begin(r, start)
        bar = tqdm(range(start, len(blocks)), desc="quantizing blocks", disable=not progress or plan.rank != 0,
                   initial=start, total=len(blocks))
        with torch.no_grad():
            for i in bar:
                losses = _quantize_block(r, i)
                bar.set_postfix(loss=f"{sum(losses) / max(1, len(losses)):.3g}")
            outside = _outside_tensors(r)
        r.commits.wait()
        _finish(r, outside, tokenizer)
    except KeyboardInterrupt as e:
        _settle(r.commits)
        raise InterruptedRunError(
            f"interrupted in block {i}; the {run_dir.next_block} finished block(s) are kept in {run_dir.directory}. "
            "Run the same command with --resume (resume=True) to continue") from e
    finally:
        _settle(r.commits)
        if cache.on:
            log.debug("large-buffer cache: %s", cache.stats())
        cache.__exit__(None, None, None)
        run_dir.release()  # the lock on <out>.partial, whatever happened
    return r.report


def _buffer_cache_cap(handle: ModelHandle, max_memory: int | str | None) -> int:
    """Bytes of freed large buffers kept for reuse (heap.reuse_large_buffers): at most an eighth
    of the free memory (or of --max-memory) and 1 GiB; the cache itself never lets its buffers
    in use plus kept exceed the most ever in use, so this cap only matters when memory is short.
    0 (off) when the model computes on an accelerator: its activations are not CPU buffers."""
    if torch.device(handle.device).type != "cpu":
        return 0
    free = psutil.virtual_memory().available
    return min(min(free, parse_size(max_memory) or free) // 8, 1 << 30)


# How long an error or Ctrl-C waits for the block being written before it leaves anyway (a hung
# disk must not hang Ctrl-C; the run state is only replaced once the files are complete, so
# leaving early costs at most that block on --resume).
SETTLE_SECONDS = 30.0


def _settle(commits: Commits) -> None:
    """A block still being written is finished (so it is kept for --resume) before an error
    or Ctrl-C leaves the run; the error that left is the one reported."""
    try:
        if not commits.wait(SETTLE_SECONDS):
            commits.abandon()  # the except and the finally both settle: one wait in all
            log.warning("the last finished block is still being written after %.0f s; leaving without it "
                        "(--resume redoes it)", SETTLE_SECONDS)
    except BaseException:  # noqa: BLE001  already leaving with another exception
        pass


def _resumed_chunk(plan: RunPlan, run_dir: RunDir) -> RunPlan:
    """An automatic chunk size depends on the free memory, so it is not in the fingerprint: a
    resumed run reuses the one the interrupted run recorded (same chunks, same bytes)."""
    saved = run_dir.saved("chunk")
    if plan.auto_chunk and saved and saved != plan.chunk:
        log.info("resuming with the interrupted run's %d sequences per chunk", saved)
        return plan.with_chunk(int(saved))
    return plan


def _begin(r: _Run, start: int) -> None:
    """Restore what the interrupted run recorded, capture the inputs of the blocks."""
    r.report.layers = [LayerLog(**d) for d in r.dir.saved("layers", [])]
    r.report.forwards = r.dir.saved("forwards", 0)
    r.prior_seconds = r.dir.saved("seconds", 0.0)
    if not r.config.needs_calibration():  # RTN: the weights alone decide, no hidden states
        if r.config.lm_head:
            r.handle.materialize_outside(r.spec.blocks)
        return
    r.handle.materialize_outside(r.spec.blocks)
    plan = r.plan
    r.acts = Activations(r.dir, r.handle.device, plan.offload, plan.nchunks, start)
    keep = r.acts.capture
    if r.config.method == "gptaq":
        # [GPTAQ] the float model's stream starts from the same block-0 inputs (the embeddings
        # are not quantized): in memory both streams share those tensors
        r.facts = Activations(r.dir, r.handle.device, plan.offload, plan.nchunks, start, stream="fp")

        def keep(c, h):
            r.acts.capture(c, h)
            r.facts.capture(c, h)
    # [arch] record what each block receives (per-layer masks / rotary tables differ by layer type)
    r.inputs = capture_inputs(r.handle.model, r.blocks, plan.input_ids, plan.attention_mask, plan.chunk, keep)
    if not r.config.lm_head:
        r.handle.release_outside(r.spec.blocks)  # embeddings: needed again only to quantize lm_head
    for a in _streams(r):
        a.resume()  # the hidden states the interrupted run had reached


def _streams(r: _Run) -> list[Activations]:
    return [a for a in (r.acts, r.facts) if a is not None]


def _quantize_block(r: _Run, i: int) -> list[float]:
    """Solve, write and commit block i; -> the losses of its linears."""
    prefix = f"{r.spec.blocks}.{i}"
    r.handle.materialize(prefix)
    block = r.blocks[i]
    # [arch] unfuse 3-D MoE experts into per-expert Linears, Conv1D -> Linear
    r.written.update(prepare_block(block, r.spec, lambda n: r.config.for_module(f"{prefix}.{n}") is not None,
                                   prefix))
    check_layers_fit(block, r.spec, r.config, prefix)
    jobs = block_jobs(block, r.spec, r.config, prefix)
    if r.acts is None:  # RTN only (_begin)
        collective.solve_linears(jobs, r.plan.zero_min)
    else:
        bq = BlockQuantizer(block, jobs, r.inputs.for_block(i), r.acts, r.plan.masks, r.plan.zero_min,
                            r.config.true_sequential, prefix, float_acts=r.facts)
        bq.run()
        r.report.forwards += bq.forwards
        del bq  # [GPTAQ] with it the original weights it kept for the float forward
    for a in _streams(r):
        a.advance(prefix)
    fault_hook("solved", i)
    # write: GPTQ tensors of the solved linears, originals for everything else in the block
    tensors = Tensors()
    for job in jobs:
        tensors.add_solved(job, r.config.checkpoint_format, r.written)
        r.report.layers.append(LayerLog.of(job))
    write_originals(r.handle, tensors, prefix, r.written)
    savers = [a.saver() for a in _streams(r)]
    state = dict(layers=[asdict(x) for x in r.report.layers], forwards=r.report.forwards, seconds=r.seconds(),
                 chunk=r.plan.chunk)

    def write_and_commit() -> None:
        if r.plan.rank == 0:
            r.dir.write_block(i, tensors)
        for save in savers:
            save()
        fault_hook("written", i)
        collective.on_rank0(lambda: r.dir.commit(i + 1, **state))
        fault_hook("committed", i)
    r.commits.submit(write_and_commit)
    del tensors
    r.handle.release(prefix)
    release_heap()
    return [job.result.loss for job in jobs]


def _outside_tensors(r: _Run) -> Tensors:
    """The tensors outside the blocks: the quantized lm_head if asked, the rest as stored."""
    outside = Tensors()
    if r.config.lm_head:
        head = quantize_lm_head(r.handle, r.spec, r.acts, r.plan.masks, r.config, r.plan.zero_min, r.facts)
        if head is not None:
            outside.add_solved(head, r.config.checkpoint_format, r.written)
            r.report.layers.append(LayerLog.of(head))
    write_originals(r.handle, outside, "", r.written, skip_prefix=r.spec.blocks + ".", copy=True)
    return outside


def _finish(r: _Run, outside: Tensors, tokenizer) -> None:
    r.report.seconds = r.seconds()
    r.report.resumed_seconds = r.prior_seconds

    def finish():
        write_side_files(r.handle, r.dir.directory, r.config, tokenizer, r.report)
        r.dir.finalize(len(r.blocks), outside, outside.copies)
    collective.on_rank0(finish)
