"""Run-to-run noise of one GPTQ setting on SmolLM2-135M: the same quantization with only the
solver's blocksize changed (a reordering of floating-point additions; in exact arithmetic the
result does not depend on it). One JSON line per run.

    python benchmarks/noise_blocksize.py [--blocksizes 64,32] [--no-mse] [--seed 0]

Setting: 4-bit g128, no act-order, static groups off (the plain setting), the clip search as the
library default unless --no-mse; 64 x 512 calibration tokens of "shakespeare" (--seed: the draw),
perplexity on "shakespeare-eval", 40 windows of 512.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time

import gptqkit
from gptqkit.api import load_tokenizer, resolve_model
from gptqkit.eval.perplexity import perplexity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocksizes", default="64,32")
    ap.add_argument("--no-mse", action="store_true", help="clip search off (the plain GPTQ grid)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    path = resolve_model(None)
    tok = load_tokenizer(path)
    for bs in (int(b) for b in a.blocksizes.split(",")):
        tmp = tempfile.mkdtemp(prefix="gptqkit-noise-")
        try:
            cfg = gptqkit.QuantizeConfig(bits=4, group_size=128, desc_act=False, static_groups=False, blocksize=bs,
                                          **({"mse": False} if a.no_mse else {}))
            t0 = time.perf_counter()
            gptqkit.quantize(path, "shakespeare", f"{tmp}/out", cfg, nsamples=64, seqlen=512, seed=a.seed,
                             progress=False)
            dt = time.perf_counter() - t0
            ppl = perplexity(gptqkit.load(f"{tmp}/out"), tok, "shakespeare-eval", seqlen=512, max_windows=40,
                             progress=False)["perplexity"]
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(json.dumps({"blocksize": bs, "ppl": round(ppl, 3), "quantize_s": round(dt, 1)}), flush=True)


if __name__ == "__main__":
    main()
