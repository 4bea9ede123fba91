"""The int8-activation GEMM (gk_gemm_i8) against the exact FMA kernel (gk_gemv) and torch.mm on
the dequantized fp32 weight, side by side per shape, at prefill sizes. Prints JSON lines.

    python benchmarks/cpu_i8_kernel.py --threads 1
    GPTQKIT_CPU_MARCH=x86-64-v3 python benchmarks/cpu_i8_kernel.py --threads 1   # the AVX2 build

Random 4-bit codes, group size 128, SmolLM2-135M's layer shapes (K x N) at M = 512 and fewer rows;
each timing is the best of --reps calls after one warm-up, the three kernels interleaved per
shape. `kernel_isa` says which build ran ("avx512": VPDPBUSD where the CPU has AVX512-VNNI;
"avx2": VPMADDUBSW + VPMADDWD).
"""
from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--block", type=int, default=32, help="input features per int8 scale (0: per group)")
    ap.add_argument("--group-size", type=int, default=128, help="-1: one group of all K rows")
    ap.add_argument("--shapes", default="512x576x576,512x576x192,512x576x1536,512x1536x576,64x576x1536,16x576x1536",
                    help="MxKxN,...")
    a = ap.parse_args()
    import torch

    from gptqkit.kernels import cpu
    torch.set_num_threads(a.threads)
    lib = cpu.get_lib()
    if lib is None or not cpu.i8_available():
        raise SystemExit(f"no int8-activation kernel in this build (isa {cpu.isa()}; {cpu.lib_error()})")
    gen = torch.Generator().manual_seed(0)

    def best(f):
        f()
        ts = []
        for _ in range(a.reps):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        return min(ts)

    for spec in a.shapes.split(","):
        M, K, N = (int(v) for v in spec.split("x"))
        gs = K if a.group_size == -1 else a.group_size
        G = -(-K // gs)
        nblk = -(-N // cpu.BLOCK)
        q = torch.randint(0, 16, (K, N), dtype=torch.int32, generator=gen)
        s = torch.rand(G, N, generator=gen) * 0.02 + 1e-3
        z = torch.randint(0, 16, (G, N), generator=gen).float()
        gk = torch.arange(K) // gs
        seg = torch.searchsorted(gk.contiguous(), torch.arange(G + 1)).to(torch.int32)

        def blocks(t):
            pad = torch.zeros(G, nblk * cpu.BLOCK)
            pad[:, :N] = t
            return pad.reshape(G, nblk, cpu.BLOCK).permute(1, 0, 2).contiguous()

        w, S, SZ = cpu.repack(q, 4), blocks(s), blocks(s * z)
        Wd = ((q.float() - z[gk]) * s[gk]).contiguous()
        x = torch.randn(M, K, generator=gen)
        y = torch.empty(M, N)
        args = (w.data_ptr(), S.data_ptr(), SZ.data_ptr(), seg.data_ptr())
        t_i8 = best(lambda: lib.gk_gemm_i8(*args, K, G, nblk, x.data_ptr(), M, y.data_ptr(), N, a.block, a.threads))
        t_fma = best(lambda: lib.gk_gemv(*args, 4, K, G, nblk, x.data_ptr(), M, y.data_ptr(), N, a.threads))
        t_mm = best(lambda: torch.mm(x, Wd))
        print(json.dumps({"M": M, "K": K, "N": N, "block": a.block, "threads": a.threads, "kernel_isa": cpu.isa(),
                          "i8_ms": t_i8 * 1e3, "fma_ms": t_fma * 1e3, "mm_ms": t_mm * 1e3,
                          "i8_vs_mm": t_mm / t_i8, "i8_vs_fma": t_fma / t_i8, "fma_vs_mm": t_mm / t_fma,
                          "i8_gmac_s": M * K * N / t_i8 / 1e9}), flush=True)


if __name__ == "__main__":
    main()
