"""Shared fixtures: a tiny random Llama (hidden 64, 2 layers, vocab 256) saved with a tokenizer
trained in memory, so tests that need a whole model folder run with no network in seconds."""
from __future__ import annotations

from pathlib import Path

import pytest

TINY_VOCAB = 256
TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. "
    "All the world's a stage, and all the men and women merely players; they have their exits "
    "and their entrances, and one man in his time plays many parts. hello world, hello there.\n"
)


def tiny_text(repeat: int = 20) -> str:
    """Text for calibration/evaluation with the tiny tokenizer (about 80 tokens per repeat)."""
    return TINY_TEXT * repeat


def build_tiny_tokenizer(vocab_size: int = TINY_VOCAB):
    """A character-level WordLevel tokenizer (ids < vocab_size) wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    chars = sorted(set(TINY_TEXT.lower() + TINY_TEXT.upper() + "0123456789!?-\"'"))
    vocab = {t: i for i, t in enumerate(specials + [c for c in chars if c not in specials])}
    assert len(vocab) <= vocab_size
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # one token per character
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig
    kw = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    kw.update(overrides)
    return LlamaConfig(**kw)


def make_tiny_llama(out: str | Path, seed: int = 0, **config_overrides) -> Path:
    """Build a random tiny Llama, save it (safetensors, float32) and a tokenizer into `out`."""
    import torch
    from transformers import LlamaForCausalLM

    out = Path(out)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**config_overrides)).eval()
    with torch.no_grad():  # larger than init std so quantization errors show in the logits
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    model.save_pretrained(out, safe_serialization=True)
    build_tiny_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A saved tiny random Llama folder (hidden 64, 2 layers, vocab 256) with a tokenizer."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama") / "model")


@pytest.fixture(scope="session")
def tiny_llama_factory():
    """make_tiny_llama(out, seed=0, **LlamaConfig overrides) -> Path, for variants of the tiny model."""
    return make_tiny_llama


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("tiny_text") / "text.txt"
    p.write_text(tiny_text())
    return p
