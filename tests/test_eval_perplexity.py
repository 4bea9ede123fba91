"""perplexity() against a direct reference computation on a tiny random Llama."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gptqkit.errors import CalibrationError
from gptqkit.eval import perplexity

VOCAB = 128


class CharTokenizer:
    def __call__(self, texts, add_special_tokens=True):
        single = isinstance(texts, str)
        rows = [[ord(c) % VOCAB for c in t] for t in ([texts] if single else texts)]
        return {"input_ids": rows[0] if single else rows}


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).eval()


TEXT = (
    "To be, or not to be, that is the question:\n"
    "Whether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\n"
    "Or to take arms against a sea of troubles\n"
) * 6


def reference_nll(model, ids, seqlen, nwin):
    """Mean NLL the long way: one window at a time, log_softmax in float64, explicit gather."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(nwin):
            x = ids[w * seqlen : (w + 1) * seqlen].unsqueeze(0)
            logp = torch.log_softmax(model(input_ids=x).logits[0].double(), dim=-1)
            for t in range(seqlen - 1):
                total -= float(logp[t, x[0, t + 1]])
                count += 1
    return total / count, count


@pytest.mark.parametrize("seqlen, batch_size, max_windows", [(64, 4, None), (48, 3, None), (64, 2, 3)])
def test_matches_reference(tiny_llama, seqlen, batch_size, max_windows):
    ids = torch.tensor([ord(c) % VOCAB for c in TEXT])
    nwin = len(ids) // seqlen if max_windows is None else min(max_windows, len(ids) // seqlen)
    ref_nll, ref_count = reference_nll(tiny_llama, ids, seqlen, nwin)

    res = perplexity(tiny_llama, CharTokenizer(), [TEXT], seqlen=seqlen,
                     max_windows=max_windows, batch_size=batch_size, progress=False)
    assert set(res) == {"perplexity", "nll", "tokens", "windows", "seqlen"}
    assert res["windows"] == nwin and res["seqlen"] == seqlen and res["tokens"] == ref_count
    assert res["nll"] == pytest.approx(ref_nll, rel=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(ref_nll), rel=1e-5)
    # a random model over 128 tokens sits near the uniform perplexity
    assert 50 < res["perplexity"] < 300


def test_token_tensor_source_and_batch_size_invariance(tiny_llama):
    ids = torch.tensor([ord(c) % VOCAB for c in TEXT])
    a = perplexity(tiny_llama, None, ids, seqlen=40, batch_size=1, progress=False)
    b = perplexity(tiny_llama, None, ids, seqlen=40, batch_size=5, progress=False)
    assert a["windows"] == len(ids) // 40
    assert a["nll"] == pytest.approx(b["nll"], rel=1e-5)


def test_model_returning_tuple(tiny_llama):
    class TupleModel(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return (self.inner(input_ids=input_ids).logits,)

    ids = torch.tensor([ord(c) % VOCAB for c in TEXT])
    a = perplexity(TupleModel(tiny_llama), None, ids, seqlen=64, progress=False)
    b = perplexity(tiny_llama, None, ids, seqlen=64, progress=False)
    assert a["nll"] == pytest.approx(b["nll"], rel=1e-6)


def test_training_mode_is_restored(tiny_llama):
    tiny_llama.train()
    try:
        perplexity(tiny_llama, CharTokenizer(), [TEXT], seqlen=64, max_windows=1, progress=False)
        assert tiny_llama.training
    finally:
        tiny_llama.eval()


def test_text_shorter_than_a_window(tiny_llama):
    with pytest.raises(CalibrationError, match="has 5 tokens but one window needs 64"):
        perplexity(tiny_llama, CharTokenizer(), ["short"], seqlen=64, progress=False)
    with pytest.raises(CalibrationError):
        perplexity(tiny_llama, CharTokenizer(), [TEXT], seqlen=1, progress=False)


def test_dataset_names_mean_their_eval_split(tiny_llama, monkeypatch):
    from gptqkit.data import text as text_mod

    asked = []
    monkeypatch.setattr(text_mod, "_load_hf_dataset", lambda name: asked.append(name) or TEXT)
    perplexity(tiny_llama, CharTokenizer(), "wikitext2", seqlen=64, max_windows=1, progress=False)
    perplexity(tiny_llama, CharTokenizer(), "c4", seqlen=64, max_windows=1, progress=False)
    assert asked == ["wikitext2-test", "c4-validation"]
