"""RSS after `gptqkit.load` of a GPTQ checkpoint, each load in a fresh subprocess; optionally for
several source trees side by side (before/after a change), rounds interleaved.

    python benchmarks/load_rss.py --q4 /tmp/smol-4bit                       # this tree
    python benchmarks/load_rss.py --q4 /tmp/smol-4bit --src before=/old/src --src after=src

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
    a = ap.parse_args()
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    srcs = dict(s.split("=", 1) for s in a.src) or {"this": here}
    runs: dict = {}
    for _ in range(a.rounds):
        for name, src in srcs.items():
            for dt in a.dtypes.split(","):
                env = dict(os.environ, PYTHONPATH=os.path.abspath(src), OMP_NUM_THREADS="1")
                r = subprocess.run([sys.executable, "-c", WORKER, a.q4, dt], env=env, capture_output=True,
                                   text=True, check=True)
                runs.setdefault((name, dt), []).append(json.loads(r.stdout.strip().splitlines()[-1]))
    out = []
    for (name, dt), rs in runs.items():
        row = {"src": name, "dtype": dt, "rounds": len(rs)}
        for k in rs[0]:
            row[k] = round(statistics.median(r[k] for r in rs), 1)
        out.append(row)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
