"""What the int8-activation GEMM (opt-in, GPTQKIT_CPU_I8_MIN_M) costs in perplexity: one 4-bit
checkpoint evaluated with the exact FMA kernel and with int8 activations at each block size, in one
process, on the same token ids. Prints JSON.

    python benchmarks/cpu_i8_ppl.py --q4 /tmp/i13-smol-4bit --windows 40 --blocks 32,64,0

Evaluation: `shakespeare-eval` (needs the built-in corpus) or --text FILE, the first --windows
windows of 512 tokens, batch 4 (so every linear sees M = 2048 rows and the int8 path runs
wherever it applies: 4-bit layers in the FMA layout). Block 0 = one int8 scale per group run.
"""
from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--q4", required=True, help="a 4-bit GPTQ checkpoint folder")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--blocks", default="32,0", help="input features per int8 scale (0: per group run)")
    ap.add_argument("--text", default="shakespeare-eval")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer

    import gptqkit
    from gptqkit.eval.perplexity import eval_ids, perplexity
    from gptqkit.kernels import cpu

    tok = AutoTokenizer.from_pretrained(a.q4)
    ids = eval_ids(tok, a.text)
    out = {"q4": a.q4, "windows": a.windows, "kernel_isa": cpu.isa(), "runs": []}
    for block in [None] + [int(b) for b in a.blocks.split(",")]:
        cpu.CpuBackend.i8_min_m = 0 if block is None else 1
        if block is not None:
            cpu.CpuBackend.i8_block = block
        model = gptqkit.load(a.q4)
        t = time.perf_counter()
        r = perplexity(model, tok, ids, seqlen=512, max_windows=a.windows, progress=False)
        run = {"kernel": "exact (fma)" if block is None else f"int8 x, block {block}",
               "perplexity": r["perplexity"], "nll": r["nll"], "seconds": time.perf_counter() - t}
        print(json.dumps(run), flush=True)
        out["runs"].append(run)
        del model
    base = out["runs"][0]["perplexity"]
    for run in out["runs"]:
        run["vs_exact_pct"] = 100 * (run["perplexity"] / base - 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
