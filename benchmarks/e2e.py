"""End-to-end CPU speed and memory of a GPTQ model against the same model in fp32 and bf16.

    python benchmarks/e2e.py --q4 /tmp/smol-4bit > e2e.json          # SmolLM2-135M by default
    python benchmarks/e2e.py --table e2e.json                       # markdown tables

Variants: `fp32` / `bf16` (AutoModelForCausalLM.from_pretrained(base, dtype=...)), `q4` (the GPTQ
checkpoint loaded with gptqkit.load, default backend, fp32 activations), `q4-bf16` (the same with
dtype=torch.bfloat16: bf16 activations and non-quantized weights), `q4-torch` (backend="torch")
and `q4-head` (the --q4-head checkpoint, made with `gptqkit quantize --lm-head`: its lm_head is
4-bit too and untied from the embedding; not in the default --variants). Also opt-in: `fp32-lean`
(the fp32 model with gptqkit's lean decode step, models/decode.py, turned on: what that step alone
gives a plain model) and `q4-hf` (the q4 model with it off, GPTQKIT_LEAN_DECODE=0: transformers'
forward at every step).
Each measurement runs in its own fresh subprocess (so RSS figures are that variant's alone), and
the rounds are interleaved: round 1 runs every variant once, then round 2, ... ; the report gives
the median over rounds (and every round's values).

Per subprocess, batch 1, random token ids (seeded, identical for every variant):
* prefill: one forward over a --prompt-token prompt (default 512), use_cache=True; 1 warm-up,
  median of --inner timed calls -> prompt tokens / s. Logits at every position (what perplexity
  needs: the output head runs on all 512 rows).
* prefill, last position (`prefill_last_tok_s`): the same forward with logits_to_keep=1, the
  prefill generate() runs (the head on one row).
* `q4-i8` (opt-in variant): the q4 model with the int8-activation GEMM from 16 rows
  (GPTQKIT_CPU_I8_MIN_M=16).
* decode (manual loop): after the prefill, --new tokens (default 64) one at a time, greedy
  (argmax), with past_key_values (DynamicCache); timed loop excludes the prefill -> tokens / s.
* decode (manual loop, own cache): the same loop with the KV cache the model's generate() makes:
  GrowingCache for a model from gptqkit.load, DynamicCache for a plain transformers model (there it
  repeats the loop above) -> "decode vs fp32 (own caches)", what a user of each gets.
* decode (generate): model.generate(prompt, max_new_tokens=min_new_tokens=--new, greedy);
  reported as total seconds and as (new - 1) / (t_generate(new) - t_generate(1)) tokens / s
  (generate's first token comes out of its prefill, which computes the head on the last position
  only; figures before this session subtracted the full prefill above and overstated the rate).
* breakdown (--breakdown, on by default): the decode-step time of the lm_head and of all other
  linear layers (QuantLinear or nn.Linear) replayed on their own with M = 1 inputs, in model
  order, same number of calls per token as the model makes; "rest" = decode step - both
  (attention, norms, rotary, embeddings, KV cache, Python).
* memory: VmRSS after load, VmHWM (peak RSS) at the end, bytes of parameters+buffers (the
  state dict), and for gptqkit backends the extra bytes of derived tensors (repacked layouts,
  exact int8 rows).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

VARIANTS = ("fp32", "bf16", "q4", "q4-bf16", "q4-torch", "q4-head", "fp32-lean", "q4-hf", "q4-i8")
OPT_IN = ("q4-head", "fp32-lean", "q4-hf", "q4-i8")  # not in the default --variants


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


# ----------------------------------------------------------------------------- worker

def worker(a) -> dict:
    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    rss_start = _status_kb("VmRSS")
    t0 = time.perf_counter()
    if a.variant in ("fp32", "bf16", "fp32-lean"):
        dtype = torch.bfloat16 if a.variant == "bf16" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(a.base, dtype=dtype)
        if a.variant == "fp32-lean":
            from gptqkit.models import decode
            assert decode.enable(model) is not None, "no lean decode step for this model"
    else:
        import gptqkit
        if a.variant == "q4-hf":
            os.environ["GPTQKIT_LEAN_DECODE"] = "0"
        if a.variant == "q4-i8":  # int8 activations from 16 rows (prefill), kernels/cpu.py
            os.environ["GPTQKIT_CPU_I8_MIN_M"] = "16"
        model = gptqkit.load(a.q4_head if a.variant == "q4-head" else a.q4,
                             backend="torch" if a.variant == "q4-torch" else None,
                             dtype=torch.bfloat16 if a.variant == "q4-bf16" else None)
    model.eval()
    load_s = time.perf_counter() - t0
    gc.collect()
    rss_load = _status_kb("VmRSS")
    try:  # heap freed during loading but kept by glibc's allocator (glibc only)
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        rss_trim = _status_kb("VmRSS")
    except (OSError, AttributeError):
        rss_trim = None

    from gptqkit.kernels.qlinear import QuantLinear
    sd_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    derived = 0
    backends = {}
    seen = set()
    codes_once = 0
    calls = set()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            backends[m.backend.name if m.backend else "none"] = backends.get(m.backend.name if m.backend else "none", 0) + 1
            # the backend's layout (CpuLayout: repacked codes, fp32 scale tables); with the codes
            # held there the layer has dropped its qweight buffer (QuantLinear.codes_in_layout)
            codes_once += bool(m.codes_in_layout)
            calls.add("op" if getattr(m.layout, "use_op", False) else m.backend.name)
            for v in vars(m.layout).values() if m.layout is not None else ():
                if isinstance(v, torch.Tensor) and id(v) not in seen:
                    seen.add(id(v))
                    derived += v.numel() * v.element_size()
    # exact int8 rows (kernels/exact_rows.py) hold an embedding/head outside the parameters
    for m in model.modules():
        rows = getattr(m, "rows", None)
        if rows is not None and hasattr(rows, "codes") and id(rows) not in seen:
            seen.add(id(rows))
            derived += rows.codes.numel() + rows.scales.numel() * rows.scales.element_size()
    # tied embeddings appear twice in the state dict; count storage once
    uniq = {}
    for t in list(model.parameters()) + list(model.buffers()):
        uniq[t.data_ptr()] = t.numel() * t.element_size()
    weight_bytes = sum(uniq.values())

    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1234)
    prompt = torch.randint(100, vocab - 100, (1, a.prompt), generator=g)

    lean = getattr(model, "_gptqkit_lean", None)
    res = {"variant": a.variant, "threads": torch.get_num_threads(), "load_s": load_s,
           "rss_start_mb": rss_start / 1024, "rss_after_load_mb": rss_load / 1024,
           "rss_after_load_trim_mb": rss_trim / 1024 if rss_trim is not None else None,
           "state_dict_mb": sd_bytes / 2**20, "weight_mb": weight_bytes / 2**20,
           "derived_mb": derived / 2**20, "quant_backends": backends,
           "layers_codes_held_once": codes_once, "cpu_call": sorted(calls)}

    with torch.inference_mode():
        # prefill
        def prefill():
            return model(prompt, use_cache=True)
        prefill()
        ts = []
        for _ in range(a.inner):
            t = time.perf_counter()
            out = prefill()
            ts.append(time.perf_counter() - t)
        t_pre = statistics.median(ts)
        res["prefill_s"] = t_pre
        res["prefill_tok_s"] = a.prompt / t_pre
        # the prefill generate() runs: the head on the last position only (logits_to_keep=1)
        ts = []
        for _ in range(a.inner):
            t = time.perf_counter()
            model(prompt, use_cache=True, logits_to_keep=1)
            ts.append(time.perf_counter() - t)
        res["prefill_last_tok_s"] = a.prompt / statistics.median(ts)

        # decode, manual loop (own=True: with the KV cache the model's generate() makes)
        def decode(n, own=False):
            past = own_cache(model, a.prompt + n + 1) if own else None
            out = model(prompt, past_key_values=past, use_cache=True) if past is not None else \
                model(prompt, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            toks = [nxt]
            t = time.perf_counter()
            for _ in range(n):
                out = model(nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                toks.append(nxt)
            return time.perf_counter() - t, torch.cat(toks, 1)
        decode(4)  # warm-up (short: the first steps are the slow ones)
        ds = []
        for _ in range(a.inner):
            dt, toks = decode(a.new)
            ds.append(dt)
        t_dec = statistics.median(ds)
        res["decode_s"] = t_dec
        res["decode_tok_s"] = a.new / t_dec
        res["decode_ms_per_token"] = t_dec / a.new * 1e3
        res["decode_tokens_head"] = toks[0, :8].tolist()
        # the same loop with the cache a user's generate() gets: GrowingCache on a model from
        # gptqkit.load, transformers' DynamicCache on a plain one (then this repeats the loop above)
        res["own_cache"] = type(own_cache(model, 8) or out.past_key_values).__name__
        decode(4, own=True)
        ds = []
        for _ in range(a.inner):
            dt, toks_own = decode(a.new, own=True)
            ds.append(dt)
        res["decode_own_tok_s"] = a.new / statistics.median(ds)
        res["decode_own_same_tokens"] = bool(torch.equal(toks, toks_own))

        # decode, generate
        if a.generate:
            gen_kw = dict(max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False,
                          attention_mask=torch.ones_like(prompt), pad_token_id=0)
            one_kw = dict(gen_kw, max_new_tokens=1, min_new_tokens=1)
            model.generate(prompt, **gen_kw)
            gs, g1 = [], []
            for _ in range(a.inner):
                t = time.perf_counter()
                model.generate(prompt, **one_kw)
                g1.append(time.perf_counter() - t)
                t = time.perf_counter()
                model.generate(prompt, **gen_kw)
                gs.append(time.perf_counter() - t)
            t_gen, t_one = statistics.median(gs), statistics.median(g1)
            res["generate_s"] = t_gen
            res["generate_one_s"] = t_one
            # generate()'s prefill computes the head on the last position only, so the timed
            # prefill above is no measure of it: subtract a 1-token generate instead
            res["generate_decode_tok_s"] = (a.new - 1) / max(t_gen - t_one, 1e-9)

        if a.breakdown:
            res["breakdown"] = breakdown(model, t_dec / a.new, a.reps_breakdown)

    # how many forward calls took the lean decode step (models/decode.py), and how many did not
    res["lean_decode"] = None if lean is None else {"steps": lean.steps, "fallbacks": lean.fallbacks}
    res["rss_peak_mb"] = _status_kb("VmHWM") / 1024
    res["rss_end_mb"] = _status_kb("VmRSS") / 1024
    return res


def own_cache(model, capacity: int):
    """The KV cache model.generate() would make: a GrowingCache where gptqkit.load installed it
    (models/kv_cache.py::use_growing_cache), else None (the model's own DynamicCache)."""
    if "_prepare_cache_for_generation" not in vars(model):
        return None
    from gptqkit.models.kv_cache import GrowingCache
    return GrowingCache(config=model.config, capacity=capacity)


def breakdown(model, step_s: float, reps: int) -> dict:
    """Time of one decode step's linear layers, replayed alone with M = 1 inputs."""
    import torch
    from torch import nn
    from gptqkit.kernels.qlinear import QuantLinear
    head = model.get_output_embeddings()
    dtype = next(model.parameters()).dtype
    lins = [m for m in model.modules() if isinstance(m, (QuantLinear, nn.Linear)) and m is not head]
    xs = [torch.randn(1, 1, m.in_features, dtype=dtype) for m in lins]
    xh = torch.randn(1, 1, head.in_features, dtype=dtype)

    def run_lins():
        for m, x in zip(lins, xs):
            m(x)

    def run_head():
        head(xh)
    res = {}
    with torch.inference_mode():
        for name, fn in (("linears", run_lins), ("lm_head", run_head)):
            fn()
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
            res[name + "_ms"] = statistics.median(ts) * 1e3
    res["n_linears"] = len(lins)
    res["step_ms"] = step_s * 1e3
    res["rest_ms"] = res["step_ms"] - res["linears_ms"] - res["lm_head_ms"]
    for k in ("linears", "lm_head", "rest"):
        res[k + "_frac"] = res[k + "_ms"] / res["step_ms"]
    return res


# ----------------------------------------------------------------------------- driver

def driver(a) -> dict:
    variants = [v for v in a.variants.split(",") if v]
    rounds: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(a.rounds):
        for v in variants:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", v, "--base", a.base, "--q4", a.q4 or "",
                   "--q4-head", a.q4_head or "", "--prompt", str(a.prompt), "--new", str(a.new), "--inner", str(a.inner),
                   "--threads", str(a.threads), "--reps-breakdown", str(a.reps_breakdown)]
            if not a.generate:
                cmd.append("--no-generate")
            if not a.breakdown or v == "q4-torch":
                cmd.append("--no-breakdown")
            log(f"round {r + 1}/{a.rounds}: {v}")
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                log(p.stderr[-3000:])
                raise SystemExit(f"worker {v} failed")
            res = json.loads(p.stdout.strip().splitlines()[-1])
            log("   ", {k: (round(x, 3) if isinstance(x, float) else x) for k, x in res.items()
                       if k in ("prefill_tok_s", "prefill_last_tok_s", "decode_tok_s", "decode_own_tok_s", "own_cache", "generate_decode_tok_s", "rss_start_mb", "rss_after_load_mb", "rss_after_load_trim_mb",
                                "rss_peak_mb")})
            rounds[v].append(res)

    def med(v, key, sub=None):
        vals = [(r[sub][key] if sub else r[key]) for r in rounds[v] if (r.get(sub, {}) if sub else r).get(key) is not None]
        return statistics.median(vals) if vals else None

    summary = {}
    for v in variants:
        s = {k: med(v, k) for k in ("prefill_tok_s", "prefill_last_tok_s", "decode_tok_s", "decode_ms_per_token", "generate_s",
                                    "generate_decode_tok_s", "rss_start_mb", "rss_after_load_mb", "rss_after_load_trim_mb", "rss_peak_mb", "weight_mb",
                                    "state_dict_mb", "derived_mb", "load_s")}
        s["decode_tok_s_rounds"] = [r["decode_tok_s"] for r in rounds[v]]
        s["prefill_tok_s_rounds"] = [r["prefill_tok_s"] for r in rounds[v]]
        s["prefill_last_tok_s_rounds"] = [r.get("prefill_last_tok_s") for r in rounds[v]]
        s["decode_own_tok_s"] = med(v, "decode_own_tok_s")
        s["decode_own_tok_s_rounds"] = [r.get("decode_own_tok_s") for r in rounds[v]]
        s["own_cache"] = rounds[v][0].get("own_cache") if rounds[v] else None
        s["lean_decode"] = rounds[v][0].get("lean_decode") if rounds[v] else None
        s["decode_own_same_tokens"] = all(r.get("decode_own_same_tokens") for r in rounds[v])
        if rounds[v] and "breakdown" in rounds[v][0]:
            s["breakdown"] = {k: med(v, k, "breakdown") for k in rounds[v][0]["breakdown"]}
        summary[v] = s
    if "fp32" in summary:
        for v in variants:
            for k in ("prefill_tok_s", "prefill_last_tok_s", "decode_tok_s", "decode_own_tok_s", "generate_decode_tok_s"):
                if summary[v].get(k) and summary["fp32"].get(k):
                    summary[v][k.replace("_tok_s", "") + "_vs_fp32"] = summary[v][k] / summary["fp32"][k]
    import torch
    return {"args": vars(a), "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                                         "torch": torch.__version__, "loadavg_end": os.getloadavg(),
                                         "kernel_isa": _kernel_isa()},
            "summary": summary, "rounds": rounds}


