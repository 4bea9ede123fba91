"""A/B of two (or more) builds of the CPU kernel source in one process, interleaved, vs dense fp32.

Each source is compiled with `g++ -O3 -march=<march> -fopenmp` into a temporary library and its
`gk_gemv` (the fused kernel, FMA layout) is called through ctypes on the same prepared layout,
so the builds differ only in the kernel code. 1 thread, thread CPU time (robust on a shared
machine), median of --reps rounds; each round times every build and the dense matmul in turn.

    git show 995fe67:src/gptqkit/kernels/csrc/cpu_kernels.cpp > /tmp/old_kernels.cpp
    OMP_NUM_THREADS=1 python benchmarks/cpu_kernel_ab.py --march x86-64-v3 \\
        old=/tmp/old_kernels.cpp new=src/gptqkit/kernels/csrc/cpu_kernels.cpp

Prints one JSON line per (shape, M): ms per call for each build and dense, each build's speed
relative to dense (above 1: faster), and its largest difference from the first build's output
(relative to the output's largest magnitude).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from kernel_speed import make_layer  # noqa: E402

from gptqkit.kernels import cpu  # noqa: E402


def build(src: str, march: str, out_dir: str, name: str) -> ctypes.CDLL:
    out = os.path.join(out_dir, f"{name}.so")
    subprocess.run(["g++", "-O3", f"-march={march}", "-fopenmp", "-std=c++17", "-shared", "-fPIC", "-w",
                    "-o", out, src], check=True)
    lib = ctypes.CDLL(out)
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.gk_gemv.argtypes = [p, p, p, p, i, i, i, i, p, i, p, i, i]
    return lib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("builds", nargs="+", help="name=path/to/cpu_kernels.cpp")
    ap.add_argument("--march", default="native")
    ap.add_argument("--shapes", default="576x576,576x192,576x1536,1536x576,2048x2048")
    ap.add_argument("--m", default="1,4,64")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        libs = {}
        for spec in a.builds:
            name, src = spec.split("=", 1)
            libs[name] = build(src, a.march, tmp, name)
        print(json.dumps({"march": a.march, "isa": {n: l.gk_isa() for n, l in libs.items()}}), flush=True)
        cpu.CpuBackend.use_op, cpu.CpuBackend.use_dp = False, "0"  # the FMA layout, whatever the CPU
        g = torch.Generator().manual_seed(0)
        for shape in a.shapes.split(","):
            K, N = map(int, shape.split("x"))
            L = cpu.CpuBackend().prepare(make_layer(K, N, 4, 128, g))
            G = L.seg.numel() - 1
            w = torch.randn(K, N)
            for M in map(int, a.m.split(",")):
                x = torch.randn(M, K)
                ys = {n: torch.empty(M, N) for n in libs}

                def call(n):
                    return lambda: libs[n].gk_gemv(L.w.data_ptr(), L.s.data_ptr(), L.sz.data_ptr(),
                                                   L.seg.data_ptr(), L.bits, K, G, L.nblk, x.data_ptr(), M,
                                                   ys[n].data_ptr(), N, 1)
                fns = {n: call(n) for n in libs}
                fns["dense"] = lambda: x @ w
                n_it = max(3, int(2e7 / (M * K * N)))
                t = {n: [] for n in fns}
                for _ in range(a.reps):
                    for n, fn in fns.items():
                        fn()
                        t0 = time.thread_time()
                        for _ in range(n_it):
                            fn()
                        t[n].append((time.thread_time() - t0) / n_it * 1e3)
                med = {n: round(statistics.median(v), 4) for n, v in t.items()}
                first = ys[next(iter(libs))]
                print(json.dumps(dict(K=K, N=N, M=M, ms=med,
                                      vs_dense={n: round(med["dense"] / med[n], 2) for n in libs},
                                      max_rel_diff={n: float((ys[n] - first).abs().max() / first.abs().max())
                                                    for n in libs})), flush=True)


if __name__ == "__main__":
    main()
