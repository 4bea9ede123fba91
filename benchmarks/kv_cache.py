"""Decode speed with transformers' DynamicCache against gptqkit's GrowingCache, side by side.

    python benchmarks/kv_cache.py --q4 /tmp/e2e-smol-4bit --threads 1,2 --rounds 3 > kv.json

One process holds both models (fp32 SmolLM2-135M from the built-in folder, and the GPTQ checkpoint
loaded with gptqkit.load). Batch 1, the same seeded random --prompt-token prompt. Four streams,
(fp32, q4) x (DynamicCache, GrowingCache), each prefilled into its own cache (not timed), then
decode --new greedy tokens in lockstep: every step runs each stream once, in an order rotating
from step to step, each step timed alone, so the shared machine's busy spells fall on all streams
alike. ms/token = median over all steps of all --rounds. The greedy tokens of the two caches are
compared (`same_tokens`).
`--generate` also times model.generate(max_new_tokens=min_new_tokens=--new) with cache=DynamicCache
against the model's default (gptqkit.load: a GrowingCache sized to the generation), prefill
included, in alternating order. `--compile` compares a torch.compile'd forward with a StaticCache
(transformers' compile-friendly cache) against the eager forward with a GrowingCache, in lockstep.
JSON to stdout: per-run records and medians.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def lockstep(streams: dict, prompt, new: int) -> tuple[dict, dict]:
    """Decode `new` greedy tokens on every stream (name -> (model, make_cache)) in lockstep: each
    step runs every stream once, in an order that rotates from step to step, so a busy spell of a
    shared machine lands on all of them alike. Returns per-stream per-step times (ms) and tokens."""
    import torch
    names = list(streams)
    state = {}
    with torch.inference_mode():
        for n in names:
            model, make = streams[n]
            cache = make()
            out = model(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1)
            state[n] = [cache, out.logits[:, -1].argmax(-1, keepdim=True)]
        times = {n: [] for n in names}
        toks = {n: [state[n][1]] for n in names}
        n0 = prompt.shape[1]
        for i in range(new - 1):
            pos = torch.tensor([[n0 + i]])
            k = i % len(names)
            for n in names[k:] + names[:k]:
                model, _ = streams[n]
                cache, tok = state[n]
                t0 = time.perf_counter()
                out = model(input_ids=tok, cache=cache, use_cache=True, position_ids=pos)
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
                times[n].append((time.perf_counter() - t0) * 1e3)
                state[n][1] = tok
                toks[n].append(tok)
    return times, {n: torch.cat(t, 1)[0].tolist() for n, t in toks.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--q4", required=True, help="GPTQ checkpoint folder")
    ap.add_argument("--base", default=None, help="float model folder (default: the built-in SmolLM2-135M)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--variants", default="fp32,q4")
    ap.add_argument("--generate", action="store_true")
    ap.add_argument("--compile", action="store_true")
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    import gptqkit
    from gptqkit.api import resolve_model
    from gptqkit.models.kv_cache import GrowingCache

    models = {}
    if "fp32" in a.variants:
        models["fp32"] = AutoModelForCausalLM.from_pretrained(a.base or resolve_model(None), dtype=torch.float32).eval()
    if "q4" in a.variants:
        models["q4"] = gptqkit.load(a.q4)
    cfg = next(iter(models.values())).config
    g = torch.Generator().manual_seed(1234)
    prompt = torch.randint(100, cfg.vocab_size - 100, (1, a.prompt), generator=g)
    cap = a.prompt + a.new
    caches = {"dynamic": lambda m: (lambda: DynamicCache(config=m.config)),
              "growing": lambda m: (lambda: GrowingCache(config=m.config, capacity=cap))}
    streams = {f"{name}/{c}": (m, caches[c](m)) for name, m in models.items() for c in ("dynamic", "growing")}
    res = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "prompt": a.prompt, "new": a.new, "rounds": a.rounds, "threads": {}}
    for nt in [int(t) for t in a.threads.split(",")]:
        torch.set_num_threads(nt)
        lockstep(streams, prompt[:, :64], 8)  # warm-up for this thread count
        steps = {n: [] for n in streams}
        same = True
        for r in range(a.rounds):
            t, toks = lockstep(streams, prompt, a.new)
            for n in streams:
                steps[n] += t[n]
            for name in models:
                same &= toks[f"{name}/dynamic"] == toks[f"{name}/growing"]
            log(f"threads {nt} round {r}: " + ", ".join(f"{n} {statistics.median(t[n]):.2f}" for n in streams))
        med = {n: statistics.median(v) for n, v in steps.items()}
        row = {"ms_per_token_median": med, "ms_per_token_mean": {n: statistics.fmean(v) for n, v in steps.items()},
               "same_tokens": same, "steps": steps}
        for name in models:
            row[f"{name}_dynamic_over_growing"] = med[f"{name}/dynamic"] / med[f"{name}/growing"]
        if len(models) == 2:
            row["q4_vs_fp32_dynamic"] = med["fp32/dynamic"] / med["q4/dynamic"]
            row["q4_vs_fp32_growing"] = med["fp32/growing"] / med["q4/growing"]
            row["q4_growing_vs_fp32_dynamic"] = med["fp32/dynamic"] / med["q4/growing"]
        res["threads"][nt] = row
        log(json.dumps({k: v for k, v in row.items() if k != "steps"}))
    if a.generate:
        gen = []
        for nt in [int(t) for t in a.threads.split(",")]:
            torch.set_num_threads(nt)
            for r in range(a.rounds):
                for name, m in models.items():
                    for c in (("dynamic", "growing") if r % 2 == 0 else ("growing", "dynamic")):
                        kw = {"cache": DynamicCache(config=m.config)} if c == "dynamic" else {}
                        with torch.inference_mode():
                            t0 = time.perf_counter()
                            m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=a.new,
                                       min_new_tokens=a.new, do_sample=False, pad_token_id=0, **kw)
                            dt = time.perf_counter() - t0
                        gen.append({"threads": nt, "round": r, "model": name, "cache": c, "generate_s": dt})
                        log(f"threads {nt} round {r} {name:5s} {c:8s} generate {dt:6.2f} s")
        res["generate"] = gen
    if a.compile:
        res["compile"] = {}
        for name, m in models.items():
            from transformers import StaticCache
            step = torch.compile(m, dynamic=False)
            mk = lambda m=m: StaticCache(config=m.config, max_cache_len=cap)
            comp = {"compiled": (step, mk), "eager": (m, caches["growing"](m))}
            t0 = time.perf_counter()
            lockstep({"compiled": comp["compiled"]}, prompt, 4)
            compile_s = time.perf_counter() - t0
            t, toks = lockstep(comp, prompt, a.new)
            res["compile"][name] = {"threads": torch.get_num_threads(), "compile_s": compile_s,
                                    "ms_per_token_median": {n: statistics.median(v) for n, v in t.items()},
                                    "same_tokens": toks["compiled"] == toks["eager"]}
            log(json.dumps(res["compile"][name]))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
