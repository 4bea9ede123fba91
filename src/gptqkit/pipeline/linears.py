"""The linears of a block that get quantized, and how one of them is solved.

A LinearJob carries one nn.Linear from "found in the block" through "Hessian accumulated" to
"solved": its QuantResult is swapped into the module as a dequantized weight, so everything
downstream computes on quantized outputs.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..config import QuantizeConfig
from ..errors import ConfigError, NumericalError
from ..models.arch import ArchSpec, block_linears
from ..quant.gptq import Hessian, gptq_solve
from ..quant.result import QuantResult
from ..quant.rtn import rtn_solve

log = logging.getLogger(__name__)

# A linear (typically a rarely routed MoE expert) that saw fewer calibration tokens than this is
# quantized with round-to-nearest instead of GPTQ; the choice is logged per layer.
MIN_GPTQ_TOKENS = 8

# [GPTAQ/MoE] a routed expert receives different tokens in the float model and in the quantized
# one (the routers see different hidden states), so its inputs cannot be paired token for token:
# such linears get plain GPTQ (logged per layer as "gptq"); everything else is paired.
_ROUTED_EXPERT = re.compile(r"(^|\.)experts\.\d+\.")


@dataclass
class LinearJob:
    name: str                      # full module name in the model
    module: nn.Linear
    cfg: QuantizeConfig
    hessian: Hessian | None = None
    result: QuantResult | None = None
    seconds: float = 0.0
    tokens: int = 0
    cross: bool = False            # [GPTAQ] accumulate the cross term with the float model's inputs

    def __post_init__(self) -> None:
        self.cross = self.cfg.method == "gptaq" and not _ROUTED_EXPERT.search(self.name)

    def new_hessian(self, x: torch.Tensor) -> Hessian:
        return Hessian(x.shape[-1], device=x.device, dtype=hessian_dtype(x.dtype, x.device), cross=self.cross)


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


def block_jobs(block: nn.Module, spec: ArchSpec, config: QuantizeConfig, prefix: str) -> list[LinearJob]:
    """The linears of `block` that the config quantizes, in registration order."""
    jobs = []
    for n, m in block_linears(block, spec).items():
        cfg = config.for_module(f"{prefix}.{n}")
        if cfg is not None:
            jobs.append(LinearJob(f"{prefix}.{n}", m, cfg))
    return jobs


def hessian_dtype(dtype: torch.dtype, device: torch.device | str | None = None) -> torch.dtype:
    """float32 Hessians, float64 when the model computes in float64 on the CPU (used for exact
    comparisons); always float32 on CUDA, where float64 runs at a fraction of the fp32 rate."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.float32
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_weights(job: LinearJob) -> None:
    if not torch.isfinite(job.module.weight.data).all():
        raise NumericalError(f"weights of {job.name} contain NaN/Inf; the source checkpoint is damaged")


def solve(job: LinearJob, zero_min: int) -> None:
    """Solve one linear (GPTQ, or round-to-nearest when asked or when it saw too few tokens) and
    swap the quantized weight in."""
    t0 = time.perf_counter()
    W = job.module.weight.data
    cfg = job.cfg
    check_weights(job)
    h = job.hessian
    if cfg.method == "rtn":
        res = rtn_solve(W, cfg.bits, cfg.group_size, cfg.sym, cfg.mse, zero_min)
    elif h is None or h.n == 0:
        log.warning("%s received no calibration tokens; quantized with round-to-nearest", job.name)
        res = rtn_solve(W, cfg.bits, cfg.group_size, cfg.sym, cfg.mse, zero_min)
        res.method = "rtn-no-tokens"
    elif h.n < MIN_GPTQ_TOKENS:
        # [arch/MoE] an expert the router sent only a handful of tokens: a Hessian of rank <= n
        # would let GPTQ overfit those few tokens; round-to-nearest is the sound choice.
        log.warning("%s received only %d calibration tokens (< %d); quantized with round-to-nearest",
                    job.name, h.n, MIN_GPTQ_TOKENS)
        res = rtn_solve(W, cfg.bits, cfg.group_size, cfg.sym, cfg.mse, zero_min)
        res.method = "rtn-few-tokens"
    else:
        # h.dXXt: [GPTAQ] the cross term with the float model's inputs (None: plain GPTQ)
        res = gptq_solve(W, h.H, cfg.bits, cfg.group_size, cfg.sym, cfg.desc_act, cfg.static_groups,
                         cfg.damp_percent, cfg.damp_auto_increment, cfg.mse, cfg.blocksize, zero_min,
                         dXXt=h.dXXt, alpha=cfg.gptaq_alpha, solve_order=cfg.solve_order)
        if res.method not in ("gptq", "gptaq"):
            log.warning("%s: Hessian unusable even at damp_percent=1; used round-to-nearest", job.name)
    job.tokens = h.n if h is not None else 0
    install(job, res)
    job.seconds += time.perf_counter() - t0


def install(job: LinearJob, res: QuantResult) -> None:
    """Swap the quantized weight in, so everything downstream sees quantized outputs."""
    job.module.weight.data = res.dequantize().to(job.module.weight.dtype)
    job.result = res
    job.hessian = None
