"""Decode with the lm_head as gptqkit.load holds it against the alternatives, in one process,
alternating, on the same 4-bit checkpoint. Prints JSON.

    python benchmarks/fast_head_ab.py /tmp/i13-smol-4bit --rounds 3 --new 32

Variants: `q8rows_ms` (the default where the head's values allow it: exact int8 rows,
gk_q8_gemv_rows, kernels/exact_rows.py), `gemv_ms` (the fp32 head on the row GEMV, FastHeadLinear:
the default before, loaded with GPTQKIT_EXACT_ROWS=0) and `nn_linear_ms` (torch's nn.Linear on
that same fp32 weight, the class swapped). Per round and variant: a 64-token prefill, then --new
greedy decode steps with the KV cache; ms per decode step."""
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
    import os

    import gptqkit
    from gptqkit.kernels.cpu import FastHeadLinear, isa
    os.environ["GPTQKIT_EXACT_ROWS"] = "0"
    m = gptqkit.load(a.q4)
    os.environ["GPTQKIT_EXACT_ROWS"] = "1"
    mq = gptqkit.load(a.q4)
    head = m.get_output_embeddings()
    if type(head) is not FastHeadLinear:
        raise SystemExit(f"the head is {type(head).__name__}, not an fp32 FastHeadLinear: nothing to compare")
    has_rows = type(mq.get_output_embeddings()).__name__ == "ExactHead"
    prompt = torch.randint(100, m.config.vocab_size - 100, (1, 64), generator=torch.Generator().manual_seed(0))

    def step_ms(cls, model=m) -> float:
        if cls is not None:
            head.__class__ = cls
        with torch.inference_mode():
            out = model(prompt, use_cache=True)
            cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            for _ in range(a.new):
                out = model(tok, past_key_values=cache, use_cache=True)
                cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            return (time.perf_counter() - t) / a.new * 1e3

    rounds = []
    for _ in range(a.rounds):
        r = {"q8rows_ms": step_ms(None, mq)} if has_rows else {}
        r.update(gemv_ms=step_ms(FastHeadLinear), nn_linear_ms=step_ms(torch.nn.Linear))
        rounds.append(r)
    print(json.dumps({"checkpoint": a.q4, "threads": torch.get_num_threads(), "kernel_isa": isa(),
                      "new_tokens": a.new, "head_as_exact_int8_rows": has_rows, "rounds": rounds,
                      "gemv_vs_nn_linear": [round(r["nn_linear_ms"] / r["gemv_ms"], 3) for r in rounds],
                      **({"q8rows_vs_gemv": [round(r["gemv_ms"] / r["q8rows_ms"], 3) for r in rounds]}
                         if has_rows else {})}, indent=1))

if __name__ == "__main__":
    main()
