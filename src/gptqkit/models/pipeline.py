"""The layer-by-layer driver: calibration ids in, a standard GPTQ checkpoint out.

For each decoder block, every quantizable nn.Linear gets a forward pre-hook. When all
calibration sequences pass through the block as one batch ("in-flight" mode), the hook of a
linear sees that linear's complete input: it forms the Hessian, solves GPTQ, swaps the
quantized weight in, and lets the forward continue. So each linear is solved on inputs that
every earlier linear of the block already quantized (true-sequential), and one forward per
block yields both all the solutions and the next block's input: the minimum work.

When the calibration set is split into several chunks (to bound activation memory), a
linear's Hessian is complete only after every chunk reached it, so the block is replayed:
each pass accumulates the linears whose inputs are final (their earlier linears solved, or
they share their input tensor with one that is, like q/k/v) and stops each chunk at the first
linear that is not; those are solved, and the next pass goes further. Both modes give the
same solutions up to floating-point summation order (GPTQ rounding can cascade from one
flipped tie, so a few layers may differ in many codes).
"""
from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed as D
from ..config import QuantizeConfig
from ..errors import ConfigError, InterruptedRunError, NumericalError
from ..formats.checkpoint import gptq_tensors
from ..quant.gptq import Hessian, gptq_solve
from ..quant.result import QuantResult
from ..quant.rtn import rtn_solve
from .resume import RunDir, fault_hook, fingerprint
from .arch import ArchSpec, block_linears, get_module, prepare_block, spec_for
from .source import ModelHandle

log = logging.getLogger(__name__)


@dataclass
class LayerLog:
    name: str
    bits: int
    group_size: int
    method: str
    loss: float
    damp: float
    tokens: int
    seconds: float


@dataclass
class QuantizeReport:
    out: str
    layers: list[LayerLog] = field(default_factory=list)
    seconds: float = 0.0
    forwards: int = 0            # block forward passes over the whole calibration set
    calib_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean_loss"] = sum(x.loss for x in self.layers) / max(1, len(self.layers))
        return d


# A linear (typically a rarely routed MoE expert) that saw fewer calibration tokens than this is
# quantized with round-to-nearest instead of GPTQ; the choice is logged per layer.
MIN_GPTQ_TOKENS = 8


class _Stop(Exception):
    """Raised inside a forward to stop it early (input capture, replay early exit)."""


class _OnDisk:
    """[--max-memory] A chunk's hidden states kept in a safetensors file, read when used."""

    def __init__(self, load):
        self.load = load


def _hidden(x):
    return x.load() if isinstance(x, _OnDisk) else x


def release_heap() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise, and per-block buffers of
    many sizes would make the process grow with the number of blocks); a no-op elsewhere."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def parse_size(v: int | str | None) -> int | None:
    """'4GB', '512MiB', '2e9' or an int -> bytes; None stays None."""
    if v is None or isinstance(v, int):
        return v
    import re
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(v))
    if not m:
        raise ConfigError(f"max_memory={v!r} is not a size; write it like 4GB, 512MB or 2e9 (bytes)")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " kmgt".index(m.group(2).lower() or " "))


@dataclass
class _Linear:
    name: str                      # full module name in the model
    module: nn.Linear
    cfg: QuantizeConfig
    hessian: Hessian | None = None
    result: QuantResult | None = None
    seconds: float = 0.0
    tokens: int = 0


