"""Tokenize text and cut it into calibration sequences."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import torch

from ..config import DEFAULT_NSAMPLES, DEFAULT_SEQLEN
from ..errors import CalibrationError
from .text import TextSource, load_text

logger = logging.getLogger(__name__)

#: Characters per tokenizer call; long texts are cut at a newline near this size.
CHUNK_CHARS = 1 << 16


@dataclass
class CalibrationSet:
    """Calibration sequences: ``input_ids`` [n, L] (int64) and an optional ``attention_mask``
    [n, L] (1 = real token, 0 = padding). Text sources give equal-length windows and no mask;
    pre-tokenized examples of different lengths are right-padded and carry a mask."""

    input_ids: torch.Tensor
    attention_mask: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2:
            raise CalibrationError(
                f"Calibration input_ids must be 2-D [nsamples, seqlen], got shape "
                f"{tuple(self.input_ids.shape)}."
            )
        if self.attention_mask is not None and self.attention_mask.shape != self.input_ids.shape:
            raise CalibrationError(
                f"attention_mask shape {tuple(self.attention_mask.shape)} does not match "
                f"input_ids shape {tuple(self.input_ids.shape)}."
            )

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def shape(self) -> torch.Size:
        return self.input_ids.shape

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) tokens in the set."""
        if self.attention_mask is None:
            return self.input_ids.numel()
        return int(self.attention_mask.sum())

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """Yield (input_ids [1, L], attention_mask [1, L] or None) per sequence."""
        for i in range(len(self)):
            mask = None if self.attention_mask is None else self.attention_mask[i : i + 1]
            yield self.input_ids[i : i + 1], mask

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """Yield (input_ids, attention_mask or None) in batches of ``batch_size`` sequences."""
        for i in range(0, len(self), batch_size):
            mask = None if self.attention_mask is None else self.attention_mask[i : i + batch_size]
            yield self.input_ids[i : i + batch_size], mask

    def to(self, device: Union[str, torch.device]) -> "CalibrationSet":
        mask = None if self.attention_mask is None else self.attention_mask.to(device)
        return CalibrationSet(self.input_ids.to(device), mask)


@contextlib.contextmanager
def _quiet_length_warning() -> Iterator[None]:
    """Silence transformers' 'sequence length is longer than the specified maximum' warning:
    we tokenize whole documents on purpose and cut them into windows afterwards."""
    log = logging.getLogger("transformers.tokenization_utils_base")
    old = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(old)


