"""Where one 512-token prefill of a 4-bit checkpoint spends its time: wall time inside the
QuantLinear forwards, the lm_head, and everything else (attention, norms, activations), by
wrapping those modules' forwards with timers. Prints JSON (ms per prefill, mean of --reps after one
warm-up). Set GPTQKIT_CPU_I8_MIN_M=16 to see the int8-activation path, GPTQKIT_CPU_MARCH=x86-64-v3
for the AVX2 build.

    GPTQKIT_CPU_MARCH=x86-64-v3 python benchmarks/prefill_profile.py --q4 /tmp/i13-smol-4bit
"""
from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--q4", required=True)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import torch

    import gptqkit
    from gptqkit.kernels import cpu
    from gptqkit.kernels.qlinear import QuantLinear
    torch.set_num_threads(a.threads)
    model = gptqkit.load(a.q4).eval()
    prompt = torch.randint(100, 40000, (1, a.prompt), generator=torch.Generator().manual_seed(0))
    times: dict[str, float] = {}

    def timed(mod, key):
        f = mod.forward

        def g(*args, **kw):
            t = time.perf_counter()
            r = f(*args, **kw)
            times[key] = times.get(key, 0.0) + time.perf_counter() - t
            return r
        mod.forward = g

    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            timed(mod, "quant_linears")
        elif name.endswith("lm_head"):
            timed(mod, "lm_head")
    with torch.inference_mode():
        model(prompt, use_cache=True)
        times.clear()
        t = time.perf_counter()
        for _ in range(a.reps):
            model(prompt, use_cache=True)
        total = (time.perf_counter() - t) / a.reps
    ms = {k: 1e3 * v / a.reps for k, v in times.items()}
    ms["rest"] = 1e3 * total - sum(ms.values())
    print(json.dumps({"kernel_isa": cpu.isa(), "threads": a.threads, "prompt": a.prompt,
                      "i8_min_m": os.environ.get("GPTQKIT_CPU_I8_MIN_M", "0"),
                      "total_ms": 1e3 * total, **{f"{k}_ms": v for k, v in ms.items()}}))


if __name__ == "__main__":
    main()
