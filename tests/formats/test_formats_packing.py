"""Bit-exact packing of qweight/qzeros (2/3/4/8 bits, v1/v2 zeros) as docs/ARCHITECTURE.md specifies.

The expected words come from literal constants worked out by hand and from an independent
pure-Python reference: 32 consecutive values form one integer Σ v_j · 2^(b·j), cut into b
32-bit words (for 2/4/8 bits only ceil(n·b/32) words are kept), read back as signed int32.
"""
from __future__ import annotations

import pytest
import torch

from gptqkit.formats.packing import (pack, pack_qweight, pack_qzeros, unpack,
                                     unpack_qweight, unpack_qzeros)

BITS = (2, 3, 4, 8)


def s32(u: int) -> int:
    """unsigned 32-bit pattern -> the signed int32 value with the same bits"""
    assert 0 <= u < 2 ** 32
    return u - 2 ** 32 if u >= 2 ** 31 else u


def ref_pack_1d(values: list[int], bits: int) -> list[int]:
    """Independent reference: one big integer per 32 values, cut into 32-bit words."""
    words = []
    for start in range(0, len(values), 32):
        chunk = values[start:start + 32]
        big = 0
        for j, v in enumerate(chunk):
            assert 0 <= v < 2 ** bits
            big += v * 2 ** (bits * j)
        for w in range(bits):
            words.append(s32((big >> (32 * w)) % 2 ** 32))
    if bits != 3:
        words = words[:-(-len(values) * bits // 32)]
    return words


def ref_pack(t: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    t = t.movedim(dim, 0)
    cols = [ref_pack_1d([int(v) for v in t[:, c]], bits) for c in range(t.shape[1])]
    return torch.tensor(cols, dtype=torch.int32).T.movedim(0, dim)


def rand_codes(shape, bits, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2 ** bits, shape, generator=gen, dtype=torch.int32)


# --------------------------------------------------------------------------- literal words
def test_literal_4bit_word():
    q = torch.tensor([[0], [1], [2], [3], [4], [5], [6], [7]] * 4, dtype=torch.int32)  # K=32, N=1
    qw = pack_qweight(q, 4)
    assert qw.dtype == torch.int32 and qw.shape == (4, 1)
    assert qw[:, 0].tolist() == [0x76543210] * 4
    q = torch.full((8, 1), 15, dtype=torch.int32)
    q[0] = 1
    assert pack_qweight(q, 4)[0, 0].item() == s32(0xFFFFFFF1) == -15


def test_literal_2bit_and_8bit_words():
    q2 = torch.tensor([0, 1, 2, 3] * 4, dtype=torch.int32)[:, None]  # one word of 16 values
    assert pack_qweight(q2, 2)[:, 0].tolist() == [s32(0xE4E4E4E4)]
    q8 = torch.tensor([1, 2, 3, 0xFF, 0x80, 0, 0x7F, 0x10], dtype=torch.int32)[:, None]
    assert pack_qweight(q8, 8)[:, 0].tolist() == [s32(0xFF030201), 0x107F0080]


def test_literal_3bit_straddling_values():
    # v10 = 0b110, v21 = 0b101, everything else 0
    v = torch.zeros(32, 1, dtype=torch.int32)
    v[10], v[21] = 0b110, 0b101
    w = pack_qweight(v, 3)[:, 0].tolist()
    # word0: low 2 bits of v10 (0b10) at bits 30-31
    assert w[0] == s32(0b10 << 30)
    # word1: bit 2 of v10 (1) at bit 0; low bit of v21 (1) at bit 31
    assert w[1] == s32((1 << 31) | 1)
    # word2: top 2 bits of v21 (0b10) at bits 0-1
    assert w[2] == 0b10
    # the non-straddling ends of each word: v0, v9 | v11, v20 | v22, v31
    v = torch.zeros(32, 1, dtype=torch.int32)
    for j in (0, 9, 11, 20, 22, 31):
        v[j] = 7
    w = pack_qweight(v, 3)[:, 0].tolist()
    assert w == [0x38000007, 0x7000000E, s32(0xE000001C)]
    # a full pattern: v_j = j % 8
    v = (torch.arange(32) % 8).to(torch.int32)[:, None]
    w = pack_qweight(v, 3)[:, 0].tolist()
    b = [f"{j % 8:03b}"[::-1] for j in range(32)]  # each value LSB first
    stream = "".join(b)  # bit i of the 96-bit little-endian string
    expect = [s32(int(stream[32 * k:32 * k + 32][::-1], 2)) for k in range(3)]
    assert w == expect
    assert torch.equal(unpack_qweight(pack_qweight(v, 3), 3), v)


def test_sym_4bit_v1_qzeros_are_0x77777777():
    zeros = torch.full((3, 64), 8, dtype=torch.int32)  # symmetric 4-bit: z = 2^(4-1)
    qz = pack_qzeros(zeros, 4, "gptq")
    assert qz.shape == (3, 8) and qz.dtype == torch.int32
    assert (qz == 0x77777777).all() and int(qz[0, 0]) == 2004318071
    qz2 = pack_qzeros(zeros, 4, "gptq_v2")
    assert (qz2 == s32(0x88888888)).all()
    assert torch.equal(unpack_qzeros(qz, 4, 64, "gptq"), zeros)
    assert torch.equal(unpack_qzeros(qz2, 4, 64, "gptq_v2"), zeros)


@pytest.mark.parametrize("bits,v1_word", [(2, 0x55555555), (8, 0x7F7F7F7F)])
def test_sym_v1_qzeros_other_widths(bits, v1_word):
    zeros = torch.full((1, 32), 2 ** (bits - 1), dtype=torch.int32)
    qz = pack_qzeros(zeros, bits, "gptq")
    assert (qz == v1_word).all()


def test_sym_3bit_v1_qzeros():
    zeros = torch.full((1, 32), 4, dtype=torch.int32)  # stored 3 = 0b011 in every slot
    assert pack_qzeros(zeros, 3, "gptq")[0].tolist() == ref_pack_1d([3] * 32, 3)
    assert pack_qzeros(zeros, 3, "gptq")[0].tolist() == [s32(0xDB6DB6DB), s32(0xB6DB6DB6), 0x6DB6DB6D]


# --------------------------------------------------------------------------- against reference
@pytest.mark.parametrize("bits", BITS)
def test_qweight_matches_reference_and_round_trips(bits):
    K, N = 96, 5
    q = rand_codes((K, N), bits, seed=bits)
    qw = pack_qweight(q, bits)
    assert qw.shape == (K * bits // 32, N) and qw.dtype == torch.int32
    assert torch.equal(qw, ref_pack(q, bits, dim=0))
    assert torch.equal(unpack_qweight(qw, bits), q)
    # the all-ones pattern fills every bit (sign bit included)
    full = torch.full((K, N), 2 ** bits - 1, dtype=torch.int32)
    assert (pack_qweight(full, bits) == -1).all()
    assert torch.equal(unpack_qweight(pack_qweight(full, bits), bits), full)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("N", [32, 64, 40, 8])
def test_qzeros_v1_v2_match_reference(bits, N):
    G = 3
    z = rand_codes((G, N), bits, seed=N + bits)
    # v2 stores z itself
    qz2 = pack_qzeros(z, bits, "gptq_v2")
    nwords = -(-N // 32) * 3 if bits == 3 else -(-N * bits // 32)
    assert qz2.shape == (G, nwords)
    assert torch.equal(qz2, ref_pack(z, bits, dim=1))
    assert torch.equal(unpack_qzeros(qz2, bits, N, "gptq_v2"), z)
    # v1 stores z − 1 (so z must be ≥ 1)
    z1 = z.clamp(min=1)
    qz1 = pack_qzeros(z1, bits, "gptq")
    assert torch.equal(qz1, ref_pack(z1 - 1, bits, dim=1))
    assert torch.equal(unpack_qzeros(qz1, bits, N, "gptq"), z1)
    assert torch.equal(pack_qzeros(z1, bits, "gptq"), pack_qzeros(z1 - 1, bits, "gptq_v2"))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dim", [0, 1])
def test_generic_pack_both_dims(bits, dim):
    shape = (64, 7) if dim == 0 else (7, 64)
    v = rand_codes(shape, bits, seed=dim * 10 + bits)
    p = pack(v, bits, dim=dim)
    assert torch.equal(p, ref_pack(v, bits, dim))
    assert p.shape[dim] == 64 * bits // 32 and p.shape[1 - dim] == 7
    assert torch.equal(unpack(p, bits, dim=dim, n=64), v)
    # 3-D input, packing along the middle dim
    v3 = rand_codes((2, 64, 3), bits, seed=bits)
    p3 = pack(v3, bits, dim=1)
    assert p3.shape == (2, 64 * bits // 32, 3)
    assert torch.equal(unpack(p3, bits, dim=1, n=64), v3)
    assert torch.equal(p3[1], ref_pack(v3[1], bits, 0))


@pytest.mark.parametrize("bits", BITS)
def test_unpack_accepts_words_with_sign_bit(bits):
    q = torch.full((32, 2), 2 ** bits - 1, dtype=torch.int32)
    q[0, 0] = 0
    qw = pack_qweight(q, bits)
    assert (qw < 0).any()
    assert torch.equal(unpack_qweight(qw, bits), q)


# --------------------------------------------------------------------------- errors
def test_v1_refuses_zero_point_zero():
    z = torch.tensor([[3, 0, 5]], dtype=torch.int32)
    with pytest.raises(ValueError, match="gptq_v2"):
        pack_qzeros(z, 4, "gptq")
    pack_qzeros(z, 4, "gptq_v2")  # fine in v2


def test_bad_format_raises():
    z = torch.ones(1, 8, dtype=torch.int32)
    with pytest.raises(ValueError):
        pack_qzeros(z, 4, "awq")
    with pytest.raises(ValueError):
        unpack_qzeros(pack_qzeros(z, 4, "gptq"), 4, 8, "marlin")


@pytest.mark.parametrize("bits", BITS)
def test_out_of_range_values_raise(bits):
    q = torch.zeros(32, 2, dtype=torch.int32)
    q[3, 1] = 2 ** bits
    with pytest.raises(ValueError):
        pack_qweight(q, bits)
    q[3, 1] = -1
    with pytest.raises(ValueError):
        pack_qweight(q, bits)
    with pytest.raises(ValueError):
        pack_qzeros(torch.full((1, 32), 2 ** bits, dtype=torch.int32), bits, "gptq_v2")
    with pytest.raises(ValueError):  # v1 stores z − 1 ≤ maxq, so z = 2^b + 1 overflows
        pack_qzeros(torch.full((1, 32), 2 ** bits + 1, dtype=torch.int32), bits, "gptq")
    # the largest v1 zero 2^b is storable (as 2^b − 1)
    top = torch.full((1, 32), 2 ** bits, dtype=torch.int32)
    assert torch.equal(unpack_qzeros(pack_qzeros(top, bits, "gptq"), bits, 32, "gptq"), top)


@pytest.mark.parametrize("bits,K", [(3, 48), (3, 16), (4, 12), (2, 8), (8, 6), (4, 4)])
def test_k_not_fitting_raises(bits, K):
    with pytest.raises(ValueError):
        pack_qweight(torch.zeros(K, 4, dtype=torch.int32), bits)


@pytest.mark.parametrize("bits,K", [(3, 64), (4, 24), (2, 48), (8, 12)])
def test_k_fitting_is_accepted(bits, K):
    q = rand_codes((K, 3), bits)
    qw = pack_qweight(q, bits)
    assert qw.shape == (K * bits // 32, 3)
    assert torch.equal(unpack_qweight(qw, bits), q)


def test_unsupported_bits_raise():
    for bits in (1, 5, 16):
        with pytest.raises(ValueError):
            pack(torch.zeros(32, 1, dtype=torch.int32), bits, 0)
        with pytest.raises(ValueError):
            unpack(torch.zeros(4, 1, dtype=torch.int32), bits, 0, 32)


@pytest.mark.parametrize("bits,nwords,n", [(4, 2, 17), (4, 5, 41), (2, 1, 17), (8, 3, 13), (3, 2, 22),
                                           (3, 3, 33)])
def test_unpack_too_few_words_raises(bits, nwords, n):
    # missing words must not be silently read as zeros
    with pytest.raises(ValueError):
        unpack(torch.zeros(nwords, 1, dtype=torch.int32), bits, 0, n=n)
    assert unpack(torch.zeros(nwords, 1, dtype=torch.int32), bits, 0, n=n - 1).shape == (n - 1, 1)