def _chunks(text: str, size: int) -> list[str]:
    out: list[str] = []
    start = 0
    n = len(text)
    while start < n:
        end = min(start + size, n)
        if end < n:
            cut = text.rfind("\n", start + size // 2, end)
            if cut != -1:
                end = cut + 1
        out.append(text[start:end])
        start = end
    return out


def _ids_of(encoded: Any) -> Any:
    if isinstance(encoded, Mapping) or hasattr(encoded, "keys"):
        return encoded["input_ids"]
    if hasattr(encoded, "input_ids"):
        return encoded.input_ids
    return encoded


def tokenize_text(tokenizer: Any, text: str, chunk_chars: int = CHUNK_CHARS) -> torch.Tensor:
    """Tokenize ``text`` (no special tokens) into a 1-D int64 tensor.

    Long text is cut at newlines into chunks of about ``chunk_chars`` characters and the chunks
    are tokenized in one batched call, which fast tokenizers run in parallel.
    """
    chunks = _chunks(text, chunk_chars)
    with _quiet_length_warning():
        try:
            encoded = tokenizer(chunks, add_special_tokens=False)
        except TypeError:
            encoded = tokenizer(chunks)
    ids = _ids_of(encoded)
    flat: list[int] = []
    for row in ids:
        if isinstance(row, torch.Tensor):
            row = row.reshape(-1).tolist()
        flat.extend(int(t) for t in row)
    logger.debug("Tokenized %d characters into %d tokens (%d chunks)", len(text), len(flat), len(chunks))
    return torch.tensor(flat, dtype=torch.long)


def _is_pretokenized(source: Any) -> bool:
    return (
        isinstance(source, (list, tuple))
        and len(source) > 0
        and all(isinstance(x, Mapping) for x in source)
    )


def _as_1d(value: Any, what: str, i: int) -> torch.Tensor:
    t = torch.as_tensor(value)
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1:
        raise CalibrationError(
            f"Example {i}: {what} must be a 1-D sequence (or [1, L]), got shape {tuple(t.shape)}."
        )
    return t.long()


def _from_examples(
    examples: Sequence[Mapping[str, Any]],
    nsamples: Optional[int],
    seqlen: Optional[int],
    pad_token_id: int,
) -> CalibrationSet:
    rows: list[tuple[torch.Tensor, torch.Tensor]] = []
    for i, ex in enumerate(examples):
        if "input_ids" not in ex:
            raise CalibrationError(
                f"Example {i} has no 'input_ids' (keys: {sorted(ex)}); pre-tokenized examples "
                "must be dicts like {'input_ids': [...], 'attention_mask': [...]}."
            )
        ids = _as_1d(ex["input_ids"], "input_ids", i)
        if ex.get("attention_mask") is not None:
            mask = _as_1d(ex["attention_mask"], "attention_mask", i)
            if mask.shape != ids.shape:
                raise CalibrationError(
                    f"Example {i}: attention_mask has {mask.numel()} entries but input_ids has "
                    f"{ids.numel()}."
                )
        else:
            mask = torch.ones_like(ids)
        if seqlen is not None and ids.numel() > seqlen:
            ids, mask = ids[:seqlen], mask[:seqlen]
        if ids.numel() == 0 or int(mask.sum()) == 0:
            raise CalibrationError(f"Example {i} has no tokens; drop empty examples.")
        rows.append((ids, mask))
    if nsamples is not None and len(rows) > nsamples:
        rows = rows[:nsamples]
    elif nsamples is not None and len(rows) < nsamples:
        logger.warning("Asked for %d calibration samples but got %d examples; using %d",
                       nsamples, len(rows), len(rows))
    width = max(r[0].numel() for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        input_ids[i, : ids.numel()] = ids
        attention_mask[i, : ids.numel()] = mask
    if bool(attention_mask.all()):
        return CalibrationSet(input_ids, None)
    return CalibrationSet(input_ids, attention_mask)


def calibration_batches(
    tokenizer: Any,
    source: Union[TextSource, Sequence[Mapping[str, Any]], CalibrationSet, torch.Tensor],
    nsamples: int = DEFAULT_NSAMPLES,
    seqlen: int = DEFAULT_SEQLEN,
    seed: int = 0,
    holdout: int = 0,
) -> CalibrationSet:
    """Build ``nsamples`` calibration sequences of ``seqlen`` tokens from ``source``.

    Text sources (anything :func:`gptqkit.data.load_text` reads) are tokenized and
    ``nsamples`` windows are drawn deterministically from ``seed``: non-overlapping windows when
    the text holds at least ``nsamples * seqlen`` tokens, random (possibly overlapping) offsets
    otherwise. The result has no attention mask.

    Pre-tokenized examples (a list of dicts with ``input_ids`` and optionally
    ``attention_mask``, AutoGPTQ style) are used in order: each is truncated to ``seqlen``, at
    most ``nsamples`` are kept, and they are right-padded to the longest with an attention mask.
    A 2-D tensor of ids or a :class:`CalibrationSet` passes through unchanged.

    ``holdout``: the last ``holdout`` tokens of a text source are never drawn (they are kept for
    evaluation; see :func:`holdout_tokens`).
    """
    if isinstance(source, CalibrationSet):
        return source
    if isinstance(source, torch.Tensor):
        if source.dim() != 2:
            raise CalibrationError(
                f"A tensor of calibration ids must be 2-D [nsamples, seqlen], got {tuple(source.shape)}."
            )
        return CalibrationSet(source.long(), None)
    if nsamples < 1 or seqlen < 1:
        raise CalibrationError(f"nsamples and seqlen must be positive, got {nsamples} and {seqlen}.")
    if _is_pretokenized(source):
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        return _from_examples(source, nsamples, seqlen, int(pad) if pad is not None else 0)
    if tokenizer is None:
        raise CalibrationError("A tokenizer is needed to turn text into calibration sequences.")

    text = load_text(source)
    tokens = tokenize_text(tokenizer, text)
    if holdout:
        tokens = tokens[: tokens.numel() - holdout]
    total = tokens.numel()
    if total < seqlen:
        raise CalibrationError(
            f"The calibration text has {total} tokens but one sequence needs {seqlen}. Provide "
            f"more text (at least {seqlen} tokens, ideally {nsamples * seqlen}) or lower seqlen."
        )
    gen = torch.Generator().manual_seed(seed)
    slots = total // seqlen
    if slots >= nsamples:
        # A random shift keeps every window aligned on the same grid, so windows never overlap.
        shift = int(torch.randint(0, total - slots * seqlen + 1, (1,), generator=gen))
        chosen = torch.randperm(slots, generator=gen)[:nsamples]
        starts = shift + chosen * seqlen
    else:
        logger.warning(
            "Calibration text has %d tokens, fewer than nsamples*seqlen = %d; drawing %d "
            "overlapping windows at random offsets. More text gives a better calibration.",
            total, nsamples * seqlen, nsamples,
        )
        starts = torch.randint(0, total - seqlen + 1, (nsamples,), generator=gen)
    index = starts[:, None] + torch.arange(seqlen)[None, :]
    input_ids = tokens[index]
    logger.info("Calibration set: %d sequences x %d tokens from %d tokens of text",
                nsamples, seqlen, total)
    return CalibrationSet(input_ids.contiguous(), None)


#: Share of a user's calibration text kept back for evaluation when no evaluation text is given.
HOLDOUT_FRACTION = 0.1


def holdout_tokens(total: int, eval_seqlen: int, max_windows: int | None, calib_seqlen: int) -> int:
    """How many tokens at the end of a calibration text of ``total`` tokens to keep back for
    evaluation: whole windows of ``eval_seqlen``, at most ``max_windows`` of them and at most
    :data:`HOLDOUT_FRACTION` of the text, but always one window; what remains must still hold one
    calibration sequence of ``calib_seqlen``. The calibration sampler never draws these tokens."""
    wins = max(1, int(total * HOLDOUT_FRACTION) // eval_seqlen)
    if max_windows is not None:
        wins = min(wins, max_windows)
    held = wins * eval_seqlen
    if total - held < calib_seqlen:
        raise CalibrationError(
            f"The calibration text has {total} tokens: too few to keep {held} tokens back for evaluation "
            f"and still draw sequences of {calib_seqlen}. Give more text, a separate --eval-text, "
            "or --no-eval.")
    return held
