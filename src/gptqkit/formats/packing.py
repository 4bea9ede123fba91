"""Pack and unpack GPTQ integer tensors (2/3/4/8 bits) exactly as the ecosystem lays them out.

Every bit width follows one rule: 32 consecutive values form one little-endian bit string of
32·b bits, value j at bits [b·j, b·j+b), cut into b 32-bit words. For b = 2, 4, 8 each value
lies inside one word (LSB first); for b = 3 values 10 and 21 straddle words, which is exactly
the AutoGPTQ/GPTQModel 3-bit layout. qweight packs along K (dim 0), qzeros along N (dim 1).

The v1 checkpoint format ("gptq") stores zero − 1 in qzeros, v2 ("gptq_v2") the zero itself.
"""
from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
_MASK32 = (1 << 32) - 1


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit patterns -> int32 with the same bits."""
    words = words & _MASK32
    return torch.where(words >= (1 << 31), words - (1 << 32), words).to(torch.int32)


def pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack unsigned ints in [0, 2^bits) along `dim` into int32 words.

    The length along `dim` is padded with zeros up to a multiple of 32 values (whole word
    groups); callers that need an exact fit (qweight along K) check it before calling.
    """
    _check_bits(bits)
    v = values.movedim(dim, 0).to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= (1 << bits)):
        raise ValueError(f"values out of range for {bits}-bit packing")
    n = v.shape[0]
    ngroups = -(-n // 32)
    if ngroups * 32 != n:
        v = torch.cat([v, v.new_zeros((ngroups * 32 - n, *v.shape[1:]))])
    v = v.reshape(ngroups, 32, *v.shape[1:])
    words = v.new_zeros((ngroups, bits, *v.shape[2:]))
    for j in range(32):
        off = bits * j
        w, s = divmod(off, 32)
        words[:, w] |= (v[:, j] << s) & _MASK32
        if s + bits > 32:  # straddles into the next word (3-bit only)
            words[:, w + 1] |= v[:, j] >> (32 - s)
    words = words.reshape(ngroups * bits, *v.shape[2:])
    # 2/4/8 bits need only ceil(n*b/32) words; drop the all-padding tail words
    nwords = -(-n * bits // 32) if bits != 3 else ngroups * 3
    return _to_int32(words[:nwords]).movedim(0, dim).contiguous()


def unpack(words: torch.Tensor, bits: int, dim: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: int32 words along `dim` -> `n` unsigned ints (int32) along `dim`."""
    _check_bits(bits)
    nw = words.shape[dim]
    if nw * 32 // bits < n:  # check before the zero padding below invents the missing words
        raise ValueError(f"{nw} words of {bits} bits hold fewer than {n} values")
    if bits != 3:  # every value inside one word: one shift-and-mask over all words at once
        per = 32 // bits
        w = words.movedim(dim, 0).to(torch.int32)
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=w.device).view(1, per, *[1] * (w.dim() - 1))
        # arithmetic shifts of negative words fill with ones above bit 31 - s; the mask drops them
        out = w.unsqueeze(1) >> shifts
        out &= (1 << bits) - 1
        return out.reshape(nw * per, *w.shape[1:])[:n].movedim(0, dim).contiguous()
    w = words.movedim(dim, 0).to(torch.int64) & _MASK32
    ngroups = -(-nw // bits)
    if ngroups * bits != nw:
        w = torch.cat([w, w.new_zeros((ngroups * bits - nw, *w.shape[1:]))])
    w = w.reshape(ngroups, bits, *w.shape[1:])
    maxq = (1 << bits) - 1
    out = w.new_zeros((ngroups, 32, *w.shape[2:]))
    for j in range(32):
        off = bits * j
        k, s = divmod(off, 32)
        val = w[:, k] >> s
        if s + bits > 32:
            val = val | (w[:, k + 1] << (32 - s))
        out[:, j] = val & maxq
    out = out.reshape(ngroups * 32, *w.shape[2:])
    return out[:n].to(torch.int32).movedim(0, dim).contiguous()


def pack_qweight(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q: [K, N] ints (already in the transposed, input-major layout) -> qweight [K·b/32, N]."""
    K = q.shape[0]
    if bits == 3 and K % 32:
        raise ValueError(f"3-bit qweight needs K a multiple of 32, got K={K}")
    if (K * bits) % 32:
        raise ValueError(f"{bits}-bit qweight needs K·{bits} a multiple of 32, got K={K}")
    return pack(q, bits, dim=0)


def unpack_qweight(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """qweight [K·b/32, N] -> q [K, N] int32."""
    K = qweight.shape[0] * 32 // bits
    return unpack(qweight, bits, dim=0, n=K)


def pack_qzeros(zeros: torch.Tensor, bits: int, fmt: str = "gptq") -> torch.Tensor:
    """zeros [G, N] (true zero points) -> qzeros [G, ceil(N·b/32)] in checkpoint format `fmt`.

    v1 ("gptq") stores zero − 1. A zero point of 0 cannot be stored in v1 (it would wrap to
    2^b − 1 and every reader would decode 2^b); callers keep asymmetric v1 zeros ≥ 1.
    """
    z = zeros.to(torch.int64)
    if fmt == "gptq":
        if z.numel() and int(z.min()) < 1:
            raise ValueError(
                "a zero point of 0 cannot be stored in checkpoint_format 'gptq' (v1); "
                "write the model with checkpoint_format='gptq_v2' or keep zeros >= 1")
        z = z - 1
    elif fmt != "gptq_v2":
        raise ValueError(f"checkpoint_format must be 'gptq' or 'gptq_v2', got {fmt!r}")
    return pack(z, bits, dim=1)


def unpack_qzeros(qzeros: torch.Tensor, bits: int, n: int, fmt: str = "gptq") -> torch.Tensor:
    """qzeros -> zeros [G, N] int32 as every v1/v2 reader decodes them (v1: stored + 1)."""
    z = unpack(qzeros, bits, dim=1, n=n)
    if fmt == "gptq":
        return z + 1
    if fmt != "gptq_v2":
        raise ValueError(f"checkpoint_format must be 'gptq' or 'gptq_v2', got {fmt!r}")
    return z
