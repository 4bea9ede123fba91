"""Per-call cost of the CPU backend's two call paths at decode (M = 1): the torch custom op
(`torch.ops.gptqkit.cpu_linear`, the default) against the ctypes fallback, on the 210 linears of
SmolLM2-135M (30 blocks of q/k/v/o/gate/up/down; random 4-bit g128 codes, same codes for both).

    python benchmarks/cpu_op.py [--threads 2] [--reps 30] [--dtype fp32|bf16]

Each repetition calls every layer once with an M = 1 input, in model order, through the layer's
nn.Module call (what a decode step pays), for each path in turn; prints JSON with the median ms
per full pass, µs per layer call, and the kernel ISA. Bare kernel time is not separated out: the
difference between the paths is the per-call overhead the op removes.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernels"))
    from conftest import build_layer
    from gptqkit.kernels import cpu
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    H, I, KV = 576, 1536, 192
    block = [(H, H), (H, KV), (H, KV), (H, H), (H, I), (H, I), (I, H)]  # q k v o gate up down
    paths = {"op": [], "ctypes": []}
    for b in range(30):
        for i, (K, N) in enumerate(block):
            base = build_layer(K, N, 4, 128, seed=b * 7 + i)
            base.compute_dtype = dtype
            for name in paths:
                layer = copy.deepcopy(base)
                cpu.CpuBackend.use_op = name == "op"
                layer.post_init("cpu")
                assert layer.layout.use_op == (name == "op"), cpu.op_error()
                paths[name].append(layer)
    cpu.CpuBackend.use_op = True
    xs = {K: torch.randn(1, 1, K).to(dtype) for K in (H, I)}
    times = {name: [] for name in paths}
    with torch.inference_mode():
        for name, layers in paths.items():  # warm-up, and the two paths agree bit for bit
            ys = [l(xs[l.in_features]) for l in layers]
            times[name + "_out"] = ys
        assert all(torch.equal(p, q) for p, q in zip(times.pop("op_out"), times.pop("ctypes_out")))
        for _ in range(a.reps):
            for name, layers in paths.items():
                t = time.perf_counter()
                for l in layers:
                    l(xs[l.in_features])
                times[name].append(time.perf_counter() - t)
    med = {n: statistics.median(v) * 1e3 for n, v in times.items()}
    print(json.dumps({"threads": torch.get_num_threads(), "dtype": a.dtype, "kernel_isa": cpu.isa(),
                      "layers": len(paths["op"]), "op_ms_per_pass": round(med["op"], 3),
                      "ctypes_ms_per_pass": round(med["ctypes"], 3),
                      "op_us_per_call": round(med["op"] * 1e3 / len(paths["op"]), 2),
                      "ctypes_us_per_call": round(med["ctypes"] * 1e3 / len(paths["op"]), 2),
                      "ctypes_over_op": round(med["ctypes"] / med["op"], 2)}))


if __name__ == "__main__":
    main()
