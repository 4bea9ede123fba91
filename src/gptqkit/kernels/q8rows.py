"""Exact int8 rows: an fp32 embedding or output head whose every value is an int8 times a scale
shared by 32 neighbours in its row, held as those int8 codes and scales (1.125 bytes a value
instead of 4) and computed from them with the same fp32 results.

Weights converted from GGUF Q8_0 files are such products (llama.cpp stores q · d with q an int8
and d an fp16 per block of 32), the built-in SmolLM2-135M among them: its 49152 x 576 tied
embedding is 113 MB in fp32 and 32 MB as rows of codes. Nothing is rounded: a block is held this
way only when d = max|w| / 127 and q = w / d give back every w exactly (`exact_q8`), so the
decoded rows are the fp32 weight bit for bit, and each product q · d is exact in fp32 (8 by 24
significant bits). Where a row block is not such a product the tensor stays as it is.

* The embedding gathers codes and scales and decodes the rows: the same fp32 values.
* The head at one token runs gk_q8_gemv_rows, gk_sgemv_rows' loop on decoded values: the same
  bits as FastHeadLinear on the fp32 weight, reading a quarter of the bytes.
* The head at more tokens decodes 4096 rows at a time and calls torch's matmul on each: the same
  products and sums as the whole matrix, up to how the BLAS blocks the output columns (fp32
  rounding at most; SmolLM2's 512-token logits came out equal on the AVX-512 VM of BENCHMARKS.md).
* `weight` still reads as the fp32 tensor (decoded on demand, one tensor shared by a tied
  embedding and head while in use), so state_dict(), save_pretrained and the saved checkpoint
  are unchanged; assigning a new weight turns the module back into a plain one.

gptqkit.load uses it for fp32 CPU models (GPTQKIT_EXACT_ROWS=0 turns that off)."""
from __future__ import annotations

import logging
import weakref

import torch
import torch.nn.functional as F

log = logging.getLogger("gptqkit")

BLOCK = 32  # values per scale, as in GGUF Q8_0
_CHUNK = 4096  # head rows decoded per matmul at M > 1 (9.4 MB of fp32 at 576 columns)


