"""GPTQ vs GPTAQ (--method gptaq) on the built-in SmolLM2-135M: perplexity, quantization time (and
where it goes), peak memory. Prints JSON.

    python benchmarks/gptaq_check.py [--methods gptq,gptaq,gptaq-fp32] [--nsamples 64] [--seqlen 512] \
        [--windows 40] [--threads 2] [--repeat 1] [--layers N] [--fp]

Settings: QuantizeConfig(bits=4, group_size=128, method=...) with the library defaults (act-order
with static groups, sym, automatic chunking), calibration "shakespeare" (seed 0), perplexity on
"shakespeare-eval" in windows of 512 tokens (at most --windows). Each run is its own process under
`/usr/bin/time -v` (peak RSS of the whole process, evaluation included); the child also reports
VmHWM right after quantizing (the quantization's own peak). With --repeat the methods alternate
order, so load from other jobs hits them alike. --layers N quantizes a copy of the model cut to its
first N blocks (symlinked weights) for quick looks; --fp also evaluates the float model.

Methods: `gptq`, `gptaq` (where the CPU has native bf16: its cross-term product in bf16 and, at
≤ 4 bits, its float block forward under bf16 autocast; see quant/gptq.py cross_product_dtype and
float_forward_dtype; the JSON's `cross_dtype` and `float_forward_dtype` say whether they applied), `gptaq-fp32` (GPTAQ with
GPTQKIT_GPTAQ_BF16=0: float32 throughout, as before).

Time parts (seconds, summed over the run): `hessian` Hessian.add (XᵀX and, for GPTAQ, the cross
term), `solve` the solves, `float_forward` GPTAQ's float-model block forwards, `forward` the rest
of the block work (the quantized forwards), `other` everything else (loading, capture, writing).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _timed(owner, name: str, acc: dict, key: str):
    fn = getattr(owner, name)

    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            acc[key] = acc.get(key, 0.0) + time.perf_counter() - t0
    setattr(owner, name, wrapper)
    return wrapper


def _cut_model(path: Path, layers: int, where: Path) -> Path:
    """A copy of the model folder (weights symlinked) whose config keeps the first `layers` blocks."""
    where.mkdir(parents=True, exist_ok=True)
    for f in path.iterdir():
        if f.name != "config.json":
            (where / f.name).symlink_to(f.resolve())
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    (where / "config.json").write_text(json.dumps(cfg))
    return where


def child(a) -> None:
    import torch
    torch.set_num_threads(a.threads)
    import gptqkit
    from gptqkit.api import load_tokenizer, resolve_model
    from gptqkit.eval.perplexity import perplexity
    from gptqkit.pipeline import block, collective, floats, linears
    from gptqkit.quant import gptq

    acc: dict = {}
    _timed(gptq.Hessian, "add", acc, "hessian")
    block.solve = collective.solve = _timed(linears, "solve", acc, "solve")  # imported by name there
    _timed(floats.FloatInputs, "_capture", acc, "float_forward")
    _timed(block.BlockQuantizer, "run", acc, "block")
    path = Path(resolve_model(None))
    with tempfile.TemporaryDirectory(prefix="gptqkit-gptaq-") as tmp:
        if a.layers:
            path = _cut_model(path, a.layers, Path(tmp) / "model")
        method = a.child.split("-")[0]  # "gptaq-fp32": GPTAQ with its cross term in float32 (set by main)
        cfg = gptqkit.QuantizeConfig(bits=4, group_size=128, method=method)
        t0 = time.perf_counter()
        rep = gptqkit.quantize(str(path), "shakespeare", f"{tmp}/out", cfg, nsamples=a.nsamples, seqlen=a.seqlen,
                               progress=False)
        wall = time.perf_counter() - t0
        peak = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM")) / 1024
        parts = {"hessian": acc.get("hessian", 0.0), "solve": acc.get("solve", 0.0),
                 "float_forward": acc.get("float_forward", 0.0)}
        parts["forward"] = acc.get("block", 0.0) - sum(parts.values())
        parts["other"] = wall - acc.get("block", 0.0)
        res = {"method": a.child, "quantize_seconds": round(wall, 1), "quantize_peak_rss_mib": round(peak),
               "seconds": {k: round(v, 1) for k, v in parts.items()}, "block_forwards": rep.forwards,
               "threads": torch.get_num_threads(), "layers": a.layers or "all",
               "cross_dtype": str(gptq.cross_product_dtype(torch.float32)).removeprefix("torch.")
               if method == "gptaq" else None,
               "float_forward_dtype": str(gptq.float_forward_dtype(torch.float32, "cpu", 4) or torch.float32
                                          ).removeprefix("torch.") if method == "gptaq" else None}
        if a.windows:
            tok = load_tokenizer(str(path))
            t0 = time.perf_counter()
            res["ppl"] = perplexity(gptqkit.load(f"{tmp}/out"), tok, "shakespeare-eval", seqlen=512,
                                    max_windows=a.windows, progress=False)["perplexity"]
            res["eval_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(res))


def _fp_ppl(a) -> float:
    import torch
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM
    from gptqkit.api import load_tokenizer, resolve_model
    from gptqkit.eval.perplexity import perplexity
    path = resolve_model(None)
    fp = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return perplexity(fp, load_tokenizer(path), "shakespeare-eval", seqlen=512, max_windows=a.windows,
                      progress=False)["perplexity"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="gptq,gptaq")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40, help="0: no perplexity")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--layers", type=int, default=0, help="only the first N blocks (0: all)")
    ap.add_argument("--fp", action="store_true", help="also the float model's perplexity")
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        return child(a)
    result: dict = {"nsamples": a.nsamples, "seqlen": a.seqlen, "eval_windows": a.windows, "threads": a.threads,
                    "runs": []}
    if a.fp and a.windows:
        result["fp_ppl"] = _fp_ppl(a)
    methods = a.methods.split(",")
    for r in range(a.repeat):
        for m in methods if r % 2 == 0 else methods[::-1]:
            cmd = ["/usr/bin/time", "-v", sys.executable, __file__, "--child", m, "--nsamples", str(a.nsamples),
                   "--seqlen", str(a.seqlen), "--windows", str(a.windows), "--threads", str(a.threads),
                   "--layers", str(a.layers)]
            env = dict(os.environ)
            if m == "gptaq-fp32":
                env["GPTQKIT_GPTAQ_BF16"] = "0"
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if p.returncode:
                sys.exit(f"{m} failed:\n{p.stderr[-3000:]}")
            run = json.loads(p.stdout.strip().splitlines()[-1])
            rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
            run["process_peak_rss_mib"] = round(int(rss.group(1)) / 1024) if rss else None
            print(json.dumps(run), file=sys.stderr, flush=True)
            result["runs"].append(run)
    by = {m: [x for x in result["runs"] if x["method"] == m] for m in methods}
    for m in ("gptaq", "gptaq-fp32"):
        if "gptq" in by and m in by:
            t = {k: sum(x["quantize_seconds"] for x in by[k]) for k in ("gptq", m)}
            result[f"time_ratio_{m.replace('-', '_')}_over_gptq"] = round(t[m] / t["gptq"], 3)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
