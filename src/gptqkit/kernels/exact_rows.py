"""Exact rows: an fp32 embedding or output head held in a smaller form that represents every
value exactly, and computed from it with the same fp32 results. Two forms:

* int8 rows ("q8"): every value an int8 times a scale shared by 32 neighbours in its row, 1.125
  bytes a value. Weights converted from GGUF Q8_0 files are such products (llama.cpp stores
  q · d, q an int8 and d an fp16 per block of 32), the built-in SmolLM2-135M among them: its
  49152 x 576 tied embedding is 113 MB in fp32 and 32 MB as int8 rows. A block is taken only
  when d = max|w| / 127 and q = w / d give back every w exactly (`exact_q8`); each product q · d
  is then the fp32 value (8 by 24 significant bits).
* bf16 rows: every value an fp32 whose low 16 bits are zero, 2 bytes a value. Models released
  in bf16 (most current ones) and quantized by gptqkit in fp32 (its default) keep such an
  embedding and head; bf16 -> fp32 is exact.

Nothing is rounded; where a tensor is neither, it stays as it is.

* The embedding gathers rows and decodes them: the same fp32 values.
* The head at one token runs gk_q8_gemv_rows / gk_bf16_gemv_rows, gk_sgemv_rows' loop on
  decoded values: the same bits as FastHeadLinear on the fp32 weight, from fewer bytes.
* The head at more tokens decodes 4096 rows at a time and calls torch's matmul on each: the same
  products and sums as the whole matrix, up to how the BLAS blocks the output columns (fp32
  rounding at most; SmolLM2's 512-token logits came out equal on the AVX-512 VM of BENCHMARKS.md).
* `weight` still reads as the fp32 tensor (decoded on demand, one tensor shared by a tied
  embedding and head while in use), so state_dict(), save_pretrained and the saved checkpoint
  are unchanged; assigning a new weight, or a move / dtype change, turns the module back into a
  plain one.

gptqkit.load uses it for fp32 CPU models (GPTQKIT_EXACT_ROWS=0 turns that off)."""
from __future__ import annotations

import functools
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


class ExactRows:
    """An fp32 weight [N, K] held exactly in a smaller form; subclasses decode it."""
    kind = ""

    def __init__(self):
        self._dense: weakref.ref | None = None
        self.param: torch.nn.Parameter | None = None  # set when a module turns plain (_ExactWeight._apply)

    def decode(self, n0: int = 0, n1: int | None = None) -> torch.Tensor:
        """Rows n0..n1 as the fp32 weight (exact)."""
        raise NotImplementedError

    def take(self, ids: torch.Tensor) -> torch.Tensor:
        """The fp32 rows at `ids` (any shape): [*ids.shape, K]."""
        raise NotImplementedError

    def _gemv(self, lib, x: torch.Tensor, y: torch.Tensor, nt: int) -> int:
        raise NotImplementedError

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values() if isinstance(t, torch.Tensor))

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
        N, K = self.shape
        if x.numel() == K and not torch.compiler.is_compiling():
            from .cpu import get_lib
            lib = get_lib()
            if lib is not None:
                xc = x.reshape(-1).contiguous()
                y = torch.empty(N, dtype=torch.float32)
                if self._gemv(lib, xc, y, max(1, min(torch.get_num_threads(), (N * K) >> 18))) == 0:
                    return y.reshape(*x.shape[:-1], N)
        y = torch.empty(*x.shape[:-1], N, dtype=torch.float32)
        for n0 in range(0, N, _CHUNK):
            y[..., n0:n0 + _CHUNK] = x @ self.decode(n0, n0 + _CHUNK).T
        return y


