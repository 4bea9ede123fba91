"""Perplexity of FP, RTN and each solver variant at each grid, over several calibration draws.
Prints JSON (stdout) and a markdown table (stderr, or --markdown FILE).

    python benchmarks/quality.py --seeds 3 --rows 4bit-g128,4bit-g64,3bit-g128,3bit-g64,2bit-g32 \\
        --variants default,gptaq,mse --windows 40
    python benchmarks/quality.py --model gemma3-270m --seeds 3 --windows 16

Calibration: `--nsamples` sequences of `--seqlen` tokens from the built-in calibration text
("shakespeare"), drawn with seeds 0..--seeds-1 (a different set of random windows per seed).
Evaluation: the held-out works ("shakespeare-eval", never drawn for calibration), the first
`--windows` non-overlapping windows of 512 tokens, the same for every row. Each quantized
checkpoint is written, loaded back with gptqkit.load and evaluated, so the figures are those of
the real checkpoint. RTN is plain round-to-nearest (min/max range, no clip search) on the row's grid and uses no
calibration, so it has one value.

A row is a grid (bits, group size, sym); a variant is a set of solver settings on top of
gptqkit's defaults (VARIANTS). Each cell is the mean and min-max over the seeds, and the share of
RTN's perplexity gap to FP that the variant closes: (RTN - x) / (RTN - FP).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time

ROWS = {
    "4bit-g128": dict(bits=4, group_size=128),
    "4bit-g64": dict(bits=4, group_size=64),
    "3bit-g128": dict(bits=3, group_size=128),
    "3bit-g64": dict(bits=3, group_size=64),
    "2bit-g32": dict(bits=2, group_size=32),
    "8bit-g128": dict(bits=8, group_size=128),
}
# Solver settings on top of QuantizeConfig's defaults (act-order + static groups, and since the
# seed tables of issue 12 the weighted clip search). "default" is whatever the defaults are now;
# "no-mse" is the default before that change.
VARIANTS = {
    "default": {},
    "no-mse": dict(mse=False),
    "plain": dict(desc_act=False, static_groups=False),
    "act-dynamic": dict(desc_act=True, static_groups=False),
    "mse": dict(mse=True),
    "gptaq": dict(method="gptaq"),
    "gptaq-mse": dict(method="gptaq", mse=True),
    # act-order solving each static group as one run, groups by their diag(H) sum (issue 12)
    "group-order": dict(solve_order="groups"),
}


def summary(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "min": min(xs), "max": max(xs), "runs": xs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a built-in model name (default: SmolLM2-135M; gemma3-270m) "
                    "or a model folder")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=1, help="calibration draws: seeds 0..N-1")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="start the draws here (seeds F..F+N-1), to add draws to an earlier run")
    ap.add_argument("--rows", default="4bit-g128,4bit-g64,3bit-g64")
    ap.add_argument("--variants", default="default")
    ap.add_argument("--extra", default="{}", help="JSON of settings added to every variant, e.g. '{\"damp_percent\": 0.1}'")
    ap.add_argument("--no-rtn", action="store_true", help="skip RTN (no gap figures)")
    ap.add_argument("--markdown", default=None, help="also write the table to this file")
    a = ap.parse_args()
    for r in a.rows.split(","):
        if r not in ROWS:
            ap.error(f"unknown row {r!r}; choose from {sorted(ROWS)}")
    for v in a.variants.split(","):
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; choose from {sorted(VARIANTS)}")

    import torch
    from transformers import AutoModelForCausalLM

    import gptqkit
    from gptqkit.api import load_tokenizer, resolve_model
    from gptqkit.eval.perplexity import perplexity

    path = resolve_model(a.model)
    tok = load_tokenizer(path)
    ev = dict(seqlen=512, max_windows=a.windows, progress=False)

    def ppl(model) -> float:
        return perplexity(model, tok, "shakespeare-eval", **ev)["perplexity"]

    fp = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    result = {"model": str(path), "nsamples": a.nsamples, "seqlen": a.seqlen, "eval_windows": a.windows,
              "seeds": a.seeds, "first_seed": a.first_seed, "threads": torch.get_num_threads(), "extra": json.loads(a.extra),
              "commit": _commit(), "fp_ppl": ppl(fp), "rows": []}
    del fp
    print(f"FP perplexity {result['fp_ppl']:.3f}", file=sys.stderr, flush=True)
    extra = json.loads(a.extra)
    tmp = tempfile.mkdtemp(prefix="gptqkit-quality-")

    def run(name: str, cfg, seed: int) -> tuple[float, float]:
        out = f"{tmp}/{name}"
        t0 = time.perf_counter()
        gptqkit.quantize(path, "shakespeare", out, cfg, nsamples=a.nsamples, seqlen=a.seqlen, seed=seed,
                         progress=False)
        seconds = time.perf_counter() - t0
        value = ppl(gptqkit.load(out))
        shutil.rmtree(out)
        return value, seconds

    try:
        for rname in a.rows.split(","):
            row: dict = {"row": rname, **ROWS[rname], "variants": {}}
            if not a.no_rtn:
                row["rtn_ppl"], row["rtn_seconds"] = run(f"{rname}-rtn", gptqkit.QuantizeConfig(
                    method="rtn", mse=False, **ROWS[rname]), 0)
            for vname in a.variants.split(","):
                cfg = gptqkit.QuantizeConfig(**ROWS[rname], **{**VARIANTS[vname], **extra})
                ppls, secs = [], []
                for seed in range(a.first_seed, a.first_seed + a.seeds):
                    v, s = run(f"{rname}-{vname}-{seed}", cfg, seed)
                    ppls.append(v)
                    secs.append(s)
                    print(json.dumps({"row": rname, "variant": vname, "seed": seed, "ppl": v, "seconds": round(s, 1)}),
                          file=sys.stderr, flush=True)
                cell = {"ppl": summary(ppls), "seconds": summary(secs)}
                if "rtn_ppl" in row and row["rtn_ppl"] > result["fp_ppl"]:
                    gap = row["rtn_ppl"] - result["fp_ppl"]
                    cell["gap_closed"] = summary([(row["rtn_ppl"] - x) / gap for x in ppls])
                row["variants"][vname] = cell
            result["rows"].append(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result, indent=2))
    md = markdown(result)
    print(md, file=sys.stderr)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(md)


def markdown(result: dict) -> str:
    lines = [f"FP perplexity {result['fp_ppl']:.3f}; {result['seeds']} calibration draws "
             f"({result['nsamples']} x {result['seqlen']} tokens), {result['eval_windows']} windows of 512.", "",
             "| row | RTN | variant | ppl mean (min-max) | gap closed mean (min-max) | quantize s (mean) |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        rtn = f"{row['rtn_ppl']:.2f}" if "rtn_ppl" in row else "-"
        for vname, cell in row["variants"].items():
            p = cell["ppl"]
            g = cell.get("gap_closed")
            gs = f"{100 * g['mean']:.1f} % ({100 * g['min']:.1f}-{100 * g['max']:.1f})" if g else "-"
            lines.append(f"| {row['row']} | {rtn} | {vname} | {p['mean']:.2f} ({p['min']:.2f}-{p['max']:.2f}) | {gs} "
                         f"| {cell['seconds']['mean']:.0f} |")
    return "\n".join(lines) + "\n"


def _commit() -> str:
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:  # noqa: BLE001  (outside a checkout)
        return "unknown"


if __name__ == "__main__":
    main()
