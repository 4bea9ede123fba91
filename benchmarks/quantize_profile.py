"""Where the default quantization run's time and memory go, per variant, each in its own process.
Prints JSON.

    OMP_NUM_THREADS=1 python benchmarks/quantize_profile.py --nsamples 64 --seqlen 512 \
        --variants default,one-chunk [--other-src /path/to/other/src]

Variants: `default` (no --batch-size: the chunk size gptqkit picks), `one-chunk` (batch_size =
nsamples: every sequence in one forward, the default before issue 13), `other` (`default` run
with the gptqkit found under --other-src, e.g. an older checkout). The variants run one after
the other, `--repeat` times, alternating, so load from other jobs hits them alike.

Per run: wall time of gptqkit.quantize, peak RSS of the process (VmHWM: model, calibration,
everything), and the time split into
- forward: the block forwards (BlockQuantizer.run minus the Hessians and solves inside it),
- hessian: Hessian.add (XᵀX),
- solve: GPTQ solves and swapping the dequantized weight in,
- copies: packing the GPTQ tensors, writing block files and the resume hidden states, the final
  shard assembly,
- other: the rest (loading, tokenizing, capturing block 0's inputs, config files).
With the FLOP floor of the parts that have one (quantize_speed.py's count: linears + attention for
the forward, 2·T·K² per distinct input for the Hessians, ~2·N·K² + 4/3·K³ per linear for the
solves) at the fp32 matmul rate measured in the same process.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _timed(owner, name: str, acc: dict, key: str) -> None:
    fn = getattr(owner, name)

    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            acc[key] = acc.get(key, 0.0) + time.perf_counter() - t0
    setattr(owner, name, wrapper)
    return wrapper


def _instrument(acc: dict) -> None:
    from gptqkit.pipeline import block, collective, linears, rundir, writer
    from gptqkit.quant import gptq
    _timed(gptq.Hessian, "add", acc, "hessian")
    w = _timed(linears, "solve", acc, "solve")
    block.solve = collective.solve = w           # imported by name there
    _timed(block.BlockQuantizer, "run", acc, "block")
    _timed(writer.Tensors, "add_solved", acc, "copies")
    _timed(rundir.RunDir, "write_block", acc, "copies")
    _timed(rundir.RunDir, "write_hidden", acc, "copies")
    _timed(rundir.RunDir, "finalize", acc, "copies")


def child(a) -> None:
    import torch
    sys.path.insert(0, str(HERE))
    from quantize_speed import matmul_rate
    import gptqkit
    from gptqkit.api import resolve_model
    from transformers import AutoConfig
    acc: dict = {}
    _instrument(acc)
    path = resolve_model(None)
    c = AutoConfig.from_pretrained(path)
    bs = a.nsamples if a.child == "one-chunk" else None
    with tempfile.TemporaryDirectory(prefix="gptqkit-profile-") as tmp:
        t0 = time.perf_counter()
        rep = gptqkit.quantize(path, "shakespeare", f"{tmp}/out", gptqkit.QuantizeConfig(bits=4, group_size=128),
                               nsamples=a.nsamples, seqlen=a.seqlen, progress=False, batch_size=bs)
        wall = time.perf_counter() - t0
    peak = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM")) / 1024
    rate = matmul_rate(min(a.nsamples * a.seqlen, 8192), c.hidden_size, c.intermediate_size)
    fl = _flops(c, a.nsamples, a.seqlen)
    t = {"forward": acc["block"] - acc["hessian"] - acc["solve"], "hessian": acc["hessian"], "solve": acc["solve"],
         "copies": acc.get("copies", 0.0)}
    t["other"] = wall - sum(t.values())
    print(json.dumps({"variant": a.child, "gptqkit": gptqkit.__file__, "wall_seconds": round(wall, 1),
                      "peak_rss_mib": round(peak), "block_forwards": rep.forwards, "threads": torch.get_num_threads(),
                      "matmul_gflops": round(rate, 1),
                      "seconds": {k: round(v, 1) for k, v in t.items()},
                      "floor_seconds": {k: round(v / (rate * 1e9), 1) for k, v in fl.items()}}))


def _flops(c, nsamples: int, seqlen: int) -> dict:
    T, H, I, L = nsamples * seqlen, c.hidden_size, c.intermediate_size, seqlen
    hd = getattr(c, "head_dim", None) or H // c.num_attention_heads
    kv = c.num_key_value_heads * hd
    linears = [(H, H), (H, kv), (H, kv), (H, H), (H, I), (H, I), (I, H)]  # (K, N): q k v o gate up down
    fwd = sum(2 * T * K * N for K, N in linears) + nsamples * c.num_attention_heads * 2 * 2 * L * L * hd
    hess = sum(2 * T * K * K for K in (H, H, H, I))
    solve = sum(2 * N * K * K + 4 * K ** 3 / 3 for K, N in linears)
    n = c.num_hidden_layers
    return {"forward": fwd * n, "hessian": hess * n, "solve": solve * n}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--variants", default="default,one-chunk")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--other-src", default=None, help="PYTHONPATH of the gptqkit that variant 'other' runs")
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        return child(a)
    runs = []
    for _ in range(a.repeat):
        for v in a.variants.split(","):
            env = dict(os.environ)
            if v == "other":
                env["PYTHONPATH"] = a.other_src
            cmd = [sys.executable, __file__, "--child", "default" if v == "other" else v,
                   "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen)]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            r["variant"] = v
            print(json.dumps(r), file=sys.stderr, flush=True)
            runs.append(r)
    print(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