class Q8Rows(ExactRows):
    """int8 codes [N, K] and fp32 scales [N, K/32] whose products are an fp32 weight exactly."""
    kind = "int8"

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.codes, self.scales = codes, scales
        self.shape = codes.shape

    @staticmethod
    def _dequant(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return (q.float().unflatten(-1, (-1, BLOCK)) * d.unsqueeze(-1)).flatten(-2)

    def decode(self, n0: int = 0, n1: int | None = None) -> torch.Tensor:
        return self._dequant(self.codes[n0:n1], self.scales[n0:n1])

    def take(self, ids: torch.Tensor) -> torch.Tensor:
        return self._dequant(self.codes[ids], self.scales[ids])

    def _gemv(self, lib, x, y, nt):
        return lib.gk_q8_gemv_rows(self.codes.data_ptr(), self.scales.data_ptr(), x.data_ptr(), y.data_ptr(),
                                   *self.shape, nt)


class Bf16Rows(ExactRows):
    """A bf16 tensor [N, K] that is an fp32 weight exactly (its values had 8 significant bits)."""
    kind = "bf16"

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = w
        self.shape = w.shape

    def decode(self, n0: int = 0, n1: int | None = None) -> torch.Tensor:
        return self.w[n0:n1].float()

    def take(self, ids: torch.Tensor) -> torch.Tensor:
        return self.w[ids].float()

    def _gemv(self, lib, x, y, nt):
        return lib.gk_bf16_gemv_rows(self.w.data_ptr(), x.data_ptr(), y.data_ptr(), *self.shape, nt)


def exact_bf16(w: torch.Tensor) -> torch.Tensor | None:
    """w as bf16 when that is exact (every fp32 value's low 16 bits zero), else None."""
    if w.dtype is not torch.float32 or w.dim() != 2 or w.device.type != "cpu" or not w.is_contiguous():
        return None
    bits = w.view(torch.int32)
    for n0 in range(0, w.shape[0], _CHUNK):
        if bool((bits[n0:n0 + _CHUNK] & 0xFFFF).any()):
            return None
    return w.to(torch.bfloat16)  # exact: nothing below bf16's 8 significant bits


def exact_rows(w: torch.Tensor) -> ExactRows | None:
    """The smallest exact form of an fp32 weight (int8 rows, then bf16), or None."""
    found = exact_q8(w)
    if found is not None:
        return Q8Rows(*found)
    b = exact_bf16(w)
    return Bf16Rows(b) if b is not None else None


class _ExactWeight:
    """What makes a module's `weight` a view of its ExactRows: the parameter slot stays (None while
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
        # a new weight: the module becomes what it was before (nn.Embedding, a scaled embedding,
        # nn.Linear or FastHeadLinear), then takes the assignment as usual
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
        # what keeps an fp32 CPU tensor as it is (model.to("cpu"), .float()) keeps the rows; a move
        # or a dtype change (.to("cuda"), .half()) works on tensors: become plain first
        probe = fn(torch.zeros(1))
        if probe.dtype is torch.float32 and probe.device.type == "cpu":
            return super()._apply(fn, recurse)
        rows = self.rows
        if getattr(rows, "param", None) is None:  # one Parameter for a tied pair: the tie survives
            rows.param = torch.nn.Parameter(rows.dense())
        self.weight = rows.param
        return self._apply(fn, recurse)


class ExactEmbedding(_ExactWeight, torch.nn.Embedding):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows.take(ids)


class _ScaledForward:
    """transformers' *ScaledWordEmbedding (Gemma 3/4, Bart, ...): nn.Embedding's rows times
    `embed_scale` (a float, or a 0-d buffer cast to the weight's dtype), the same product here."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.rows.take(ids)
        s = self.embed_scale
        return y * (s.to(y.dtype) if torch.is_tensor(s) else s)


@functools.lru_cache(maxsize=None)
def _exact_class(plain: type) -> type:
    """The exact-rows class for an embedding of class `plain`: ExactEmbedding for nn.Embedding; for
    a scaled one, a subclass of both that keeps isinstance(module, plain)."""
    if plain is torch.nn.Embedding:
        return ExactEmbedding
    return type(f"Exact{plain.__name__}", (_ScaledForward, ExactEmbedding, plain), {})


def _embedding_kind(mod: torch.nn.Module) -> bool:
    """Whether exact rows know this embedding's forward: nn.Embedding's, or nn.Embedding's times
    `embed_scale` (the *ScaledWordEmbedding classes; architecture knowledge by name)."""
    if not isinstance(mod, torch.nn.Embedding) or mod.max_norm is not None:
        return False
    return type(mod) is torch.nn.Embedding or (type(mod).__name__.endswith("ScaledWordEmbedding")
                                               and hasattr(mod, "embed_scale"))


class ExactHead(_ExactWeight, torch.nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            y = F.linear(x, self.rows.dense())
        else:
            y = self.rows.linear(x.float() if x.dtype is not torch.float32 else x).to(x.dtype)
        return y if self.bias is None else y + self.bias


def use_exact_rows(model: torch.nn.Module, found: dict[str, ExactRows] | None = None) -> int:
    """Hold `model`'s fp32 CPU input embedding and output head (tied or not) as exact rows where
    their values allow it (module doc). `found`: rows already built for some of these weights,
    by state-dict key (the loader's; then no other weight is read). Returns the bytes saved; 0
    if nothing changed."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and not _embedding_kind(emb):
        emb = None
    if head is not None and not (type(head) is torch.nn.Linear or type(head).__name__ == "FastHeadLinear"):
        head = None
    done: dict[int, ExactRows] = {}
    if found is not None:
        done = {id(model.get_parameter(k)): r for k, r in found.items()}
    saved = 0
    kinds = set()
    counted: list[ExactRows] = []
    for mod in (emb, head):
        if mod is None:
            continue
        cls = ExactHead if mod is head else _exact_class(type(mod))
        w = mod._parameters.get("weight")
        if w is None or w.dtype is not torch.float32 or w.device.type != "cpu":
            continue
        rows = done.get(id(w))
        if rows is None and found is None:
            rows = done[id(w)] = exact_rows(w.detach())
        if rows is None:
            log.debug("%s: neither int8 nor bf16 rows hold it exactly; kept in fp32", type(mod).__name__)
            continue
        if all(r is not rows for r in counted):  # a tied pair: counted once
            counted.append(rows)
            saved += w.numel() * 4 - rows.nbytes()
            kinds.add(rows.kind)
        plain = type(mod)
        mod.__class__ = cls
        mod._parameters["weight"] = None
        mod.__dict__.update(rows=rows, _plain=plain)
    if saved:
        log.info("embedding/head held as exact %s rows: %.1f MB less, the same fp32 values",
                 "/".join(sorted(kinds)), saved / 1e6)
    return saved
