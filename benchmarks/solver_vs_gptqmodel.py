"""gptqkit's and GPTQModel's GPTQ solvers on the same real layers, the same inputs: layer by layer.
Prints JSON. Needs a Python where both import (the GPTQModel venv, BENCHMARKS.md).

    /work/gptqmodel-venv/bin/python benchmarks/solver_vs_gptqmodel.py --bits 4 --group-size 128
    /work/gptqmodel-venv/bin/python benchmarks/solver_vs_gptqmodel.py --bits 4 --group-size 128 --desc-act

Inputs: each layer's inputs in the float SmolLM2-135M on `--nsamples` × `--seqlen` tokens of the
built-in calibration text, fed to GPTQModel's GPTQ.add_batch and to gptqkit's Hessian. Each tool
solves the layer with the same settings (bits, group, sym, damp 0.01, desc_act as given, static
groups off, no mse, GPTQModel's act_group_aware off). The measure is the layer error
tr(ΔW H ΔWᵀ) with a float64 Hessian, relative to RTN on the same grid; `apart` is how far apart
the two solutions are, ‖Ŵ_ours − Ŵ_peer‖_H / ‖W − Ŵ_ours‖_H (0: the same weights; GPTQ's
rounding cascades from any tie flipped by summation order, so equal quality need not mean
equal codes).
"""
from __future__ import annotations

import argparse
import json
import math
import sys

LAYERS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--desc-act", action="store_true")
    ap.add_argument("--blocks", default="3,15,27")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    a = ap.parse_args()

    import contextlib

    import torch
    with contextlib.redirect_stdout(sys.stderr):  # its banner and log go to stdout: keep the JSON clean
        from gptqmodel import QuantizeConfig as PeerConfig
        from gptqmodel.quantization.gptq import GPTQ as PeerGPTQ
    from transformers import AutoModelForCausalLM

    from gptqkit.api import load_tokenizer, resolve_model
    from gptqkit.data.calibration import calibration_batches
    from gptqkit.quant.gptq import Hessian, gptq_solve
    from gptqkit.quant.rtn import rtn_solve

    path = resolve_model(None)
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = calibration_batches(tok, "shakespeare", nsamples=a.nsamples, seqlen=a.seqlen, seed=0).input_ids
    names = [f"model.layers.{b}.{n}" for b in a.blocks.split(",") for n in LAYERS]
    mods = dict(model.named_modules())
    pcfg = PeerConfig(bits=a.bits, group_size=a.group_size, sym=True, desc_act=a.desc_act, static_groups=False,
                      damp_percent=0.01, damp_auto_increment=0.0025, true_sequential=True, mse=0.0,
                      act_group_aware=False)
    ours = {n: Hessian(mods[n].in_features) for n in names}
    exact = {n: Hessian(mods[n].in_features, dtype=torch.float64) for n in names}
    peers = {}
    for n in names:
        peers[n] = PeerGPTQ(mods[n], pcfg)
        peers[n].name = n
        peers[n].quantizer.configure(perchannel=True)

    def hook(m, args, out, n):
        ours[n].add(args[0])
        exact[n].add(args[0].double())
        peers[n].add_batch(args[0], out)

    handles = [mods[n].register_forward_hook(lambda m, args, out, n=n: hook(m, args, out, n)) for n in names]
    with torch.no_grad():
        for i in range(0, ids.shape[0], 4):
            model(input_ids=ids[i:i + 4])
    for h in handles:
        h.remove()

    def err(W, Wq, H):
        d = (W - Wq).double()
        return float(torch.einsum("nk,kl,nl->", d, H, d))

    out = {"bits": a.bits, "group_size": a.group_size, "desc_act": a.desc_act, "layers": {}}
    logs = {"ours": 0.0, "peer": 0.0}
    for n in names:
        W = mods[n].weight.data.clone()
        H = exact[n].H
        base = err(W, rtn_solve(W, a.bits, a.group_size, True).dequantize(), H)
        r = gptq_solve(W, ours[n].H, a.bits, a.group_size, True, desc_act=a.desc_act, static_groups=False)
        Qp = peers[n].quantize()[0].float()
        row = {"ours": err(W, r.dequantize(), H) / base, "peer": err(W, Qp, H) / base}
        row["apart"] = math.sqrt(err(r.dequantize(), Qp, H) / err(W, r.dequantize(), H))
        for k in logs:
            if k in row:
                logs[k] += math.log(row[k]) / len(names)
        out["layers"][n] = row
        print(n, json.dumps({k: round(v, 4) for k, v in row.items()}), file=sys.stderr, flush=True)
    out["geomean_vs_rtn"] = {k: round(math.exp(v), 4) for k, v in logs.items()}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
