"""The clip search of find_params (mse=True): the torch loop vs the C++ kernel (kernels/cpu.py::
clip_search), on the group shapes of SmolLM2-135M (rows 576 / 192 / 1536 outputs, g = 128,
weighted as the GPTQ solve calls it, 4-bit asymmetric by default).

    python benchmarks/clip_search.py                       # threads 1 and 2, weighted search
    python benchmarks/clip_search.py --norm --reps 5       # also the unweighted |e|^2.4 search

Each cell is the median over `--reps` rounds in which the two are timed one after the other
(interleaved, so load from other jobs hits them alike), each over about `--budget` seconds of
calls. "block_ms" adds one SmolLM2 block's calls (q, o: 576 rows; k, v: 192; gate, up: 1536;
5 groups each (the 5th, 64 wide, timed as 128), down: 576 rows x 12 groups). Also counts the rows
where the two pick different grids (near-ties only; the tests bound it). Prints one JSON document.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from gptqkit.kernels import cpu
from gptqkit.quant import grid

BLOCK_CALLS = {576: 2 * 5 + 12, 192: 2 * 5, 1536: 2 * 5}  # find_params calls per block, by rows


def per_call_ms(fn, budget_s: float) -> float:
    fn()
    t = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t, 1e-6)
    n = max(1, min(500, int(budget_s / one)))
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e3


def run(w, kw, kernel: bool):
    grid.CPU_KERNEL = kernel
    try:
        return grid.find_params(w, **kw)
    finally:
        grid.CPU_KERNEL = True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="576,192,1536")
    ap.add_argument("--g", type=int, default=128)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--sym", action="store_true", help="symmetric grid (default asymmetric)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--budget", type=float, default=0.3, help="seconds of calls per timing")
    ap.add_argument("--norm", action="store_true", help="also time the unweighted |e|^2.4 search")
    a = ap.parse_args()
    assert cpu.get_lib() is not None, cpu.lib_error()
    gen = torch.Generator().manual_seed(0)
    modes = ["weighted"] + (["norm"] if a.norm else [])
    out = {"isa": cpu.isa(), "torch": torch.__version__, "g": a.g, "bits": a.bits, "sym": a.sym,
           "loadavg_before": os.getloadavg(), "results": []}
    for nt in [int(t) for t in a.threads.split(",")]:
        torch.set_num_threads(nt)
        for mode in modes:
            block = {"torch": 0.0, "kernel": 0.0}
            for rows in [int(r) for r in a.rows.split(",")]:
                w = torch.randn(rows, a.g, generator=gen)
                # weights like the solve's 1/U_kk² (positive, a few orders of magnitude apart)
                weight = torch.exp(torch.randn(a.g, generator=gen) * 1.5) if mode == "weighted" else None
                kw = dict(bits=a.bits, sym=a.sym, mse=True, weight=weight)
                t0, t1 = [], []
                for _ in range(a.reps):
                    t0.append(per_call_ms(lambda: run(w, kw, False), a.budget))
                    t1.append(per_call_ms(lambda: run(w, kw, True), a.budget))
                (s0, z0), (s1, z1) = run(w, kw, False), run(w, kw, True)
                m0, m1 = statistics.median(t0), statistics.median(t1)
                out["results"].append({"threads": nt, "mode": mode, "rows": rows, "torch_ms": round(m0, 3),
                                       "kernel_ms": round(m1, 3), "speedup": round(m0 / m1, 1),
                                       "rows_differing": int(((s0 != s1) | (z0 != z1)).sum())})
                block["torch"] += BLOCK_CALLS.get(rows, 0) * m0
                block["kernel"] += BLOCK_CALLS.get(rows, 0) * m1
            if set(BLOCK_CALLS) <= {int(r) for r in a.rows.split(",")}:
                out["results"].append({"threads": nt, "mode": mode, "block_ms_torch": round(block["torch"], 1),
                                       "block_ms_kernel": round(block["kernel"], 1),
                                       "speedup": round(block["torch"] / block["kernel"], 1)})
    out["loadavg_after"] = os.getloadavg()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
