"""The README main job's evaluation phase alone ("before" then "after"), as `gptqkit quantize` runs
it after quantizing, in a fresh process per run, alternating two source trees.

    python benchmarks/main_job_eval.py --q4 /tmp/e2e-smol-4bit --src main=/work/main/src --src new=src --rounds 3

Each run: tokenizer load, then "before" = fp32 model load (transformers, safetensors) + perplexity
on shakespeare-eval (16 windows of 512, 4 per forward), then "after" = gptqkit.load(q4) + the same
perplexity, timed like cmd_quantize times them. With a tree that has `eval_ids` (this branch) the
text is tokenized once inside "before" and reused, as cmd_quantize now does; otherwise each pass
tokenizes it (as before this branch). JSON lines to stdout, one per run, with after / before.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r'''
import json, sys, time, torch
from gptqkit.api import load, load_tokenizer, resolve_model
from gptqkit.cli import _load_float
from gptqkit.models.source import resolve_model_path
import gptqkit.eval.perplexity
P = sys.modules["gptqkit.eval.perplexity"]
mp = resolve_model_path(resolve_model(None))
tok = load_tokenizer(mp)
src = "shakespeare-eval"
sec = {}
for key, loader in (("before", lambda: _load_float(mp)), ("after", lambda: load(sys.argv[1]))):
    t0 = time.perf_counter()
    if key == "before" and hasattr(P, "eval_ids"):
        src = P.eval_ids(tok, src)
    t1 = time.perf_counter()
    m = loader()
    t2 = time.perf_counter()
    r = P.perplexity(m, tok, src, seqlen=512, max_windows=16, progress=False)
    del m
    sec[key] = time.perf_counter() - t0
    sec[key + "_load"] = t2 - t1
    sec[key + "_ppl"] = r["perplexity"]
print(json.dumps(sec))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--q4", required=True)
    ap.add_argument("--src", action="append", required=True, help="name=path of a gptqkit src tree")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    srcs = [s.split("=", 1) for s in a.src]
    for r in range(a.rounds):
        for name, path in (srcs if r % 2 == 0 else srcs[::-1]):
            env = {**os.environ, "PYTHONPATH": os.path.abspath(path)}
            with open("/proc/loadavg") as f:
                load_before = float(f.read().split()[0])
            out = subprocess.run([sys.executable, "-c", CHILD, a.q4], env=env, capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr)
            rec = {"round": r, "src": name, "loadavg": load_before, **json.loads(out.stdout.strip().splitlines()[-1])}
            rec["after_over_before"] = rec["after"] / rec["before"]
            print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
