"""How far bf16 moves GPTAQ's float stream, next to the signal GPTAQ reads from it.

GPTAQ's cross term uses x̃ − x: the float model's block input minus the quantized model's. Running
the float model in bf16 (quant/gptq.py float_forward_dtype) moves x̃ by its own rounding; that is
harmless only while it is small next to ||x̃ − x||. This prints, per block input of the built-in
SmolLM2-135M, ||x̃_bf16 − x̃|| / ||x̃ − x_q||, with x_q from the model with every block linear
rounded to nearest (sym, group 64: a stand-in for the quantized model, whose GPTQ error is of the
same order) at each of --bits. Prints JSON.

    python benchmarks/gptaq_float_noise.py [--bits 2,3,4,8] [--nsamples 4] [--seqlen 512]
"""
from __future__ import annotations

import argparse
import copy
import json

import torch


def rtn(w: torch.Tensor, bits: int, g: int = 64) -> torch.Tensor:
    W = w.reshape(w.shape[0], -1, g)
    s = W.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 0.5)
    q = torch.clamp(torch.round(W / s - 0.5), -2 ** (bits - 1), 2 ** (bits - 1) - 1) + 0.5
    return (q * s).reshape_as(w)


def hidden(model, ids, bf16: bool = False) -> list[torch.Tensor]:
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        return [h.float() for h in model(ids, output_hidden_states=True).hidden_states[1:]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", default="2,3,4,8")
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=512)
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from gptqkit.data.calibration import calibration_batches
    from gptqkit.models.default import default_model_dir
    d = default_model_dir()
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = calibration_batches(AutoTokenizer.from_pretrained(d), "shakespeare", a.nsamples, a.seqlen).input_ids
    ref, fast = hidden(model, ids), hidden(model, ids, bf16=True)
    out = {"model": "SmolLM2-135M", "tokens": ids.numel(), "ratio_per_block": {}}
    for bits in (int(b) for b in a.bits.split(",")):
        q = copy.deepcopy(model)
        for mod in q.model.layers.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.data = rtn(mod.weight.data, bits)
        r = [float((b - x).norm() / (x - y).norm()) for x, b, y in zip(ref, fast, hidden(q, ids))]
        out["ratio_per_block"][bits] = [round(v, 4) for v in r]
        out[f"range_{bits}bit"] = [round(min(r), 4), round(max(r), 4)]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
