"""Where the quantization's peak RSS is reached: RSS sampled every 5 ms while the library
default quantizes the built-in SmolLM2 (or its 3-block copy), each sample labelled with what
the pipeline was doing (accumulating linear L of chunk c, solving L, finalizing).

    OMP_NUM_THREADS=1 python benchmarks/rss_timeline.py            # 3-block copy (/tmp/s2)
    OMP_NUM_THREADS=1 python benchmarks/rss_timeline.py --full     # all 30 blocks

Prints one JSON document: wall seconds, VmHWM, the label at the peak, the highest RSS per label
(top 12), and the RSS at the start of every block. A diagnostic, not a timing benchmark.

`--clip-search torch` runs find_params' torch loop instead of the C++ search (`off`: no search,
mse=False); the JSON then also has the wall seconds spent inside find_params (`find_params_s`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
from chunking_vs_main import three_block_copy  # noqa: E402

import gptqkit.pipeline.block as blockmod  # noqa: E402
import gptqkit.quant.gptq as gptqmod  # noqa: E402
from gptqkit.quant import grid  # noqa: E402
import gptqkit.pipeline.rundir as rundir  # noqa: E402
from gptqkit import QuantizeConfig  # noqa: E402
from gptqkit.api import load_tokenizer  # noqa: E402
from gptqkit.data import calibration_batches  # noqa: E402
from gptqkit.models.default import default_model_dir  # noqa: E402
from gptqkit.models.source import ModelHandle  # noqa: E402
from gptqkit.pipeline import quantize_model  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="all 30 blocks instead of the 3-block copy")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", default="/tmp/rss-timeline-out")
    ap.add_argument("--clip-search", choices=["kernel", "torch", "off"], default="kernel",
                    help="the clip search in C++ (default), as the torch loop, or off (mse=False)")
    a = ap.parse_args()
    grid.CPU_KERNEL = a.clip_search == "kernel"
    in_find_params = [0.0]
    real_find_params = gptqmod.find_params

    def timed_find_params(*args, **kw):
        t = time.perf_counter()
        try:
            return real_find_params(*args, **kw)
        finally:
            in_find_params[0] += time.perf_counter() - t
    gptqmod.find_params = timed_find_params

    label, samples, done = ["load"], [], threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((rss_mib(), label[0]))
            time.sleep(0.005)

    def tag(cls_or_mod, name, text):
        real = getattr(cls_or_mod, name)

        def wrapped(*args, **kw):
            label[0] = text(*args)
            return real(*args, **kw)
        setattr(cls_or_mod, name, wrapped)

    tag(blockmod, "solve", lambda job, zm: f"solve {job.name}")
    tag(blockmod.BlockQuantizer, "_accumulate", lambda self, p, job, x: f"accumulate {job.name} c{p.chunk}")
    tag(rundir.RunDir, "finalize", lambda *a: "finalize")
    threading.Thread(target=sample, daemon=True).start()

    handle = ModelHandle(default_model_dir() if a.full else three_block_copy())
    tok = load_tokenizer(handle.path)
    cal = calibration_batches(tok, "shakespeare", nsamples=a.nsamples, seqlen=a.seqlen, seed=0)
    label[0] = "start"
    t0 = time.perf_counter()
    quantize_model(handle, cal.input_ids, QuantizeConfig(bits=4, group_size=128, mse=a.clip_search != "off"),
                   a.out, progress=False, overwrite=True)
    seconds = time.perf_counter() - t0
    done.set()
    hwm = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM")) / 1024
    best: dict[str, float] = {}
    for r, lab in samples:
        best[lab] = max(best.get(lab, 0.0), r)
    block_start = {}
    for r, lab in samples:
        if lab.startswith("accumulate") and lab.endswith("q_proj c0"):
            block_start.setdefault(lab.split()[1].rsplit(".", 2)[0], round(r))
    print(json.dumps({"command": " ".join(["python"] + sys.argv), "model": "full" if a.full else "3-block copy",
                      "seconds": round(seconds, 1), "clip_search": a.clip_search,
                      "find_params_s": round(in_find_params[0], 2), "vmhwm_mib": round(hwm), "peak_at": max(samples)[1],
                      "top": [(lab, round(r)) for lab, r in sorted(best.items(), key=lambda kv: -kv[1])[:12]],
                      "block_start_rss_mib": block_start, "loadavg": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    main()
