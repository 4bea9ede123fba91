"""Exact rows (kernels/exact_rows.py): an fp32 embedding/head whose values are int8 x per-32
scale products, or bf16 numbers, is held as those, and everything computed from it is the fp32
weight's result: bit for bit for the embedding and the one-token head (gk_sgemv_rows' sums in
its order), within fp32 rounding for the chunked many-token head; anything else is left as it is."""
from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F

from gptqkit.kernels import cpu
from gptqkit.kernels.exact_rows import (Bf16Rows, ExactEmbedding, ExactHead, Q8Rows, exact_bf16, exact_q8,
                                        exact_rows, use_exact_rows)


def q8_values(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """What a GGUF Q8_0 file decodes to: int8 codes (a ±127 in each block) times an fp16 scale per 32."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k // 32, 32), generator=g).float()
    q[..., 0] = 127 * torch.where(torch.rand(n, k // 32, generator=g) < 0.5, -1.0, 1.0)
    d = (torch.rand(n, k // 32, 1, generator=g) * 0.01 + 1e-4).half().float()
    return (q * d).reshape(n, k)


def test_exact_q8_round_trip_and_refusals():
    w = q8_values(300, 96)
    w[5, 32:64] = 0  # an all-zero block: scale 0
    codes, scales = exact_q8(w)
    assert codes.dtype == torch.int8 and scales.shape == (300, 3)
    assert torch.equal((codes.float().view(300, 3, 32) * scales.unsqueeze(-1)).view(300, 96), w)
    assert torch.equal(Q8Rows(codes, scales).decode(), w)
    bumped = w.clone()
    bumped[17, 40] = torch.nextafter(bumped[17, 40], torch.tensor(1.0))  # one ulp: no longer a product
    assert exact_q8(bumped) is None
    nan = w.clone()
    nan[0, 0] = float("nan")
    assert exact_q8(nan) is None
    assert exact_q8(w[:, :80]) is None  # rows not whole blocks of 32
    assert exact_q8(w.double()) is None
    assert exact_q8(torch.randn(64, 64)) is None  # ordinary fp32 weights


def test_exact_bf16_and_the_choice_of_form():
    w = torch.randn(70, 50, generator=torch.Generator().manual_seed(0)).bfloat16().float()
    assert torch.equal(exact_bf16(w).float(), w)
    assert type(exact_rows(w)) is Bf16Rows  # K = 50: not whole blocks of 32, and not int8 products
    w[3, 7] = torch.nextafter(w[3, 7], torch.tensor(9.0))
    assert exact_bf16(w) is None and exact_rows(w) is None
    assert type(exact_rows(q8_values(40, 64))) is Q8Rows  # int8 products (18 significant bits: not bf16)


@pytest.mark.skipif(cpu.get_lib() is None, reason=f"CPU kernel unavailable: {cpu.lib_error()}")
@pytest.mark.parametrize("form,K", [("q8", 96), ("bf16", 96), ("bf16", 77)])  # 77: gk_sgemv_rows' tail
def test_head_and_embedding_match_the_fp32_weight(form, K):
    w = q8_values(1001, K, seed=1) if form == "q8" else \
        torch.randn(1001, K, generator=torch.Generator().manual_seed(1)).bfloat16().float()
    rows = exact_rows(w)
    assert rows.kind == {"q8": "int8", "bf16": "bf16"}[form]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 1, K, generator=g)
    fast = torch.nn.Linear(K, 1001, bias=False)
    fast.weight.data.copy_(w)
    fast.__class__ = cpu.FastHeadLinear
    with torch.inference_mode():
        y = rows.linear(x)
        assert y.shape == (1, 1, 1001) and torch.equal(y, fast(x))  # one token: the same bits
        ref = x.double() @ w.double().T
        assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
        xs = torch.randn(2, 37, K, generator=g)  # more tokens: chunked matmuls
        ys = rows.linear(xs)
        assert ys.shape == (2, 37, 1001)
        assert torch.allclose(ys, F.linear(xs, w), rtol=1e-5, atol=1e-6)
        ids = torch.tensor([[0, 1000, 5], [5, 5, 17]])
        assert torch.equal(rows.take(ids), F.embedding(ids, w))


def _tiny(tmp_path, tied: bool, form: str | None, model_type: str = "llama"):
    from _arch_helpers import build_tiny, calib_ids, quantize_dir, tiny_llama_config, TINY_VOCAB

    def init(model):
        mods = [model.get_input_embeddings()] + ([] if tied else [model.get_output_embeddings()])
        for i, m in enumerate(mods):
            w = m.weight
            if form == "q8":
                w.copy_(q8_values(*w.shape, seed=3 + i) * 20)
            elif form == "bf16":
                w.copy_(w.bfloat16().float())

    cfg = {**tiny_llama_config(), "tie_word_embeddings": tied}
    if model_type == "gemma3_text":  # a scaled embedding (Gemma3TextScaledWordEmbedding)
        cfg.update(head_dim=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"])
    src = build_tiny(model_type, tmp_path / "src", init=init, **cfg)
    quantize_dir(src, tmp_path / "q", calib_ids(TINY_VOCAB), method="rtn")
    return tmp_path / "q"


@pytest.mark.skipif(cpu.get_lib() is None, reason=f"CPU kernel unavailable: {cpu.lib_error()}")
@pytest.mark.parametrize("tied,form,arch", [(True, "q8", "llama"), (False, "q8", "llama"), (True, "bf16", "llama"),
                                            (True, "q8", "gemma3_text")])
def test_load_holds_exact_rows_with_the_same_numbers_and_bytes(tmp_path, monkeypatch, tied, form, arch):
    import gptqkit
    q = _tiny(tmp_path, tied, form, arch)
    m = gptqkit.load(q)
    emb, head = m.get_input_embeddings(), m.get_output_embeddings()
    assert isinstance(emb, ExactEmbedding) and type(head) is ExactHead
    if arch == "gemma3_text":  # still the model's own class, its scale applied
        assert type(emb).__name__ == "ExactGemma3TextScaledWordEmbedding" and float(emb.embed_scale) != 1.0
        assert isinstance(emb, emb._plain) and emb._plain.__name__ == "Gemma3TextScaledWordEmbedding"
    assert (emb.rows is head.rows) == tied and emb.rows.kind == {"q8": "int8", "bf16": "bf16"}[form]
    assert emb._parameters["weight"] is None and not any(p.dtype is torch.float32 and p.dim() == 2 and p.shape[0] > 1000
                                                         for p in m.parameters())
    monkeypatch.setenv("GPTQKIT_EXACT_ROWS", "0")
    plain = gptqkit.load(q)
    assert type(plain.get_output_embeddings()) is cpu.FastHeadLinear
    monkeypatch.delenv("GPTQKIT_EXACT_ROWS")
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.inference_mode():
        assert torch.equal(m(prompt).logits, plain(prompt).logits)
        assert torch.equal(m.generate(prompt, max_new_tokens=8, do_sample=False),
                           plain.generate(prompt, max_new_tokens=8, do_sample=False))
    # reading `weight` gives the fp32 tensor; state_dict and the saved checkpoint are unchanged
    assert torch.equal(emb.weight, plain.get_input_embeddings().weight)
    sd = m.state_dict()
    assert torch.equal(sd["model.embed_tokens.weight"], plain.state_dict()["model.embed_tokens.weight"])
    m.save(tmp_path / "again")
    for f in sorted(p.name for p in q.glob("*.safetensors")):
        assert hashlib.sha256((q / f).read_bytes()).digest() == \
            hashlib.sha256((tmp_path / "again" / f).read_bytes()).digest(), f
    # a no-op move keeps the rows; a real move or a new weight makes the modules plain again,
    # with the same values
    m.to("cpu").float()
    assert isinstance(m.get_input_embeddings(), ExactEmbedding) and type(m.get_output_embeddings()) is ExactHead
    plain_emb_cls = type(plain.get_input_embeddings())
    m.to(torch.float64)
    assert type(m.get_input_embeddings()) is plain_emb_cls and m.get_input_embeddings().weight.dtype is torch.float64
    assert torch.equal(m.get_input_embeddings().weight.float(), plain.get_input_embeddings().weight)
    assert (m.get_input_embeddings().weight is m.get_output_embeddings().weight) == tied
    head2 = gptqkit.load(q).get_output_embeddings()
    head2.weight = torch.nn.Parameter(torch.zeros_like(head2.weight))
    assert type(head2) is cpu.FastHeadLinear and not hasattr(head2, "rows")
    assert torch.equal(head2(torch.ones(1, 64)), torch.zeros(1, head2.out_features))


def test_other_weights_are_left_alone(tmp_path):
    import gptqkit
    m = gptqkit.load(_tiny(tmp_path, tied=False, form=None))
    assert type(m.get_input_embeddings()) is torch.nn.Embedding
    assert use_exact_rows(m) == 0


def test_real_model_embedding_is_held_exactly(tmp_path, monkeypatch):
    """The built-in SmolLM2-135M (converted from GGUF Q8_0) is the case this is for: its tied
    embedding loads as exact int8 rows (32 MB instead of 113), with the same logits."""
    pytest.importorskip("gguf")
    import gptqkit
    from gptqkit.models.default import default_model_dir
    out = tmp_path / "q"
    gptqkit.quantize(default_model_dir(), "shakespeare", out,
                     gptqkit.QuantizeConfig(method="rtn", bits=4, group_size=128, mse=False),
                     nsamples=2, seqlen=64, progress=False)
    m = gptqkit.load(out)
    emb = m.get_input_embeddings()
    assert type(emb) is ExactEmbedding and emb.rows is m.get_output_embeddings().rows
    assert emb.rows.codes.shape == (49152, 576)
    monkeypatch.setenv("GPTQKIT_EXACT_ROWS", "0")
    plain = gptqkit.load(out)
    ids = torch.randint(100, 40000, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(m(ids).logits, plain(ids).logits)
        step = m(ids[:, :1]).logits  # one token: the row GEMV on codes
        assert torch.equal(step, plain(ids[:, :1]).logits)
