"""Run-to-run noise of one GPTQ setting on SmolLM2-135M: the same quantization with only the
solver's blocksize changed (a reordering of floating-point additions). One JSON line per run.

    python benchmarks/noise_blocksize.py
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time

import gptqkit
from gptqkit.api import load_tokenizer, resolve_model
from gptqkit.eval.perplexity import perplexity


def main() -> None:
    path = resolve_model(None)
    tok = load_tokenizer(path)
    for bs in (64, 32):
        tmp = tempfile.mkdtemp(prefix="gptqkit-noise-")
        try:
            cfg = gptqkit.QuantizeConfig(bits=4, group_size=128, desc_act=False, static_groups=False, blocksize=bs)
            t0 = time.perf_counter()
            gptqkit.quantize(path, "shakespeare", f"{tmp}/out", cfg, nsamples=64, seqlen=512, progress=False)
            dt = time.perf_counter() - t0
            ppl = perplexity(gptqkit.load(f"{tmp}/out"), tok, "shakespeare-eval", seqlen=512, max_windows=40,
                             progress=False)["perplexity"]
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(json.dumps({"blocksize": bs, "ppl": round(ppl, 3), "quantize_s": round(dt, 1)}), flush=True)


if __name__ == "__main__":
    main()
