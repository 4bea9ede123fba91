"""The one-token output head alone: gk_sgemv_rows on the fp32 weight (FastHeadLinear) against the
exact-rows GEMVs on the same values held as bf16 (gk_bf16_gemv_rows) and as int8 rows
(gk_q8_gemv_rows), kernels/exact_rows.py. Prints one JSON line per thread count.

    python benchmarks/head_gemv.py                          # SmolLM2's head shape, 1 and 2 threads
    GPTQKIT_CPU_MARCH=x86-64-v3 python benchmarks/head_gemv.py   # the AVX2 build

The weights are made exact in both forms by construction (bf16 values for the bf16 form, int8 x
fp16-scale products for the int8 one), so each form is checked bit-equal to the fp32 GEMV on its
values; timings are the median of --reps calls, the three kernels interleaved.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=49152)
    ap.add_argument("--cols", type=int, default=576)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=50)
    a = ap.parse_args()
    from gptqkit.kernels import cpu
    from gptqkit.kernels.exact_rows import Bf16Rows, Q8Rows, exact_q8
    lib = cpu.get_lib()
    if lib is None:
        raise SystemExit(f"no CPU kernel library: {cpu.lib_error()}")
    g = torch.Generator().manual_seed(0)
    N, K = a.rows, a.cols
    wb = (torch.randn(N, K, generator=g) * 0.05).bfloat16().float()
    q = torch.randint(-127, 128, (N, K // 32, 32), generator=g).float()
    q[..., 0] = 127
    wq = (q * (torch.rand(N, K // 32, 1, generator=g) * 1e-3 + 1e-5).half().float()).reshape(N, K)
    forms = {"bf16": (wb, Bf16Rows(wb.bfloat16())), "int8": (wq, Q8Rows(*exact_q8(wq)))}
    x = torch.randn(K, generator=g)
    for nt in (int(t) for t in a.threads.split(",")):
        torch.set_num_threads(nt)
        out = {"kernel_isa": cpu.isa(), "threads": nt, "N": N, "K": K}
        for name, (w, rows) in forms.items():
            y32, yr = torch.empty(N), torch.empty(N)
            f32 = lambda: lib.gk_sgemv_rows(w.data_ptr(), x.data_ptr(), y32.data_ptr(), N, K, K, nt)
            fr = lambda: rows._gemv(lib, x, yr, nt)
            f32(), fr()
            assert torch.equal(y32, yr), name
            ts = {"fp32": [], name: []}
            for _ in range(a.reps):
                for k, f in (("fp32", f32), (name, fr)):
                    t = time.perf_counter()
                    f()
                    ts[k].append(time.perf_counter() - t)
            out[f"{name}_ms"] = round(1e3 * statistics.median(ts[name]), 3)
            out[f"fp32_ms_beside_{name}"] = round(1e3 * statistics.median(ts["fp32"]), 3)
            out[f"{name}_vs_fp32"] = round(statistics.median(ts["fp32"]) / statistics.median(ts[name]), 3)
            out[f"{name}_bytes_mb"] = round(rows.nbytes() / 1e6, 1)
        out["fp32_bytes_mb"] = round(N * K * 4 / 1e6, 1)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
