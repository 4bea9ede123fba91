"""[lm_head=True] Quantizing the output head, after the last block: its Hessian comes from the
final hidden states through the final norm, and a head tied to the embeddings is untied first
(the quantized head can no longer share the embedding matrix). [GPTAQ] The float model's final
hidden states, through the same norm, give the head's X̃ chunk by chunk."""
from __future__ import annotations

from torch import nn

from ..config import QuantizeConfig
from ..models.arch import ArchSpec, get_module
from ..models.source import ModelHandle
from ..quant.gptq import Hessian
from . import collective
from .activations import Activations
from .linears import LinearJob, solve


def quantize_lm_head(handle: ModelHandle, spec: ArchSpec, acts: Activations, masks: list, config: QuantizeConfig,
                     zero_min: int, float_acts: Activations | None = None) -> LinearJob | None:
    """The solved head, or None when the model has none or the config skips it."""
    model = handle.model
    head = model.get_output_embeddings()
    cfg = config.for_module("lm_head")
    if head is None or cfg is None:
        return None
    norm = get_module(model, spec.final_norm)
    job = LinearJob("lm_head", head, cfg)
    if cfg.method != "rtn":
        def final(a: Activations, c: int):
            h = a.get(c)
            return norm(h) if norm is not None else h

        job.hessian = Hessian(head.in_features, device=handle.device, cross=job.cross)
        for c, m in enumerate(masks):
            job.hessian.add(final(acts, c), m, final(float_acts, c) if job.cross else None)
    if job.hessian is not None and collective.active():
        collective.reduce_hessian(job)  # every rank solves it alike from the summed Hessian
    if getattr(model.config, "tie_word_embeddings", False):
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    solve(job, zero_min)
    return job