def table(path: str) -> str:
    d = json.load(open(path))
    s = d["summary"]
    f = lambda x, n=1: "–" if x is None else f"{x:.{n}f}"  # noqa: E731
    lines = ["| variant | prefill tok/s | decode tok/s (loop) | ms/token | decode tok/s (loop, own cache) | "
             "decode tok/s (generate) | decode vs fp32 | decode vs fp32 (own caches) | prefill vs fp32 | "
             "prefill vs fp32, last-position head (generate's) | "
             "RSS after load MB (after malloc_trim) | peak RSS MB | weights MB | derived MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for v, r in s.items():
        own = f"{f(r.get('decode_own_tok_s'))} ({r.get('own_cache') or '–'})"
        lines.append(f"| {v} | {f(r['prefill_tok_s'])} | {f(r['decode_tok_s'])} | {f(r['decode_ms_per_token'], 2)} | "
                     f"{own} | {f(r['generate_decode_tok_s'])} | {f(r.get('decode_vs_fp32'), 2)}× | "
                     f"{f(r.get('decode_own_vs_fp32'), 2)}× | "
                     f"{f(r.get('prefill_vs_fp32'), 2)}× | {f(r.get('prefill_last_vs_fp32'), 2)}× | {f(r['rss_after_load_mb'], 0)} ({f(r.get('rss_after_load_trim_mb'), 0)}) | {f(r['rss_peak_mb'], 0)} | "
                     f"{f(r['weight_mb'], 0)} | {f(r['derived_mb'], 0)} |")
    lines += ["", "| variant | decode step ms | linears ms (n) | lm_head ms | rest ms | linears % | lm_head % | rest % |",
              "|---|---|---|---|---|---|---|---|"]
    for v, r in s.items():
        b = r.get("breakdown")
        if b:
            lines.append(f"| {v} | {f(b['step_ms'], 2)} | {f(b['linears_ms'], 2)} ({b['n_linears']:.0f}) | "
                         f"{f(b['lm_head_ms'], 2)} | {f(b['rest_ms'], 2)} | {f(100 * b['linears_frac'], 0)} | "
                         f"{f(100 * b['lm_head_frac'], 0)} | {f(100 * b['rest_frac'], 0)} |")
    return "\n".join(lines)


def _kernel_isa() -> str:
    from gptqkit.kernels import cpu
    return cpu.isa()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=None, help="fp32 model folder (default: gptqkit's built-in SmolLM2-135M)")
    ap.add_argument("--q4", default=None, help="GPTQ checkpoint of the same model")
    ap.add_argument("--q4-head", default=None, help="GPTQ checkpoint with a quantized lm_head "
                    "(gptqkit quantize --lm-head): variant q4-head")
    ap.add_argument("--variants", default=",".join(v for v in VARIANTS if v not in OPT_IN))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--inner", type=int, default=3, help="timed repetitions inside each subprocess (median)")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default)")
    ap.add_argument("--reps-breakdown", type=int, default=20)
    ap.add_argument("--no-generate", dest="generate", action="store_false")
    ap.add_argument("--no-breakdown", dest="breakdown", action="store_false")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--table", default=None, help="print markdown tables of a saved JSON run")
    a = ap.parse_args()
    if a.table:
        print(table(a.table))
        return
    if a.base is None:
        from gptqkit.models.default import default_model_dir
        a.base = str(default_model_dir())
    if a.worker:
        a.variant = a.worker
        print(json.dumps(worker(a)))
        return
    if any(v.startswith("q4") and v != "q4-head" for v in a.variants.split(",")) and not a.q4:
        ap.error("--q4 <checkpoint dir> is needed for the q4 variants")
    if "q4-head" in a.variants.split(",") and not a.q4_head:
        ap.error("--q4-head <checkpoint dir> is needed for the q4-head variant")
    print(json.dumps(driver(a), indent=1))


if __name__ == "__main__":
    main()
