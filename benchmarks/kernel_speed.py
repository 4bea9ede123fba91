"""Time the QuantLinear backends against dense matmuls, torch's int4 CPU kernel and the
memory-bandwidth floor. Prints one JSON document to stdout (progress goes to stderr).

    python benchmarks/kernel_speed.py --quick            # a couple of minutes on 2 cores
    python benchmarks/kernel_speed.py                    # every shape, 4 and 8 bits
    python benchmarks/kernel_speed.py --shapes 4096x4096 --m 1,64 --bits 4
    python benchmarks/kernel_speed.py --table out.json   # markdown table of a saved run

Every timing is the median over repeated calls. Weights are rotated over enough copies to exceed
the last-level cache (--rotate-mb, default 256 MiB), so M = 1 numbers are DRAM-bound the way a
real model's decode step is, not L3-resident. "floor_ms" is bytes the cpu kernel must read
(repacked codes + fp32 scale tables) divided by the read bandwidth measured in the same run
(multi-threaded sum over a 512 MiB tensor).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch

from gptqkit.formats.packing import pack_qweight, pack_qzeros
from gptqkit.kernels import cpu as cpu_backend
from gptqkit.kernels.qlinear import QuantLinear

SHAPES_MAIN = ["2048x2048", "4096x4096", "4096x11008"]
SHAPES_SMOL = ["576x576", "576x192", "576x1536", "1536x576"]  # SmolLM2-135M (K x N)


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def timeit(fn, min_time: float = 0.25, max_iter: int = 200, min_iter: int = 5) -> float:
    """Median milliseconds of fn() (fn is given the iteration number, to rotate weights)."""
    fn(0)
    fn(1)
    ts = []
    start = time.perf_counter()
    i = 0
    while i < min_iter or (time.perf_counter() - start < min_time and i < max_iter):
        t = time.perf_counter()
        fn(i)
        ts.append(time.perf_counter() - t)
        i += 1
    return statistics.median(ts) * 1e3


def read_bandwidth_gbs() -> float:
    buf = torch.ones(128 << 20, dtype=torch.float32)  # 512 MiB
    ms = timeit(lambda i: buf.sum(), min_time=1.0, max_iter=20)
    return buf.numel() * 4 / ms / 1e6


def make_layer(K: int, N: int, bits: int, group: int, gen: torch.Generator) -> QuantLinear:
    """Random codes/scales/zeros (timing does not depend on the values), v1 checkpoint, sym."""
    q = torch.randint(0, 1 << bits, (K, N), generator=gen, dtype=torch.int32)
    G = -(-K // group)
    layer = QuantLinear(K, N, bits, group)
    layer.qweight.copy_(pack_qweight(q, bits))
    layer.qzeros.copy_(pack_qzeros(torch.full((G, N), 1 << (bits - 1)), bits, "gptq"))
    layer.scales.copy_((torch.rand(G, N, generator=gen) * 0.02 + 0.001).half())
    return layer


def copies(n: int, make):
    return [make() for _ in range(max(1, n))]


def markdown(doc: dict) -> str:
    """A markdown table of a JSON document this script printed."""
    cols = [("cpu_ms", "cpu (fp32 x)"), ("cpu_bf16_ms", "cpu (bf16 x)"), ("dense_fp32_ms", "fp32 mm"), ("dense_bf16_ms", "bf16 mm"),
            ("aten_int4_fp32_ms", "aten int4 (fp32 x)"), ("aten_int4_bf16_ms", "aten int4 (bf16 x)"),
            ("torch_backend_ms", "torch backend"), ("floor_ms", "floor")]
    head = "| K×N | bits | M | " + " | ".join(c[1] + " ms" for c in cols) + \
           " | cpu vs fp32 mm | cpu vs best aten | cpu bf16 vs aten bf16 | cpu / floor |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in doc["results"]:
        cells = [f"{r['K']}×{r['N']}", str(r["bits"]), str(r["M"])]
        cells += [f"{r[k]:.3f}" if k in r else "–" for k, _ in cols]
        cells += [f"{r['speedup_vs_fp32']:.2f}×" if "speedup_vs_fp32" in r else "–",
                  f"{r['speedup_vs_aten_int4']:.2f}×" if "speedup_vs_aten_int4" in r else "–",
                  f"{r['bf16_speedup_vs_aten_bf16']:.2f}×" if "bf16_speedup_vs_aten_bf16" in r else "–",
                  f"{r['x_floor']:.2f}" if "x_floor" in r else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--table":
        with open(sys.argv[2]) as f:
            print(markdown(json.load(f)))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4096x4096 and two SmolLM2 shapes, 4-bit only")
    ap.add_argument("--shapes", help="comma-separated KxN list (overrides the defaults)")
    ap.add_argument("--m", default="1,4,16,64,256", help="batch rows to time")
    ap.add_argument("--bits", default=None, help="comma-separated bit widths (default 4,8; --quick: 4)")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--rotate-mb", type=float, default=256.0, help="weight bytes to rotate over per case")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--no-torch-backend", action="store_true", help="skip the slow reference backend")
    args = ap.parse_args()

    if args.shapes:
        shapes = args.shapes.split(",")
    elif args.quick:
        shapes = ["4096x4096", "576x1536", "1536x576"]
    else:
        shapes = SHAPES_MAIN + SHAPES_SMOL
    bits_list = [int(b) for b in (args.bits or ("4" if args.quick else "4,8")).split(",")]
    ms_list = [int(m) for m in args.m.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    nt = torch.get_num_threads()
    gen = torch.Generator().manual_seed(0)
    rot = args.rotate_mb * (1 << 20)

    env = {"torch": torch.__version__, "threads": nt, "cpu": platform.processor() or platform.machine(),
           "loadavg_start": os.getloadavg(), "command": " ".join(["python"] + sys.argv),
           "kernel_isa": cpu_backend.isa()}
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lib_ok = cpu_backend.get_lib() is not None
    env["cpu_kernel"] = "built" if lib_ok else f"unavailable: {cpu_backend.lib_error()}"
    bw = read_bandwidth_gbs()
    env["read_bandwidth_GBps"] = round(bw, 2)
    log(f"read bandwidth {bw:.1f} GB/s, {nt} threads")

    results = []
    for shape in shapes:
        K, N = (int(v) for v in shape.lower().split("x"))
        dense32 = copies(int(rot // (K * N * 4)), lambda: torch.randn(K, N, generator=gen))
        dense16 = [w.to(torch.bfloat16) for w in dense32[: max(1, int(rot // (K * N * 2)))]]
        for bits in bits_list:
            group = min(args.group, K) if args.group != -1 else K
            base = make_layer(K, N, bits, group, gen)
            layers = {}
            # "cpu": the layer as gptqkit.load prepares it for an fp32 model, "cpu_bf16" for a
            # bf16 model (the kernel is chosen per model dtype, see kernels/cpu.py)
            for be, dt in (("cpu", torch.float32), ("cpu_bf16", torch.bfloat16), ("torch", torch.float32)):
                if be.startswith("cpu") and not lib_ok:
                    continue
                if be == "torch" and args.no_torch_backend:
                    continue
                be_name = be.split("_")[0]
                base.compute_dtype = dt
                l0 = copy.deepcopy(base)
                l0.post_init(be_name)
                if be_name == "cpu":
                    nbytes = l0.layout.w.numel() + 2 * 4 * l0.layout.s.numel()
                    ls = [l0]
                    for _ in range(int(rot // nbytes) - 1):
                        # a full copy prepared on its own: the M = 1 fast path calls the kernel
                        # through a C struct of pointers built at prepare time, so copies that
                        # only clone the tensors would all read l0's weights (L3-resident)
                        lc = copy.deepcopy(base)
                        lc.post_init(be_name)
                        ls.append(lc)
                    layers[be] = ls
                else:
                    layers[be] = [l0]
            aten = None
            if bits == 4 and K % group == 0:
                from gptqkit.kernels.torch_ref import unpack_layer
                q, z = unpack_layer(base)
                s = base.scales.float()
                w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.T.contiguous(), 1)
                # aten's convention: w = (q - 8)·scale + zero  ⇒  zero = scale·(8 − z)
                sz = torch.stack([s, s * (8 - z.float())], -1)
                n_aten = max(1, int(rot // (w4.numel() + sz.numel() * 2)))
                aten = {dt: [(w4.clone(), sz.to(dt).contiguous()) for _ in range(n_aten)]
                        for dt in (torch.float32, torch.bfloat16)}
            packed_bytes = K * N * bits // 8
            kernel_bytes = (layers["cpu"][0].layout.w.numel() + 8 * layers["cpu"][0].layout.s.numel()) if "cpu" in layers else packed_bytes
            for M in ms_list:
                x32 = torch.randn(M, K, generator=gen)
                x16 = x32.to(torch.bfloat16)
                row = {"K": K, "N": N, "bits": bits, "group": group, "M": M,
                       "floor_ms": round(kernel_bytes / bw / 1e6, 4),
                       "packed_floor_ms": round(packed_bytes / bw / 1e6, 4)}
                with torch.inference_mode():
                    if "cpu" in layers:
                        ls = layers["cpu"]
                        row["cpu_ms"] = timeit(lambda i: ls[i % len(ls)](x32))
                    if "cpu_bf16" in layers:
                        lb = layers["cpu_bf16"]
                        row["cpu_bf16_ms"] = timeit(lambda i: lb[i % len(lb)](x16))
                    if "torch" in layers and (M <= 64 or K * N <= 4096 * 4096):
                        lt = layers["torch"][0]
                        row["torch_backend_ms"] = timeit(lambda i: lt(x32), min_time=0.1, max_iter=10, min_iter=3)
                    row["dense_fp32_ms"] = timeit(lambda i: x32 @ dense32[i % len(dense32)])
                    row["dense_bf16_ms"] = timeit(lambda i: x16 @ dense16[i % len(dense16)])
                    if aten is not None:
                        for dt, key in ((torch.float32, "aten_int4_fp32_ms"), (torch.bfloat16, "aten_int4_bf16_ms")):
                            ws = aten[dt]
                            xx = x32 if dt == torch.float32 else x16
                            row[key] = timeit(lambda i: torch.ops.aten._weight_int4pack_mm_for_cpu(
                                xx, ws[i % len(ws)][0], group, ws[i % len(ws)][1]))
                for k in list(row):
                    if k.endswith("_ms"):
                        row[k] = round(row[k], 4)
                if "cpu_ms" in row:
                    c = row["cpu_ms"]
                    row["speedup_vs_fp32"] = round(row["dense_fp32_ms"] / c, 2)
                    if "aten_int4_bf16_ms" in row:
                        row["speedup_vs_aten_int4"] = round(min(row["aten_int4_fp32_ms"], row["aten_int4_bf16_ms"]) / c, 2)
                    row["x_floor"] = round(c / row["floor_ms"], 2)
                    if "aten_int4_bf16_ms" in row:
                        row["bf16_speedup_vs_aten_bf16"] = round(row["aten_int4_bf16_ms"] / row["cpu_bf16_ms"], 2)
                    row["kernel_fp32_model"] = "bf16 dot-product" if layers["cpu"][0].layout.dp else "fma"
                    row["kernel_bf16_model"] = "bf16 dot-product" if layers["cpu_bf16"][0].layout.dp else "fma"
                log(json.dumps(row))
                results.append(row)
            del layers, aten
        del dense32, dense16
    env["loadavg_end"] = os.getloadavg()
    print(json.dumps({"env": env, "results": results}, indent=1))


if __name__ == "__main__":
    main()
