"""Layer error tr(ΔW H ΔWᵀ) of solver variants on real SmolLM2-135M layers. Prints JSON.

    python benchmarks/layer_error.py --bits 4 --group-size 128 --variants default,mse-norm,mse
    python benchmarks/layer_error.py --bits 3 --group-size 64 --variants default,mse-norm,mse,mse-s0.5,mse-g200

H is each layer's input Hessian from the float model on `--nsamples` × `--seqlen` tokens of the
built-in calibration text (not the sequential, partly quantized inputs of a real run: a cheap,
fixed target for comparing solver settings one layer at a time). Errors are reported relative
to round-to-nearest on the same grid (1.0 = no better than RTN), per layer and as the geometric
mean over layers. A variant is a dict of gptq_solve keyword arguments (VARIANTS).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys

VARIANTS = {
    "default": {},
    "plain": dict(desc_act=False, static_groups=False),
    "mse-norm": dict(mse="norm"),   # the reference's unweighted |w - ŵ|^2.4 search
    "mse": dict(mse=True),          # gptqkit's: weighted by the layer error (gptq_solve)
    # the clip search's range and steps (find_params' maxshrink, grid)
    "mse-s0.5": dict(mse=True, maxshrink=0.5),
    "mse-s0.3": dict(mse=True, maxshrink=0.3),
    "mse-g200": dict(mse=True, grid=200),
    "mse-g50": dict(mse=True, grid=50),
    # [experiment] codes from the solver, then every (row, group) scale refit by least squares
    # against the layer error (normal equations with H), rounded to fp16 as stored
    "refit": dict(refit=True),
    "mse-refit": dict(mse=True, refit=True),
}


def refit_scales(r, W, H):
    """Scales minimizing tr((W − Ŵ) H (W − Ŵ)ᵀ) with the codes and zeros of r held fixed."""
    import torch
    G, N = r.scales.shape
    gi = r.g_idx.long()
    c = (r.q.double() - r.zeros.double().T[:, gi])                         # [N, K]: q − z per weight
    A = torch.zeros(N, G, W.shape[1], dtype=torch.float64)
    A.scatter_(1, gi[None, None, :].expand(N, 1, -1), c[:, None, :])      # A[n, g, k] = c[n, k] if k in g
    AH = A @ H
    M = AH @ A.transpose(1, 2)                                             # [N, G, G]
    b = (AH @ W.double()[:, :, None])[..., 0]                              # [N, G]
    eye = torch.eye(G, dtype=torch.float64) * 1e-12
    s = torch.linalg.solve(M + eye, b[..., None])[..., 0]
    keep = ~torch.isfinite(s) | (s <= 0)
    s = torch.where(keep, r.scales.double().T, s).half().double()
    r.scales = s.T.to(r.scales.dtype).contiguous()
    return r
LAYERS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--blocks", default="3,15,27")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--variants", default="default,mse")
    a = ap.parse_args()
    for v in a.variants.split(","):
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; choose from {sorted(VARIANTS)}")

    import torch
    from transformers import AutoModelForCausalLM

    from gptqkit.api import load_tokenizer, resolve_model
    from gptqkit.data.calibration import calibration_batches
    from gptqkit.quant import gptq as gq, grid
    from gptqkit.quant.gptq import Hessian, gptq_solve
    from gptqkit.quant.rtn import rtn_solve

    path = resolve_model(None)
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = calibration_batches(tok, "shakespeare", nsamples=a.nsamples, seqlen=a.seqlen, seed=0).input_ids
    names = [f"model.layers.{b}.{n}" for b in a.blocks.split(",") for n in LAYERS]
    mods = dict(model.named_modules())
    hs = {n: Hessian(mods[n].in_features, dtype=torch.float64) for n in names}
    handles = [mods[n].register_forward_pre_hook(lambda m, args, n=n: hs[n].add(args[0].double())) for n in names]
    with torch.no_grad():
        for i in range(0, ids.shape[0], 4):
            model(input_ids=ids[i:i + 4])
    for h in handles:
        h.remove()

    def err(W, Wq, H):
        d = (W - Wq).double()
        return float(torch.einsum("nk,kl,nl->", d, H, d))

    out = {"bits": a.bits, "group_size": a.group_size, "tokens": int(ids.numel()), "layers": {}}
    geo = {v: 0.0 for v in a.variants.split(",")}
    for n in names:
        W = mods[n].weight.data.double()
        H = hs[n].H
        base = err(W, rtn_solve(W, a.bits, a.group_size, True).dequantize(), H)
        row = {}
        for v in geo:
            kw = {**dict(desc_act=True, static_groups=True), **VARIANTS[v]}
            search = {k: kw.pop(k) for k in ("grid", "maxshrink") if k in kw}
            refit = kw.pop("refit", False)
            gq.find_params = functools.partial(grid.find_params, **search)
            r = gptq_solve(W, H, a.bits, a.group_size, True, **kw)
            if refit:
                r = refit_scales(r, W, H)
            row[v] = err(W, r.dequantize(), H) / base
            geo[v] += math.log(row[v]) / len(names)
        out["layers"][n] = row
        print(n, json.dumps({k: round(x, 4) for k, x in row.items()}), file=sys.stderr, flush=True)
    out["geomean_vs_rtn"] = {v: round(math.exp(x), 4) for v, x in geo.items()}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
