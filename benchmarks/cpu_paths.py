"""CPU backend: the fused dequantize-GEMV kernel vs dequantize + BLAS vs dense fp32, per M.

This is what the backend's per-build M threshold (`CpuBackend.gemm_min_m`) is chosen from.
Run it for the AVX-512 build and the AVX2+FMA build (and the portable build) on one machine:

    OMP_NUM_THREADS=1 python benchmarks/cpu_paths.py --threads 1 --clock thread
    OMP_NUM_THREADS=1 GPTQKIT_CPU_MARCH=x86-64-v3 python benchmarks/cpu_paths.py --threads 1 --clock thread
    GPTQKIT_CPU_MARCH=x86-64 python benchmarks/cpu_paths.py --m 1,2,64

Each cell is the median of `--reps` rounds in which the three are timed one after the other
(interleaved, so load from other jobs hits them alike). By default one copy of each layer is
called again and again, so small layers run from a warm cache (dense fp32 576x192 fits in L2);
`--cold-mb 256` rotates over copies instead, as a model's forward streams its weights. 4-bit g128, fp32 activations, an fp32
model (`--model-dtype bfloat16` gives bf16/fp16 models' layout: the AVX-512 BF16 dot-product
kernel where the CPU has it, fed the same fp32 x). `--clock thread` counts the calling thread's
CPU time (time.thread_time), robust on a shared machine but only meaningful with 1 thread.
Prints one JSON document (milliseconds per call); progress and the build that ran go to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from kernel_speed import make_layer  # noqa: E402

from gptqkit.kernels import cpu  # noqa: E402


def prepared(layer, gemm_min_m: int):
    """The layer's layout with the given BLAS threshold (read at prepare time, into the op's args)."""
    saved = cpu.CpuBackend.gemm_min_m
    cpu.CpuBackend.gemm_min_m = gemm_min_m
    try:
        be = cpu.CpuBackend()
        return be, be.prepare(layer)
    finally:
        cpu.CpuBackend.gemm_min_m = saved


def per_call_ms(fn, clock, budget_s: float) -> float:
    """Mean ms of fn() over enough calls to fill about budget_s (after one warm-up call)."""
    fn()
    t = clock()
    fn()
    one = max(clock() - t, 1e-6)
    n = max(1, min(1000, int(budget_s / one)))
    t = clock()
    for _ in range(n):
        fn()
    return (clock() - t) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="576x576,576x192,576x1536,1536x576,2048x2048")
    ap.add_argument("--m", default="1,2,4,8,16,32,64,128,512")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--clock", choices=("wall", "thread"), default="wall")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--budget", type=float, default=0.03, help="seconds per timing of one path")
    ap.add_argument("--model-dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--cold-mb", type=float, default=0,
                    help="rotate over enough copies of each layer (and of the dense weight) that the "
                         "dense copies hold this many MB, so weights come from memory as in a real "
                         "model's forward, not from a cache warmed by the previous call")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    clock = time.thread_time if a.clock == "thread" else time.perf_counter
    g = torch.Generator().manual_seed(0)
    doc = {"command": " ".join(["python"] + sys.argv), "kernel_isa": cpu.isa(),
           "march": os.environ.get("GPTQKIT_CPU_MARCH", "native"), "threads": torch.get_num_threads(),
           "clock": a.clock, "model_dtype": a.model_dtype, "torch": torch.__version__,
           "loadavg_start": os.getloadavg(), "rows": []}
    for shape in a.shapes.split(","):
        K, N = map(int, shape.split("x"))
        ncopy = max(1, -(-int(a.cold_mb * 2**20) // (K * N * 4)))
        copies = []
        for _ in range(ncopy):
            layer = make_layer(K, N, 4, 128, g)
            layer.compute_dtype = getattr(torch, a.model_dtype)  # picks the kernel an fp32 / bf16 model gets
            be_f, lay_f = prepared(layer, 1 << 62)  # fused kernel at every M
            be_b, lay_b = prepared(layer, 1)        # dequantize + BLAS at every M
            copies.append((layer, lay_f, lay_b, torch.randn(K, N)))
        if "kernel" not in doc:
            doc["kernel"] = "bf16 dot-product" if lay_f.dp else "fma"
            doc["via"] = "torch op" if lay_f.use_op else "ctypes"
            doc["default_gemm_min_m"] = cpu._default_gemm_min_m()
            print(f"kernel build: {doc['kernel_isa']} (-march={doc['march']}), {doc['kernel']} kernel via "
                  f"{doc['via']}, {doc['threads']} thread(s), default BLAS from M = {doc['default_gemm_min_m']}",
                  file=sys.stderr, flush=True)
        for M in map(int, a.m.split(",")):
            x = torch.randn(M, K)
            t = {"fused": [], "blas": [], "dense": []}
            it = iter(range(1 << 62))  # the next copy at each call

            def fused():
                c = copies[next(it) % ncopy]
                return be_f.forward(c[0], c[1], x)

            def blas():
                c = copies[next(it) % ncopy]
                return be_b.forward(c[0], c[2], x)

            def dense():
                return x @ copies[next(it) % ncopy][3]

            for _ in range(a.reps):
                t["fused"].append(per_call_ms(fused, clock, a.budget))
                t["blas"].append(per_call_ms(blas, clock, a.budget))
                t["dense"].append(per_call_ms(dense, clock, a.budget))
            fused, blas, dense = (statistics.median(t[k]) for k in ("fused", "blas", "dense"))
            row = dict(K=K, N=N, M=M, copies=ncopy, fused_ms=round(fused, 4), blas_ms=round(blas, 4), dense_ms=round(dense, 4),
                       fused_vs_dense=round(dense / fused, 3), blas_vs_dense=round(dense / blas, 3),
                       best_vs_dense=round(dense / min(fused, blas), 3))
            print(row, file=sys.stderr, flush=True)
            doc["rows"].append(row)
    doc["loadavg_end"] = os.getloadavg()
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
