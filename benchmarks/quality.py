"""Perplexity of FP, RTN and GPTQ on the built-in SmolLM2-135M, one row per setting. Prints JSON.

    python benchmarks/quality.py --nsamples 64 --seqlen 512 --windows 40

Calibration: `--nsamples` sequences of `--seqlen` tokens from the built-in calibration text
("shakespeare", seed 0); evaluation: held-out works ("shakespeare-eval"), non-overlapping
windows of 512 tokens. RTN uses the same grid (same bits, group size, sym) as GPTQ.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time

ROWS = {  # the default solver settings are act-order + static groups (g_idx stays c // g)
    "4bit-g64-sym": dict(bits=4, group_size=64),
    "4bit-g128-sym": dict(bits=4, group_size=128),
    "3bit-g64-sym": dict(bits=3, group_size=64),
    "4bit-g64-sym-act-dynamic": dict(bits=4, group_size=64, desc_act=True, static_groups=False),
    "4bit-g64-sym-plain": dict(bits=4, group_size=64, desc_act=False, static_groups=False),
    "3bit-g64-sym-plain": dict(bits=3, group_size=64, desc_act=False, static_groups=False),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--extra", default="{}", help="JSON of settings added to every GPTQ row, e.g. '{\"mse\": true}'")
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    import gptqkit
    from gptqkit.api import load_tokenizer, resolve_model
    from gptqkit.eval.perplexity import perplexity

    path = resolve_model(None)
    tok = load_tokenizer(path)
    ev = dict(seqlen=512, max_windows=a.windows, progress=False)
    fp = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    result = {"model": str(path), "nsamples": a.nsamples, "seqlen": a.seqlen, "eval_windows": a.windows,
              "fp_ppl": perplexity(fp, tok, "shakespeare-eval", **ev)["perplexity"], "rows": []}
    del fp
    extra = json.loads(a.extra)
    rtn_cache: dict = {}
    tmp = tempfile.mkdtemp(prefix="gptqkit-quality-")
    try:
        for name in a.rows.split(","):
            row = {"row": name, **ROWS[name]}
            grid = (row["bits"], row["group_size"], row.get("sym", True))
            if grid in rtn_cache:  # RTN ignores the solver's settings: same grid, same result
                row["rtn_seconds"], row["rtn_ppl"] = rtn_cache[grid]
            for method in ("gptq",) if grid in rtn_cache else ("rtn", "gptq"):
                cfg = gptqkit.QuantizeConfig(method=method, **ROWS[name], **(extra if method == "gptq" else {}))
                out = f"{tmp}/{name}-{method}"
                t0 = time.perf_counter()
                gptqkit.quantize(path, "shakespeare", out, cfg, nsamples=a.nsamples, seqlen=a.seqlen, progress=False)
                row[f"{method}_seconds"] = round(time.perf_counter() - t0, 1)
                row[f"{method}_ppl"] = perplexity(gptqkit.load(out), tok, "shakespeare-eval", **ev)["perplexity"]
                shutil.rmtree(out)
            rtn_cache[grid] = (row["rtn_seconds"], row["rtn_ppl"])
            gap = row["rtn_ppl"] - result["fp_ppl"]
            row["gap_closed"] = round((row["rtn_ppl"] - row["gptq_ppl"]) / gap, 3) if gap > 0 else None
            result["rows"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
