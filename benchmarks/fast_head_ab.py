"""Decode with the fp32 lm_head on the row GEMV (FastHeadLinear, gptqkit.load's default) against
torch's nn.Linear, in one process, alternating, on the same loaded 4-bit model. Prints JSON.

    python benchmarks/fast_head_ab.py /tmp/i13-smol-4bit --rounds 3 --new 32

Per round and variant: a 64-token prefill, then --new greedy decode steps with the KV cache;
ms per decode step. The head's class is swapped between variants (same weights)."""
from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("q4", help="a GPTQ checkpoint whose lm_head stays fp32 (the default)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    import gptqkit
    from gptqkit.kernels.cpu import FastHeadLinear, isa
    m = gptqkit.load(a.q4)
    head = m.get_output_embeddings()
    if type(head) is not FastHeadLinear:
        raise SystemExit(f"the head is {type(head).__name__}, not an fp32 FastHeadLinear: nothing to compare")
    prompt = torch.randint(100, m.config.vocab_size - 100, (1, 64), generator=torch.Generator().manual_seed(0))

    def step_ms(cls) -> float:
        head.__class__ = cls
        with torch.inference_mode():
            out = m(prompt, use_cache=True)
            cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            for _ in range(a.new):
                out = m(tok, past_key_values=cache, use_cache=True)
                cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            return (time.perf_counter() - t) / a.new * 1e3

    rounds = [{"gemv_ms": step_ms(FastHeadLinear), "nn_linear_ms": step_ms(torch.nn.Linear)} for _ in range(a.rounds)]
    print(json.dumps({"checkpoint": a.q4, "threads": torch.get_num_threads(), "kernel_isa": isa(),
                      "new_tokens": a.new, "rounds": rounds,
                      "speedup_per_round": [round(r["nn_linear_ms"] / r["gemv_ms"], 3) for r in rounds]}, indent=1))


if __name__ == "__main__":
    main()
