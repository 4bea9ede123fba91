"""torch.distributed for quantization: calibration sequences split across ranks, Hessians summed,
the linears of a block solved round-robin on different ranks and broadcast; rank 0 writes.

`torchrun --nproc-per-node N -m gptqkit quantize ...` sets WORLD_SIZE/RANK/MASTER_ADDR; the
process group is created here on first use (gloo on CPU, nccl on CUDA) unless the caller made
one. With one process everything below is a no-op.
"""
from __future__ import annotations

import atexit
import logging
import os
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)


def _dist():
    import torch.distributed as dist
    return dist


def maybe_init(device: str | torch.device = "cpu") -> None:
    """Create the default process group when launched by torchrun with more than one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not _dist().is_available():
        return
    dist = _dist()
    if dist.is_initialized():
        return
    dev = torch.device(device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    log.info("process group: backend %s, rank %d of %d", backend, dist.get_rank(), dist.get_world_size())
    # the group we made is torn down before the interpreter's own teardown: left to static
    # destructors, gloo's threads sometimes abort a finished rank ("terminate called without an
    # active exception", seen in about 1 in 6 runs of the 2-process test); destroying it is local
    atexit.register(_destroy)


def _destroy() -> None:
    dist = _dist()
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    d = _dist()
    return d.is_available() and d.is_initialized() and d.get_world_size() > 1


def rank() -> int:
    return _dist().get_rank() if active() else 0


def world() -> int:
    return _dist().get_world_size() if active() else 1


def local_slice(n: int) -> slice:
    """This rank's contiguous share of n calibration sequences (sizes differ by at most one)."""
    w, r = world(), rank()
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return slice(start, start + base + (1 if r < extra else 0))


def _comm_device(t: torch.Tensor) -> torch.Tensor:
    # gloo reduces CPU tensors, nccl CUDA tensors
    if _dist().get_backend() == "nccl":
        return t.cuda()
    return t.cpu()


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of t over ranks (float64 on the wire for Hessians, so the order hardly matters)."""
    if not active():
        return t
    x = _comm_device(t.detach().clone())
    _dist().all_reduce(x)
    return x.to(t.device)


def all_min_flags(flags: list[bool]) -> list[bool]:
    """Element-wise AND of boolean flags over ranks."""
    if not active():
        return flags
    x = _comm_device(torch.tensor([int(f) for f in flags] or [1], dtype=torch.int32))
    _dist().all_reduce(x, op=_dist().ReduceOp.MIN)
    return [bool(v) for v in x.tolist()][:len(flags)]


def broadcast_object(obj: Any, src: int) -> Any:
    if not active():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=src, device=torch.device("cuda") if _dist().get_backend() == "nccl"
                                  else None)
    return box[0]


def broadcast_tensor(t: torch.Tensor | None, src: int, like: tuple[tuple[int, ...], torch.dtype] | None = None
                     ) -> torch.Tensor:
    """t from rank src to all; other ranks pass like=(shape, dtype)."""
    if not active():
        return t
    if rank() == src:
        x = _comm_device(t.detach().contiguous())
    else:
        shape, dtype = like
        x = _comm_device(torch.empty(shape, dtype=dtype))
    _dist().broadcast(x, src=src)
    return x


def on_rank0(fn: Callable[[], Any]) -> Any:
    """Run fn on rank 0; if it raises, every rank raises the same error class and message."""
    if not active():
        return fn()
    err = None
    out = None
    if rank() == 0:
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            err = e
    info = broadcast_object(None if err is None else (type(err), str(err)), 0)
    if err is not None:
        raise err
    if info is not None:
        cls, msg = info
        raise cls(msg)
    return out


def all_ok(fn: Callable[[], Any]) -> Any:
    """Run fn on every rank; if it raised anywhere, raise on every rank (no rank left waiting)."""
    if not active():
        return fn()
    err = None
    out = None
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below
        err = e
    ok = all_min_flags([err is None])[0]
    if err is not None:
        raise err
    if not ok:
        from .errors import CheckpointError
        raise CheckpointError("another process failed to write its part of the run state; see its log")
    return out