def exact_q8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(codes int8 [N, K], scales fp32 [N, K/32]) with codes · scales == w exactly, or None when
    some block of 32 values in a row is not an int8 multiple of max|block| / 127 (or w is not a
    2-D fp32 CPU tensor with K a multiple of 32). Works through the rows in chunks."""
    if w.dtype is not torch.float32 or w.dim() != 2 or w.shape[1] % BLOCK or w.device.type != "cpu":
        return None
    N, K = w.shape
    codes = torch.empty(N, K, dtype=torch.int8)
    scales = torch.empty(N, K // BLOCK, dtype=torch.float32)
    for n0 in range(0, N, _CHUNK):
        b = w[n0:n0 + _CHUNK].reshape(-1, K // BLOCK, BLOCK)
        d = b.abs().amax(-1) / 127  # exact for a true product: max|w| = 127·d
        q = torch.round(b / d.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1))
        if not (torch.equal(q * d.unsqueeze(-1), b) and bool((q.abs() <= 127).all())):
            return None  # NaN and inf fail the comparison too
        codes[n0:n0 + _CHUNK] = q.reshape(-1, K).to(torch.int8)
        scales[n0:n0 + _CHUNK] = d
    return codes, scales


class Q8Rows:
    """int8 codes [N, K] and fp32 scales [N, K/32] whose products are an fp32 weight exactly."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor):
        self.codes, self.scales = codes, scales
        self._dense: weakref.ref | None = None

    def decode(self, n0: int = 0, n1: int | None = None) -> torch.Tensor:
        """Rows n0..n1 as the fp32 weight (exact)."""
        q, d = self.codes[n0:n1], self.scales[n0:n1]
        return (q.float().view(q.shape[0], -1, BLOCK) * d.unsqueeze(-1)).view(q.shape)

    def take(self, ids: torch.Tensor) -> torch.Tensor:
        """The fp32 rows at `ids` (any shape): [*ids.shape, K]."""
        flat = ids.reshape(-1)
        q, d = self.codes[flat], self.scales[flat]
        return (q.float().view(flat.numel(), -1, BLOCK) * d.unsqueeze(-1)).view(*ids.shape, self.codes.shape[1])

    def dense(self) -> torch.Tensor:
        """The whole fp32 weight; while one is alive every caller gets that same tensor (a tied
        embedding and head save as one tensor, as they were)."""
        t = self._dense() if self._dense is not None else None
        if t is None:
            t = self.decode()
            self._dense = weakref.ref(t)
        return t

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T in fp32 for x [..., K]: the row GEMV at one token, chunked matmuls otherwise."""
        N, K = self.codes.shape
        if x.numel() == K and not torch.compiler.is_compiling():
            from .cpu import get_lib
            lib = get_lib()
            if lib is not None:
                xc = x.reshape(-1).contiguous()
                y = torch.empty(N, dtype=torch.float32)
                nt = max(1, min(torch.get_num_threads(), (N * K) >> 18))
                if lib.gk_q8_gemv_rows(self.codes.data_ptr(), self.scales.data_ptr(), xc.data_ptr(),
                                       y.data_ptr(), N, K, nt) == 0:
                    return y.reshape(*x.shape[:-1], N)
        y = torch.empty(*x.shape[:-1], N, dtype=torch.float32)
        for n0 in range(0, N, _CHUNK):
            y[..., n0:n0 + _CHUNK] = x @ self.decode(n0, n0 + _CHUNK).T
        return y


class _Q8Weight:
    """What makes a module's `weight` a view of its Q8Rows: the parameter slot stays (None while
    the rows hold the values, so the state_dict key order is unchanged), reads decode, and an
    assignment makes the module plain again. Instance attributes: `rows`, `_plain` (the class
    it had)."""

    @property
    def weight(self) -> torch.Tensor:
        t = self._parameters.get("weight")
        return t if t is not None else self.rows.dense()

    def __setattr__(self, name, value):
        if name != "weight":
            return super().__setattr__(name, value)
        # a new weight: the module becomes what it was before (nn.Embedding, nn.Linear or
        # FastHeadLinear), then takes the assignment as usual
        self.__class__ = self.__dict__.pop("_plain")
        del self.rows
        torch.nn.Module.__setattr__(self, name, value)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # the decoded tensor itself, so that while the state dict holds it a tied head's entry is
        # that same tensor (save_pretrained then writes one, as before); the weight slot is None,
        # so the base class adds only what follows it (bias)
        destination[prefix + "weight"] = self.rows.dense()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _apply(self, fn, recurse=True):
        # a move or dtype change (model.to(...), .half()) works on tensors: become plain first
        self.weight = torch.nn.Parameter(self.rows.dense(), requires_grad=False)
        return self._apply(fn, recurse)


class Q8Embedding(_Q8Weight, torch.nn.Embedding):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows.take(ids)


class Q8Head(_Q8Weight, torch.nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            y = F.linear(x, self.rows.dense())
        else:
            y = self.rows.linear(x.float() if x.dtype is not torch.float32 else x).to(x.dtype)
        return y if self.bias is None else y + self.bias


def use_exact_rows(model: torch.nn.Module) -> int:
    """Hold `model`'s fp32 CPU input embedding and output head (tied or not) as exact int8 rows
    where their values allow it (module doc). Returns the bytes saved; 0 if nothing changed."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and (type(emb) is not torch.nn.Embedding or emb.max_norm is not None):
        emb = None
    if head is not None and not (type(head) is torch.nn.Linear or type(head).__name__ == "FastHeadLinear"):
        head = None
    done: dict[int, Q8Rows] = {}
    saved = 0
    for mod, cls in ((emb, Q8Embedding), (head, Q8Head)):
        if mod is None:
            continue
        w = mod._parameters.get("weight")
        if w is None or w.dtype is not torch.float32 or w.device.type != "cpu":
            continue
        rows = done.get(id(w))
        if rows is None:
            found = exact_q8(w.detach())
            if found is None:
                log.debug("%s: not exact int8 rows; kept in fp32", type(mod).__name__)
                continue
            rows = done[id(w)] = Q8Rows(*found)
            saved += w.numel() * 4 - rows.codes.numel() - rows.scales.numel() * 4
        plain = type(mod)
        mod.__class__ = cls
        mod._parameters["weight"] = None
        mod.__dict__.update(rows=rows, _plain=plain)
    if saved:
        log.info("embedding/head held as exact int8 rows: %.1f MB less, the same fp32 values", saved / 1e6)
    return saved