def _solve(lin: _Linear, zero_min: int) -> None:
    t0 = time.perf_counter()
    W = lin.module.weight.data
    cfg = lin.cfg
    if not torch.isfinite(W).all():
        raise NumericalError(f"weights of {lin.name} contain NaN/Inf; the source checkpoint is damaged")
    if cfg.method == "rtn":
        res = rtn_solve(W, cfg.bits, cfg.group_size, cfg.sym, cfg.mse, zero_min)
    elif lin.hessian is None or lin.hessian.n == 0:
        log.warning("%s received no calibration tokens; quantized with round-to-nearest", lin.name)
        res = rtn_solve(W, cfg.bits, cfg.group_size, cfg.sym, cfg.mse, zero_min)
        res.method = "rtn-no-tokens"
    elif lin.hessian.n < MIN_GPTQ_TOKENS:
        # [arch/MoE] an expert the router sent only a handful of tokens: a Hessian of rank <= n
        # would let GPTQ overfit those few tokens; round-to-nearest is the sound choice. Logged
        # per layer here and recorded as the method in quant_log.
        log.warning("%s received only %d calibration tokens (< %d); quantized with round-to-nearest",
                    lin.name, lin.hessian.n, MIN_GPTQ_TOKENS)
        res = rtn_solve(W, cfg.bits, cfg.group_size, cfg.sym, cfg.mse, zero_min)
        res.method = "rtn-few-tokens"
    else:
        res = gptq_solve(W, lin.hessian.H, cfg.bits, cfg.group_size, cfg.sym, cfg.desc_act, cfg.static_groups,
                         cfg.damp_percent, cfg.damp_auto_increment, cfg.mse, cfg.blocksize, zero_min)
        if res.method != "gptq":
            log.warning("%s: Hessian unusable even at damp_percent=1; used round-to-nearest", lin.name)
    lin.tokens = lin.hessian.n if lin.hessian is not None else 0
    # swap the quantized weight in, so everything downstream sees quantized outputs
    lin.module.weight.data = res.dequantize().to(W.dtype)
    lin.result = res
    lin.hessian = None
    lin.seconds += time.perf_counter() - t0


