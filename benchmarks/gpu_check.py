"""CUDA check of the triton backend: correctness against the torch backend, then timings
against fp16 cuBLAS. Prints JSON to stdout.

    python benchmarks/gpu_check.py            # needs a CUDA GPU and triton

1. Correctness: every bit width (2/3/4/8), sym/asym, act-order on/off, v1/v2 checkpoints, odd N,
   ragged groups, M in {1, 7, 16, 17, 100}, fp16 and bf16 inputs: relative error vs the torch
   backend (which dequantizes and runs the same matmul in the input dtype) must be < 5e-3.
2. Timing: 8192x8192, 4-bit, group 128, M in {1, 16, 64, 256}: triton backend vs fp16 cuBLAS
   (x @ W.T with a dense fp16 W), CUDA-event timing, median of 50 runs after warm-up; plus the
   HBM floor (packed bytes / measured copy bandwidth).
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "kernels"))
from conftest import build_layer, reference_pair, rel_err  # noqa: E402

from gptqkit.formats.packing import pack_qweight, pack_qzeros  # noqa: E402
from gptqkit.kernels.qlinear import QuantLinear  # noqa: E402


def cuda_ms(fn, iters: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def correctness() -> list[dict]:
    out = []
    for bits in (2, 3, 4, 8):
        for sym in (True, False):
            for act in (False, True):
                for fmt in ("gptq", "gptq_v2"):
                    for K, N, g in ((96, 77, 64), (512, 333, 128), (4096, 1024, 128), (1536, 576, -1)):
                        layer = build_layer(K, N, bits, g, sym=sym, fmt=fmt, act_order=act, bias=True)
                        layer, ref = reference_pair(layer.cuda(), "triton")
                        for M in (1, 7, 16, 17, 100):
                            for dt in (torch.float16, torch.bfloat16):
                                x = torch.randn(M, K, device="cuda").to(dt)
                                exact = x.double() @ ref.weight.double().T + ref.bias.double()
                                err = rel_err(layer(x), exact)
                                err_ref = rel_err(ref(x), exact)
                                ok = err < 5e-3 or err < 2 * err_ref
                                out.append({"bits": bits, "sym": sym, "act_order": act, "fmt": fmt, "K": K,
                                            "N": N, "M": M, "dtype": str(dt), "rel_err": err,
                                            "torch_backend_rel_err": err_ref, "ok": ok})
    return out


def timings() -> list[dict]:
    K = N = 8192
    bits, g = 4, 128
    q = torch.randint(0, 16, (K, N), dtype=torch.int32)
    layer = QuantLinear(K, N, bits, g)
    layer.qweight.copy_(pack_qweight(q, bits))
    layer.qzeros.copy_(pack_qzeros(torch.full((K // g, N), 8), bits, "gptq"))
    layer.scales.copy_((torch.rand(K // g, N) * 0.01).half())
    layer = layer.cuda()
    layer.post_init("triton")
    W = torch.randn(N, K, device="cuda", dtype=torch.float16)
    buf = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(buf)
    copy_ms = cuda_ms(lambda: dst.copy_(buf), 20)
    bw = 2 * buf.numel() / copy_ms / 1e6  # GB/s, read + write
    del buf, dst
    rows = []
    for M in (1, 16, 64, 256):
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        t_tr = cuda_ms(lambda: layer(x))
        t_cb = cuda_ms(lambda: x @ W.T)
        floor = (K * N * bits / 8 + 2 * 4 * (K // g) * N) / bw / 1e6
        rows.append({"K": K, "N": N, "bits": bits, "group": g, "M": M, "triton_ms": t_tr,
                     "cublas_fp16_ms": t_cb, "speedup_vs_cublas": t_cb / t_tr, "hbm_floor_ms": floor,
                     "copy_bandwidth_GBps": bw})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("gpu_check.py needs a CUDA GPU")
    corr = correctness()
    bad = [r for r in corr if not r["ok"]]
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "correctness": {"cases": len(corr), "failed": bad[:20], "max_rel_err": max(r["rel_err"] for r in corr)},
           "timings": timings()}
    print(json.dumps(res, indent=1))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
