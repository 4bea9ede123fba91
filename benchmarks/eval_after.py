"""Where the README main job's "after" perplexity pass spends its time, against "before".

    python benchmarks/eval_after.py --q4 /tmp/e2e-smol-4bit --rounds 2 > eval_after.json

The main job (`gptqkit quantize`) evaluates the fp32 model ("before": transformers load + 16
windows of 512 tokens, 4 windows per forward) and then the 4-bit checkpoint ("after":
gptqkit.load + the same windows). This script times the parts side by side in one process, at
torch's thread count (--threads to change it):
* load: fp32 `from_pretrained` and `gptqkit.load`, alternating, --rounds each (the first fp32
  load also imports the modeling code, so it is reported but left out of the median);
* tokenize: the evaluation text (shakespeare-eval), once;
* forward: the perplexity batches ([4, 512] each), fp32 and q4 in lockstep (order alternating per
  batch), each forward timed alone; each split into its 210 quantized linears (QuantLinear in q4, the same
  nn.Linear layers in fp32; timed by hooks, M = 2048 rows each) and the rest.
JSON to stdout.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--q4", required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--windows", type=int, default=16)
    a = ap.parse_args()

    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    import gptqkit
    from gptqkit.api import load_tokenizer, resolve_model
    from gptqkit.data.calibration import tokenize_text
    from gptqkit.data.text import load_text
    from gptqkit.kernels.qlinear import QuantLinear
    from gptqkit.models.source import resolve_model_path

    base = resolve_model_path(resolve_model(None))
    res = {"threads": torch.get_num_threads(), "torch": torch.__version__, "load_s": {"fp32": [], "q4": []}}
    models = {}
    for r in range(a.rounds + 1):
        for name in (("fp32", "q4") if r % 2 == 0 else ("q4", "fp32")):
            models.pop(name, None)
            t = time.perf_counter()
            models[name] = (AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval() if name == "fp32"
                            else gptqkit.load(a.q4))
            dt = time.perf_counter() - t
            res["load_s"][name].append(dt)
            log(f"load {name} {dt:.2f} s")
    res["load_median_s"] = {k: statistics.median(v[1:]) for k, v in res["load_s"].items()}  # [0]: imports

    tok = load_tokenizer(base)
    t = time.perf_counter()
    ids = tokenize_text(tok, load_text("shakespeare-eval"))
    res["tokenize_s"] = time.perf_counter() - t
    windows = ids[: a.windows * 512].view(a.windows, 512)

    # QuantLinear time inside the q4 forward (hooks: perf_counter around each call)
    qtime = [0.0]
    starts = {}

    def pre(m, inp):
        starts[id(m)] = time.perf_counter()

    def post(m, inp, out):
        qtime[0] += time.perf_counter() - starts.pop(id(m))
    for name, model in models.items():  # the quantized linears, and the same nn.Linear layers in fp32
        for n, m in model.named_modules():
            if isinstance(m, QuantLinear) or (isinstance(m, torch.nn.Linear) and n != "lm_head"):
                m.register_forward_pre_hook(pre)
                m.register_forward_hook(post)
    fwd = {"fp32": [], "q4": []}
    lin = {"fp32": [], "q4": []}
    nll = {"fp32": 0.0, "q4": 0.0}
    with torch.inference_mode():
        for name, m in models.items():  # warm-up
            m(input_ids=windows[:1, :64], use_cache=False)
        for i, b0 in enumerate(range(0, a.windows, 4)):
            batch = windows[b0: b0 + 4]
            for name in (("fp32", "q4") if i % 2 == 0 else ("q4", "fp32")):
                qtime[0] = 0.0
                t = time.perf_counter()
                logits = models[name](input_ids=batch, use_cache=False).logits
                for b in range(batch.shape[0]):
                    nll[name] += float(F.cross_entropy(logits[b, :-1].float(), batch[b, 1:], reduction="sum"))
                dt = time.perf_counter() - t
                fwd[name].append(dt)
                lin[name].append(qtime[0])
                log(f"batch {i} {name} {dt:.2f} s (linears {qtime[0]:.2f} s)")
                del logits
    res["forward_s"] = fwd
    res["forward_total_s"] = {k: sum(v) for k, v in fwd.items()}
    res["linears_s"] = {k: sum(v) for k, v in lin.items()}  # the 210 quantized layers (nn.Linear in fp32)
    res["rest_s"] = {k: res["forward_total_s"][k] - res["linears_s"][k] for k in fwd}
    res["after_over_before_forward"] = res["forward_total_s"]["q4"] / res["forward_total_s"]["fp32"]
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
