"""Prefill speed of a 4-bit checkpoint against its fp32 model, measured as paired ratios in one
process: each round runs one 512-token forward of the fp32 model, of the 4-bit model with the
exact kernel, and of the 4-bit model with int8 activations (`set_int8_activations`, the same
layers switched), back to back, and divides. This VM's speed drifts by tens of percent within
minutes, and e2e.py's separate processes per variant run minutes apart; ratios of neighbouring
calls cancel that drift. Prints JSON: per variant the median ms, and per 4-bit variant the median
and min-max over rounds of fp32_ms / variant_ms, for logits at every position (what perplexity
needs) and at the last position only (`logits_to_keep=1`, what generate()'s prefill runs).

    python benchmarks/prefill_ab.py --q4 /tmp/i13-smol-4bit --rounds 8
    GPTQKIT_CPU_MARCH=x86-64-v3 python benchmarks/prefill_ab.py --q4 /tmp/i13-smol-4bit --rounds 8  # AVX2 build
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--q4", required=True, help="a 4-bit GPTQ checkpoint folder")
    ap.add_argument("--base", default=None, help="its fp32 model folder (default: the built-in SmolLM2-135M)")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--i8-rows", type=int, default=16, help="rows from which the int8 variant rounds x")
    a = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    import gptqkit
    from gptqkit.kernels import cpu
    torch.set_num_threads(a.threads)
    if a.base is None:
        from gptqkit.models.default import default_model_dir
        a.base = str(default_model_dir())
    fp32 = AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.float32).eval()
    q4 = gptqkit.load(a.q4).eval()
    n_i8 = cpu.set_int8_activations(q4, a.i8_rows)
    cpu.set_int8_activations(q4, False)
    ids = torch.randint(100, min(40000, fp32.config.vocab_size), (1, a.prompt),
                        generator=torch.Generator().manual_seed(0))

    def run(model, last: bool) -> float:
        t = time.perf_counter()
        model(ids, use_cache=True, **({"logits_to_keep": 1} if last else {}))
        return 1e3 * (time.perf_counter() - t)

    variants = {"fp32": (fp32, None), "q4": (q4, False), "q4-i8": (q4, a.i8_rows)}
    ms = {(v, last): [] for v in variants for last in (False, True)}
    with torch.inference_mode():
        for v, (model, i8) in variants.items():  # warm-up
            if i8 is not None:
                cpu.set_int8_activations(model, i8)
            run(model, False)
        for _ in range(a.rounds):
            for last in (False, True):
                for v, (model, i8) in variants.items():
                    if i8 is not None:
                        cpu.set_int8_activations(model, i8)
                    ms[(v, last)].append(run(model, last))
    out = {"kernel_isa": cpu.isa(), "threads": a.threads, "prompt": a.prompt, "rounds": a.rounds,
           "i8_layers": n_i8, "i8_rows": a.i8_rows}
    for last in (False, True):
        key = "last" if last else "all"
        res = {}
        for v in variants:
            res[f"{v}_ms"] = round(statistics.median(ms[(v, last)]), 1)
            if v != "fp32":
                r = [f / q for f, q in zip(ms[("fp32", last)], ms[(v, last)])]
                res[f"{v}_vs_fp32"] = {"median": round(statistics.median(r), 3), "min": round(min(r), 3),
                                       "max": round(max(r), 3)}
        out[f"logits_{key}"] = res
    print(json.dumps(out))


if __name__ == "__main__":
    main()
