"""CPU backend: the fused dequantize-GEMV kernel vs dequantize + BLAS vs dense fp32, per M.

This is what the backend's per-build M threshold (`CpuBackend.gemm_min_m`) is chosen from.
Run it for the AVX-512 build and the AVX2+FMA build side by side on one machine:

    python benchmarks/cpu_paths.py
    GPTQKIT_CPU_MARCH=x86-64-v3 python benchmarks/cpu_paths.py

Prints one JSON document (median milliseconds per call, 4-bit g128, fp32 activations).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from kernels import make_layer, timeit  # noqa: E402

from gptqkit.kernels import cpu  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="576x1536,1536x576,2048x2048")
    ap.add_argument("--m", default="1,4,16,32,64,128,512")
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    doc = {"command": " ".join(["python"] + sys.argv), "kernel_isa": cpu.isa(),
           "march": os.environ.get("GPTQKIT_CPU_MARCH", "native"), "threads": torch.get_num_threads(),
           "loadavg_start": os.getloadavg(), "rows": []}
    for shape in a.shapes.split(","):
        K, N = map(int, shape.split("x"))
        layer = make_layer(K, N, 4, 128, g)
        be = cpu.CpuBackend()
        lay = be.prepare(layer)
        w = torch.randn(K, N)
        for M in map(int, a.m.split(",")):
            x = torch.randn(M, K)
            lay.gemm_min_m = 1 << 62  # read from the layout at each call
            fused = timeit(lambda _: be.forward(layer, lay, x))
            lay.gemm_min_m = 1
            blas = timeit(lambda _: be.forward(layer, lay, x))
            dense = timeit(lambda _: x @ w)
            row = dict(K=K, N=N, M=M, fused_ms=round(fused, 4), blas_ms=round(blas, 4), dense_ms=round(dense, 4),
                       best_vs_dense=round(dense / min(fused, blas), 3))
            print(row, file=sys.stderr, flush=True)
            doc["rows"].append(row)
    doc["loadavg_end"] = os.getloadavg()
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
