"""RSS after `gptqkit.load` of a GPTQ checkpoint, each load in a fresh subprocess; optionally for
several source trees side by side (before/after a change), rounds interleaved.

    python benchmarks/load_rss.py --q4 /tmp/smol-4bit                       # this tree
    python benchmarks/load_rss.py --q4 /tmp/smol-4bit --src before=/old/src --src after=src
    python benchmarks/load_rss.py --q4 /tmp/smol-4bit --dtypes fp32 --dense --exact-rows-ab

--dense adds the fp32 model itself (transformers' from_pretrained of --base, default the built-in
SmolLM2-135M), measured the same way; --exact-rows-ab loads each 4-bit variant with
GPTQKIT_EXACT_ROWS=0 and =1 (the embedding/head as fp32, or as exact int8 rows).

Per load: VmRSS right after gptqkit.load (it trims the heap), VmRSS after one 8-token forward
(the pages a first call touches), bytes still held in qweight buffers, and how many layers hold
their codes once (QuantLinear.codes_in_layout; 0 before that existed). Medians over --rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

WORKER = r"""
import json, sys, torch, gptqkit
def rss():
    for l in open("/proc/self/status"):
        if l.startswith("VmRSS"):
            return int(l.split()[1]) / 1024
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[sys.argv[2]]
base = rss()
if sys.argv[3] == "dense":
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=dtype)
else:
    m = gptqkit.load(sys.argv[1], dtype=dtype)
after_load = rss()
from gptqkit.kernels.qlinear import QuantLinear
ql = [q for q in m.modules() if isinstance(q, QuantLinear)]
with torch.inference_mode():
    m(torch.randint(0, 1000, (1, 8)))
print(json.dumps({"rss_import_mb": base, "rss_after_load_mb": after_load, "rss_after_forward_mb": rss(),
                  "qweight_buffer_mb": sum(b.numel() * b.element_size() for q in ql
                                           for n, b in q.named_buffers() if n == "qweight") / 2**20,
                  "layers": len(ql), "codes_held_once": sum(bool(getattr(q, "codes_in_layout", False)) for q in ql)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--q4", required=True)
    ap.add_argument("--src", action="append", default=[], help="NAME=path/to/src (default: this tree)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dense", action="store_true", help="also the fp32 model of --base")
    ap.add_argument("--base", default=None, help="the dense model folder for --dense (default: built-in)")
    ap.add_argument("--exact-rows-ab", action="store_true", help="each 4-bit variant with GPTQKIT_EXACT_ROWS=0 and 1")
    a = ap.parse_args()
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    srcs = dict(s.split("=", 1) for s in a.src) or {"this": here}
    runs: dict = {}
    jobs = [(name, src, dt, rows) for name, src in srcs.items() for dt in a.dtypes.split(",")
            for rows in (("0", "1") if a.exact_rows_ab else (None,))]
    if a.dense:
        if a.base is None:
            sys.path.insert(0, here)
            from gptqkit.models.default import default_model_dir
            a.base = str(default_model_dir())
        jobs.append(("dense", here, "fp32", None))
    for _ in range(a.rounds):
        for name, src, dt, rows in jobs:
            env = dict(os.environ, PYTHONPATH=os.path.abspath(src), OMP_NUM_THREADS="1")
            if rows is not None:
                env["GPTQKIT_EXACT_ROWS"] = rows
            target, kind = (a.base, "dense") if name == "dense" else (a.q4, "q4")
            r = subprocess.run([sys.executable, "-c", WORKER, target, dt, kind], env=env, capture_output=True,
                               text=True, check=True)
            runs.setdefault((name, dt, rows), []).append(json.loads(r.stdout.strip().splitlines()[-1]))
    out = []
    for (name, dt, rows), rs in runs.items():
        row = {"src": name, "dtype": dt, "rounds": len(rs), **({} if rows is None else {"exact_rows": rows})}
        for k in rs[0]:
            row[k] = round(statistics.median(r[k] for r in rs), 1)
        out.append(row)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