def _hessian_dtype(dtype: torch.dtype, device: torch.device | str | None = None) -> torch.dtype:
    """float32 Hessians, float64 when the model computes in float64 on the CPU (used for exact
    comparisons); always float32 on CUDA, where float64 runs at a fraction of the fp32 rate."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.float32
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reduce_hessian(lin: _Linear) -> None:
    """[distributed] Replace lin's Hessian by the one over every rank's tokens (Σ n·H / Σ n)."""
    K = lin.module.in_features
    h = lin.hessian
    buf = torch.zeros(K * K + 1, dtype=torch.float64)
    if h is not None and h.n:
        buf[:-1] = (h.H.double().cpu() * h.n).reshape(-1)
        buf[-1] = h.n
    tot = D.all_sum(buf)
    n = int(tot[-1].item())
    new = Hessian(K, device=lin.module.weight.device, dtype=_hessian_dtype(lin.module.weight.dtype,
                                                                        lin.module.weight.device))
    if n:
        new.H = (tot[:-1].reshape(K, K) / n).to(new.H)
        new.n = n
    lin.hessian = new


def solve_linears(lins: list[_Linear], zero_min: int) -> None:
    """Solve `lins`. Under torch.distributed: Hessians summed over ranks, linear j solved on rank
    j % world, its codes/scales/zeros/g_idx broadcast, and every rank swaps in the same weight."""
    if not D.active():
        for lin in lins:
            _solve(lin, zero_min)
        return
    for lin in lins:  # the same check on every rank, before any rank waits for another
        if not torch.isfinite(lin.module.weight.data).all():
            raise NumericalError(f"weights of {lin.name} contain NaN/Inf; the source checkpoint is damaged")
        if lin.cfg.method != "rtn":
            _reduce_hessian(lin)
    world, me = D.world(), D.rank()
    for j, lin in enumerate(lins):
        if j % world == me:
            _solve(lin, zero_min)
    for j, lin in enumerate(lins):
        src = j % world
        r = lin.result
        meta = D.broadcast_object(None if me != src else (r.loss, r.damp, r.method, lin.tokens, lin.seconds,
                                                          tuple(r.scales.shape)), src)
        loss, damp, method, tokens, seconds, gshape = meta
        N, K = lin.module.weight.shape
        q = D.broadcast_tensor(r.q if me == src else None, src, ((N, K), torch.int32))
        scales = D.broadcast_tensor(r.scales if me == src else None, src, (gshape, torch.float32))
        zeros = D.broadcast_tensor(r.zeros if me == src else None, src, (gshape, torch.int32))
        g_idx = D.broadcast_tensor(r.g_idx if me == src else None, src, ((K,), torch.int32))
        if me != src:
            dev = lin.module.weight.device
            res = QuantResult(q=q.to(dev), scales=scales.to(dev), zeros=zeros.to(dev), g_idx=g_idx.to(dev),
                              loss=loss, damp=damp, method=method)
            lin.module.weight.data = res.dequantize().to(lin.module.weight.dtype)
            lin.result, lin.hessian, lin.tokens, lin.seconds = res, None, tokens, seconds


class BlockQuantizer:
    """Quantizes the linears of one block over calibration inputs split into chunks.

    Under torch.distributed each rank holds its own share of the chunks; the multi-pass replay
    is used (hooks may fire in different orders on different ranks with routed experts, so no
    collective runs inside a forward), completeness of each linear is agreed over the ranks,
    and solve_linears() sums the Hessians and spreads the solves over the ranks.
    """

    def __init__(self, block: nn.Module, linears: list[_Linear], chunks: list[tuple[tuple, dict]],
                 masks: list[torch.Tensor | None], zero_min: int, sequential: bool, sink=None):
        """sink(ci, hidden): [--max-memory] takes each chunk's output of the final forward (else
        run() returns them); chunks' hidden states may be _OnDisk, read one chunk at a time."""
        self.block, self.linears, self.chunks, self.masks = block, linears, chunks, masks
        self.zero_min, self.sequential, self.sink = zero_min, sequential, sink
        self.by_module = {id(lin.module): lin for lin in linears}
        self.forwards = 0.0

    def _forward(self, hook, final: bool = False) -> list[Any]:
        handles = [lin.module.register_forward_pre_hook(hook) for lin in self.linears]
        outs = []
        try:
            for ci, (args, kwargs) in enumerate(self.chunks):
                self._chunk = ci
                self._shared: list[tuple[torch.Tensor, Hessian]] = []  # (input, its Hessian) this chunk
                self._seen_inputs: list[torch.Tensor] = []   # inputs of accumulated linears
                self._blocked = False
                try:
                    o = self.block(_hidden(args[0]), *args[1:], **kwargs)
                    if not final:
                        o = True  # only "ran to the end" matters; the output is not kept
                    elif self.sink is not None:
                        self.sink(ci, _first(o))
                        o = True
                    outs.append(o)
                except _Stop:
                    outs.append(None)
        finally:
            for h in handles:
                h.remove()
        return outs

    def _accumulate(self, lin: _Linear, x: torch.Tensor) -> None:
        # Linears fed the very same tensor (q/k/v, gate/up) share one Hessian: XᵀX is
        # the dominant cost of quantization, so it is formed once per distinct input.
        for seen, h in self._shared:
            if seen is x:
                lin.hessian = h
                return
        if not torch.isfinite(x).all():
            raise NumericalError(f"the inputs of {lin.name} contain NaN/Inf (activations of the earlier layers "
                                 "overflowed or the source weights are damaged); try dtype float32 or check "
                                 "the source checkpoint")
        if lin.hessian is None:
            lin.hessian = Hessian(x.shape[-1], device=x.device, dtype=_hessian_dtype(x.dtype, x.device))
        self._shared.append((x, lin.hessian))
        mask = self.masks[self._chunk]
        t0 = time.perf_counter()
        lin.hessian.add(x, mask if mask is not None and mask.shape == x.shape[:-1] else None)
        lin.seconds += time.perf_counter() - t0

    def run(self) -> list[Any]:
        cfg0 = self.linears[0].cfg if self.linears else None
        if not self.linears:
            return self._forward(lambda m, a: None, final=True)
        if cfg0.method == "rtn":
            solve_linears(self.linears, self.zero_min)
            self.forwards += 1
            return self._forward(lambda m, a: None, final=True)
        if not self.sequential:
            # classic GPTQ: all Hessians from the unquantized block, then one more forward
            self._forward(lambda m, a: self._accumulate(self.by_module[id(m)], a[0]))
            solve_linears(self.linears, self.zero_min)
            self.forwards += 2
            return self._forward(lambda m, a: None, final=True)
        if len(self.chunks) == 1 and not D.active():
            def inflight(m, a):
                lin = self.by_module[id(m)]
                if lin.result is None:
                    self._accumulate(lin, a[0])
                    _solve(lin, self.zero_min)
            self.forwards += 1
            outs = self._forward(inflight, final=True)
        else:
            order = {id(lin.module): k for k, lin in enumerate(self.linears)}  # registration order
            while any(lin.result is None for lin in self.linears):
                fresh: set[int] = set()
                per_chunk: list[set[int]] = [set() for _ in self.chunks]

                def replay(m, a):
                    lin = self.by_module[id(m)]
                    if lin.result is not None:
                        return
                    x = a[0]
                    ready = not self._blocked or any(x is s for s in self._seen_inputs)
                    if not ready:
                        raise _Stop
                    self._blocked = True  # later linears depend on this one unless they share x
                    self._seen_inputs.append(x)
                    self._accumulate(lin, x)
                    fresh.add(id(lin.module))
                    per_chunk[self._chunk].add(id(lin.module))

                ran_through = [o is not None for o in self._forward(replay)]
                self.forwards += 1  # an upper bound: early exits make passes cheaper

                def complete(lid: int) -> bool:
                    # [arch/MoE] with routed experts, chunks may reach different linears first (a
                    # chunk skips the experts it routes no token to). A linear's Hessian is complete
                    # only if every chunk accumulated it, ran to the end, or went past it
                    # (accumulated a linear registered after it: experts run in index order).
                    return all(lid in acc or done or any(order[o] > order[lid] for o in acc)
                               for acc, done in zip(per_chunk, ran_through))

                if D.active():
                    # solved when complete on every rank (the earliest linear accumulated anywhere
                    # always is, so this terminates)
                    unsolved = [lin for lin in self.linears if lin.result is None]
                    flags = D.all_min_flags([complete(id(lin.module)) for lin in unsolved])
                    ready = []
                    for lin, ok in zip(unsolved, flags):
                        if ok:
                            ready.append(lin)
                        else:
                            lin.hessian = None
                    solve_linears(ready, self.zero_min)
                    continue
                if not fresh:  # linears no token reached (e.g. unrouted experts)
                    fresh = {id(lin.module) for lin in self.linears if lin.result is None}
                else:
                    # incomplete ones start over next pass; the earliest accumulated linear always
                    # completes, so this terminates
                    for lin in self.linears:
                        lid = id(lin.module)
                        if lid in fresh and not complete(lid):
                            fresh.discard(lid)
                            lin.hessian = None
                for lin in self.linears:
                    if id(lin.module) in fresh:
                        _solve(lin, self.zero_min)
            self.forwards += 1
            outs = self._forward(lambda m, a: None, final=True)
        for lin in self.linears:  # never called in the forward (no tokens routed to it)
            if lin.result is None:
                _solve(lin, self.zero_min)
        return outs


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _run_until_stopped(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       chunk_size: int) -> None:
    """Run the model over each chunk of sequences; a hook raising _Stop ends that chunk's forward."""
    with torch.inference_mode():
        for s in range(0, input_ids.shape[0], chunk_size):
            am = attention_mask[s:s + chunk_size] if attention_mask is not None else None
            try:
                model(input_ids=input_ids[s:s + chunk_size], attention_mask=am, use_cache=False)
            except _Stop:
                pass


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor | None, chunk_size: int, keep=None
                         ) -> list[tuple[tuple, dict]]:
    """Run the model up to block 0 for each chunk of sequences; return what block 0 received.
    keep(c, hidden) may replace each chunk's hidden states (e.g. by an _OnDisk)."""
    captured: list[tuple[tuple, dict]] = []

    def hook(module, args, kwargs):
        if keep is not None:
            args = (keep(len(captured), args[0]),) + tuple(args[1:])
        captured.append((args, kwargs))
        raise _Stop

    h = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        _run_until_stopped(model, input_ids, attention_mask, chunk_size)
    finally:
        h.remove()
    if len(captured) != -(-input_ids.shape[0] // chunk_size):
        raise RuntimeError("could not capture the inputs of the first decoder block")
    return captured


def capture_per_block_inputs(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor,
                             attention_mask: torch.Tensor | None, chunk_size: int, keep=None
                             ) -> tuple[list[tuple[tuple, dict]], list[list[tuple[tuple, dict]]]] | None:
    """[arch] What every block receives besides its hidden states, from one normal forward.

    Blocks may get per-layer inputs chosen inside the decoder loop (Gemma2/3 pick a sliding or
    global mask and rotary table by layer type), so block 0's kwargs are not always right for
    block i. Every block's forward is replaced by a stub that records (args, kwargs) and passes
    its hidden states through unchanged (as a 1-tuple, which suits loops that take `out[0]`
    and loops that pass the output on as is); the last one stops the forward. Returns
    (block 0's full inputs per chunk, [per block: per chunk (args[1:], kwargs)]), or None if
    the decoder loop does not tolerate the stubs (the caller then reuses block 0's kwargs).
    """
    n = len(blocks)
    seen: list[list[tuple[tuple, dict]]] = [[] for _ in range(n)]
    first: list[tuple[tuple, dict]] = []

    def stub(i):
        def forward(*args, **kwargs):
            if not args and "hidden_states" in kwargs:
                kwargs = dict(kwargs)
                args = (kwargs.pop("hidden_states"),)
            h = args[0]
            if i == 0:
                first.append(((keep(len(first), h),) + tuple(args[1:]), kwargs) if keep is not None
                             else (args, kwargs))
            seen[i].append((tuple(args[1:]), kwargs))
            if i == n - 1:
                raise _Stop
            return (_first(h),)
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
    if len(first) != nchunks or any(len(x) != nchunks for x in seen):
        return None
    return first, seen


def check_layers_fit(block: nn.Module, spec: ArchSpec, config: QuantizeConfig, prefix: str) -> None:
    """Fail before any compute if a layer's shape cannot be stored in the GPTQ format."""
    for n, m in block_linears(block, spec).items():
        cfg = config.for_module(f"{prefix}.{n}")
        if cfg is None:
            continue
        K = m.in_features
        need = 32 if cfg.bits == 3 else 32 // cfg.bits
        if K % need:
            raise ConfigError(f"{prefix}.{n} has {K} inputs; {cfg.bits}-bit qweight packs {need} inputs per "
                              f"word, so K must be a multiple of {need}. Skip it with a dynamic rule "
                              f"{{'-:{n}': {{}}}} or pick other bits")
        if cfg.group_size > K:
            raise ConfigError(f"group size {cfg.group_size} is larger than {prefix}.{n}, which has {K} inputs; use "
                              f"a group size of at most {K}, or -1 for one group per row")


class _Tensors(dict):
    """An ordered name -> tensor collection with ShardWriter's add/add_all; `copies` lists
    source tensors to be copied byte for byte at finalize (never read into memory)."""

    def __init__(self):
        super().__init__()
        self.copies: list[tuple[Path, list[str]]] = []

    def add_copy(self, name: str, file: Path) -> None:
        if self.copies and self.copies[-1][0] == file:
            self.copies[-1][1].append(name)
        else:
            self.copies.append((file, [name]))

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self[name] = tensor.detach().cpu().contiguous()

    def add_all(self, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        for k, v in tensors.items():
            self.add(f"{prefix}.{k}" if prefix else k, v)


def quantize_model(handle: ModelHandle, input_ids: torch.Tensor, config: QuantizeConfig, out: str | Path, *,
                   attention_mask: torch.Tensor | None = None, tokenizer=None, batch_size: int | None = None,
                   overwrite: bool = False, max_shard_bytes: int = 2 << 30, progress: bool = True,
                   resume: bool = False, max_memory: int | str | None = None) -> QuantizeReport:
    """Quantize `handle`'s model on calibration `input_ids` [n, L] and write a checkpoint at `out`.

    batch_size: sequences per forward chunk; None puts all of them in one chunk (least work).
    resume: continue the unfinished run in `<out>.partial` (see models/resume.py); the result is
    byte-identical to an uninterrupted run. Ctrl-C raises InterruptedRunError and keeps that folder.
    max_memory ('4GB' or bytes): when the calibration hidden states (inputs and outputs of a block)
    would exceed it, they stay in files under `<out>.partial/hidden` and blocks run chunk by chunk
    (batch_size, or as many sequences as a quarter of the budget holds).
    """
    t_start = time.perf_counter()
    model = handle.model
    spec = spec_for(model)
    blocks = get_module(model, spec.blocks)
    D.maybe_init(handle.device)
    world, me = D.world(), D.rank()
    if input_ids.shape[0] < world:
        raise ConfigError(f"{input_ids.shape[0]} calibration sequences cannot be split over {world} processes; "
                          "use more samples or fewer processes")
    calib_tokens = int(attention_mask.sum()) if attention_mask is not None else input_ids.numel()
    full_ids, full_mask = input_ids, attention_mask
    if world > 1:  # [distributed] this rank's share of the calibration sequences
        sl = D.local_slice(input_ids.shape[0])
        input_ids = input_ids[sl]
        attention_mask = attention_mask[sl] if attention_mask is not None else None
    nseq = input_ids.shape[0]
    chunk = batch_size or nseq
    max_memory = parse_size(max_memory)
    offload = False
    if max_memory is not None:
        width = getattr(handle.config.get_text_config(), "hidden_size", None) or getattr(handle.config, "n_embd", 0)
        per_seq = input_ids.shape[1] * width * torch.tensor([], dtype=handle.dtype).element_size()
        offload = not width or 2 * nseq * per_seq > max_memory
        if offload:
            chunk = batch_size or max(1, min(nseq, max_memory // (4 * max(per_seq, 1))))
            log.info("calibration hidden states (%.0f MB) exceed max_memory (%.0f MB): kept on disk, "
                     "%d sequences per chunk", 2 * nseq * per_seq / 1e6, max_memory / 1e6, chunk)
    zero_min = 1 if (config.checkpoint_format == "gptq" and not config.sym) else 0
    if zero_min:
        log.info("asymmetric quantization in checkpoint_format 'gptq' (v1): zero points kept >= 1, "
                 "since v1 cannot store 0 (use checkpoint_format='gptq_v2' to lift this)")
    for i, blk in enumerate(blocks[:1]):
        check_layers_fit(blk, spec, config, f"{spec.blocks}.{i}")

    fp = fingerprint(handle.path, list(set(handle.source.where.values())), config.to_dict(), full_ids,
                     full_mask, chunk=chunk, dtype=str(handle.dtype),
                     max_shard_bytes=max_shard_bytes, lm_head=config.lm_head, world=world)
    rank_arg = me if world > 1 else None
    run = D.on_rank0(lambda: RunDir(out, fp, overwrite=overwrite, resume=resume, max_shard_bytes=max_shard_bytes,
                                    rank=rank_arg))
    if me:
        run = RunDir(out, fp, overwrite=overwrite, resume=resume, max_shard_bytes=max_shard_bytes, rank=me)
    start = run.next_block
    i = start
    try:
        report = QuantizeReport(out=str(out), calib_tokens=calib_tokens)
        report.layers = [LayerLog(**d) for d in run.saved("layers", [])]
        report.forwards = run.saved("forwards", 0)
        prior_seconds = run.saved("seconds", 0.0)
        handle.materialize_outside(spec.blocks)
        dev = handle.device
        input_ids = input_ids.to(dev)
        attention_mask = attention_mask.to(dev) if attention_mask is not None else None
        # [arch] record what each block receives (per-layer masks / rotary tables differ by layer type)
        def on_disk(i: int, c: int) -> _OnDisk:
            return _OnDisk(lambda: run.load_hidden(i, c).to(dev))

        def keep(c: int, h: torch.Tensor) -> _OnDisk:  # [--max-memory] block 0's inputs go to disk at once
            run.write_hidden(0, c, h)
            return on_disk(0, c)

        keep = keep if offload and not start else None
        per_block = capture_per_block_inputs(model, blocks, input_ids, attention_mask, chunk, keep)
        if per_block is not None:
            chunks, block_rest = per_block
        else:
            chunks, block_rest = capture_block_inputs(model, blocks, input_ids, attention_mask, chunk, keep), None
        if not config.lm_head:
            handle.release_outside(spec.blocks)  # embeddings: needed again only to quantize lm_head
        if start:  # the hidden states the interrupted run had reached
            chunks = [((on_disk(start, c) if offload else run.load_hidden(start, c).to(dev),) + tuple(args[1:]), kw)
                      for c, (args, kw) in enumerate(chunks)]
        masks = [attention_mask[s:s + chunk].bool() if attention_mask is not None else None
                 for s in range(0, nseq, chunk)]
        written: set[str] = set()

        bar = tqdm(range(start, len(blocks)), desc="quantizing blocks", disable=not progress or me != 0,
                   initial=start, total=len(blocks))
        with torch.no_grad():
            for i in bar:
                prefix = f"{spec.blocks}.{i}"
                handle.materialize(prefix)
                block = blocks[i]
                if block_rest is not None:  # [arch] this block's own kwargs (and extra positional args)
                    chunks = [((args[0],) + tuple(rest), kw) for (args, _), (rest, kw) in zip(chunks, block_rest[i])]
                # [arch] unfuse 3-D MoE experts into per-expert Linears, Conv1D -> Linear
                written.update(prepare_block(block, spec, lambda n: config.for_module(f"{prefix}.{n}") is not None,
                                             prefix))
                check_layers_fit(block, spec, config, prefix)
                lins = []
                for n, m in block_linears(block, spec).items():
                    cfg = config.for_module(f"{prefix}.{n}")
                    if cfg is not None:
                        lins.append(_Linear(f"{prefix}.{n}", m, cfg))
                def check(h: torch.Tensor, prefix=prefix) -> None:
                    if not torch.isfinite(h).all():
                        raise NumericalError(f"activations after {prefix} contain NaN/Inf; try a higher-precision "
                                             "compute dtype (float32) or check the source weights")

                def sink(c: int, h: torch.Tensor, i=i) -> None:  # [--max-memory] outputs straight to disk
                    check(h)
                    run.write_hidden(i + 1, c, h)

                bq = BlockQuantizer(block, lins, chunks, masks, zero_min, config.true_sequential,
                                    sink=sink if offload else None)
                outs = bq.run()
                report.forwards += bq.forwards
                if offload:
                    chunks = [((on_disk(i + 1, c),) + tuple(args[1:]), kw) for c, (args, kw) in enumerate(chunks)]
                else:
                    for o in outs:
                        check(_first(o))
                    chunks = [((_first(o),) + tuple(args[1:]), kwargs) for (args, kwargs), o in zip(chunks, outs)]
                del outs
                fault_hook("solved", i)
                # write: GPTQ tensors of the solved linears, originals for everything else in the block
                tensors = _Tensors()
                for lin in lins:
                    bias = lin.module.bias
                    tensors.add_all(lin.name, gptq_tensors(lin.result, lin.cfg.bits, config.checkpoint_format, bias))
                    written.update({f"{lin.name}.weight", f"{lin.name}.bias"})
                    report.layers.append(LayerLog(lin.name, lin.cfg.bits, lin.cfg.group_size, lin.result.method,
                                                  lin.result.loss, lin.result.damp, lin.tokens,
                                                  round(lin.seconds, 4)))
                _write_originals(handle, tensors, prefix, written)
                if me == 0:
                    run.write_block(i, tensors)
                if not offload:
                    D.all_ok(lambda: [run.write_hidden(i + 1, c, args[0]) for c, (args, _) in enumerate(chunks)])
                fault_hook("written", i)
                D.on_rank0(lambda: run.commit(i + 1, layers=[asdict(x) for x in report.layers],
                                              forwards=report.forwards,
                                              seconds=prior_seconds + time.perf_counter() - t_start))
                fault_hook("committed", i)
                del tensors
                handle.release(prefix)
                release_heap()
                bar.set_postfix(loss=f"{sum(l.result.loss for l in lins) / max(1, len(lins)):.3g}")

            outside = _Tensors()
            if config.lm_head:
                _quantize_lm_head(handle, spec, chunks, masks, config, zero_min, outside, written, report)
        _write_originals(handle, outside, "", written, skip_prefix=spec.blocks + ".", copy=True)

        report.seconds = prior_seconds + time.perf_counter() - t_start

        def finish():
            _write_side_files(handle, run.directory, config, tokenizer, report)
            run.finalize(len(blocks), outside, outside.copies)
        D.on_rank0(finish)
    except KeyboardInterrupt as e:
        raise InterruptedRunError(
            f"interrupted in block {i}; the {run.next_block} finished block(s) are kept in {run.directory}. "
            "Run the same command with --resume (resume=True) to continue") from e
    finally:
        run.release()  # the lock on <out>.partial, whatever happened
    return report


def _write_originals(handle: ModelHandle, writer, prefix: str, written: set[str], skip_prefix: str | None = None,
                     copy: bool = False) -> None:
    """Write the not-quantized tensors under `prefix` ('' = all remaining, except those under
    `skip_prefix`) in their stored dtype."""
    if handle.streaming:
        names = handle.keys_under(prefix) if prefix else list(handle.source.keys())
        for k in names:
            if skip_prefix and k.startswith(skip_prefix):
                continue
            if k not in written:
                if copy:  # as stored, straight from the source file (the embeddings are large)
                    writer.add_copy(k, handle.source.where[k])
                else:
                    writer.add(k, handle.original(k))
                written.add(k)
    else:
        sd = handle.model.state_dict()
        for k, v in sd.items():
            if skip_prefix and k.startswith(skip_prefix):
                continue
            if (not prefix or k.startswith(prefix + ".")) and k not in written and v.device.type != "meta":
                if prefix == "" and _is_tied_copy(handle.model, k):
                    continue
                writer.add(k, v)
                written.add(k)


def _is_tied_copy(model: nn.Module, name: str) -> bool:
    return name == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


def _quantize_lm_head(handle, spec, chunks, masks, config, zero_min, writer, written, report) -> None:
    model = handle.model
    head = model.get_output_embeddings()
    cfg = config.for_module("lm_head")
    if head is None or cfg is None:
        return
    norm = get_module(model, spec.final_norm)
    lin = _Linear("lm_head", head, cfg)
    if cfg.method != "rtn":
        lin.hessian = Hessian(head.in_features, device=handle.device)
        for (args, _), m in zip(chunks, masks):
            x = norm(_hidden(args[0])) if norm is not None else _hidden(args[0])
            lin.hessian.add(x, m)
    if lin.hessian is not None and D.active():
        _reduce_hessian(lin)  # every rank solves it alike from the summed Hessian
    if getattr(model.config, "tie_word_embeddings", False):
        # the quantized head can no longer share the embedding matrix
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    _solve(lin, zero_min)
    writer.add_all("lm_head", gptq_tensors(lin.result, cfg.bits, config.checkpoint_format, head.bias))
    written.update({"lm_head.weight", "lm_head.bias"})
    report.layers.append(LayerLog("lm_head", cfg.bits, cfg.group_size, lin.result.method, lin.result.loss,
                                  lin.result.damp, lin.tokens, round(lin.seconds, 4)))


def _write_side_files(handle: ModelHandle, folder: Path, config: QuantizeConfig, tokenizer,
                      report: QuantizeReport) -> None:
    import shutil
    cfg = handle.model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.save_pretrained(folder)
    cj = json.loads((folder / "config.json").read_text())
    cj["quantization_config"] = config.to_dict()
    (folder / "config.json").write_text(json.dumps(cj, indent=2, sort_keys=True) + "\n")
    config.save(folder)
    for extra in ("generation_config.json",):
        if (handle.path / extra).is_file():
            shutil.copy(handle.path / extra, folder / extra)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    rows = [asdict(x) for x in report.layers]
    (folder / "quant_log.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    with open(folder / "quant_log.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(LayerLog.__dataclass_fields__))
        w.writeheader()
        w.writerows(rows)
