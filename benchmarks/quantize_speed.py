"""Quantization wall time and peak RSS of the default run, set against its FLOP floor. Prints JSON.

    python benchmarks/quantize_speed.py --nsamples 64 --seqlen 512

The floor (docs/ARCHITECTURE.md, the minimum work of a run): one forward per block over all calibration
tokens (every linear: 2·T·K·N; attention: 2·2·L²·d per head and sequence, the full square as
SDPA computes it) plus one Hessian per distinct linear input (2·T·K², the full product; `*_symmetric` counts only
its upper triangle, T·K·(K+1), the stricter floor), divided by the fp32
matmul rate measured here, in this process, on shapes of this model. The GPTQ solves
themselves (Cholesky + column loop, independent of T) are reported separately.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time


def matmul_rate(T: int, K: int, N: int, reps: int = 5) -> float:
    """Best-of fp32 GFLOP/s for [T, K] @ [K, N] and for XᵀX with X [T, K]."""
    import torch
    x = torch.randn(T, K)
    w = torch.randn(K, N)
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        x @ w
        t1 = time.perf_counter()
        x.T @ x
        t2 = time.perf_counter()
        best = max(best, 2 * T * K * N / (t1 - t0) / 1e9, 2 * T * K * K / (t2 - t1) / 1e9)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--desc-act", action=argparse.BooleanOptionalAction, default=None,
                    help="default: gptqkit's default (act-order with static groups)")
    a = ap.parse_args()

    import torch
    from transformers import AutoConfig

    import gptqkit
    from gptqkit.api import resolve_model

    path = resolve_model(None)
    c = AutoConfig.from_pretrained(path)
    T = a.nsamples * a.seqlen
    H, I, L = c.hidden_size, c.intermediate_size, a.seqlen
    hd = getattr(c, "head_dim", H // c.num_attention_heads)
    kv = c.num_key_value_heads * hd
    linears = [(H, H), (H, kv), (H, kv), (H, H), (H, I), (H, I), (I, H)]  # (K, N): q k v o gate up down
    lin_flops = sum(2 * T * K * N for K, N in linears)
    attn_flops = a.nsamples * c.num_attention_heads * 2 * 2 * L * L * hd
    hess_flops = sum(2 * T * K * K for K in (H, H, H, I))  # distinct inputs: qkv, o, gate/up, down
    # XᵀX is symmetric: its minimum is the upper triangle, T·K·(K+1) (gptqkit computes 9/16 of the
    # full product in 8 panels). The floor keeps the full product (the definition);
    # floor_seconds_symmetric counts the triangle only, a stricter floor.
    hess_sym_flops = sum(T * K * (K + 1) for K in (H, H, H, I))
    per_block = lin_flops + attn_flops + hess_flops
    total = per_block * c.num_hidden_layers
    total_sym = (lin_flops + attn_flops + hess_sym_flops) * c.num_hidden_layers

    rate = matmul_rate(min(T, 8192), H, I)
    tmp = tempfile.mkdtemp(prefix="gptqkit-speed-")
    try:
        cfg = gptqkit.QuantizeConfig(bits=a.bits, group_size=a.group_size,
                                     **({} if a.desc_act is None else {"desc_act": a.desc_act}))
        t0 = time.perf_counter()
        rep = gptqkit.quantize(path, "shakespeare", f"{tmp}/out", cfg, nsamples=a.nsamples, seqlen=a.seqlen,
                               progress=False)
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rate_after = matmul_rate(min(T, 8192), H, I)
    floor = total / (max(rate, rate_after) * 1e9)
    floor_sym = total_sym / (max(rate, rate_after) * 1e9)
    print(json.dumps({
        "model": str(path), "nsamples": a.nsamples, "seqlen": a.seqlen, "bits": a.bits,
        "group_size": a.group_size, "desc_act": cfg.desc_act, "static_groups": cfg.static_groups,
        "threads": torch.get_num_threads(),
        "wall_seconds": round(wall, 2),
        "block_forwards": rep.forwards, "blocks": c.num_hidden_layers,
        "gflop": {"linears": round(lin_flops * c.num_hidden_layers / 1e9, 1),
                  "attention": round(attn_flops * c.num_hidden_layers / 1e9, 1),
                  "hessians": round(hess_flops * c.num_hidden_layers / 1e9, 1),
                  "total": round(total / 1e9, 1)},
        "matmul_gflops_before_after": [round(rate, 1), round(rate_after, 1)],
        "floor_seconds": round(floor, 2),
        "wall_over_floor": round(wall / floor, 2),
        "floor_seconds_symmetric": round(floor_sym, 2),
        "wall_over_floor_symmetric": round(wall / floor_sym, 2),
        "solve_and_hessian_seconds_sum": round(sum(l.seconds for l in rep.layers), 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "model_file_mb": round(sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
