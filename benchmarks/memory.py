"""Peak memory (RSS) of quantization: does it stay flat as the model gets deeper, and how far is
it below the fp32 model plus its calibration activations? Prints JSON.

    python benchmarks/memory.py --nsamples 16 --seqlen 512 --threads 1

Cases, each in its own subprocess (peak RSS = the child's ru_maxrss):
  floor       import torch/transformers/gptqkit, load the tokenizer, build the calibration set
  smollm2     the built-in SmolLM2-135M (30 blocks, float32 safetensors), default settings
  deep120     SmolLM2's config with num_hidden_layers=120 and random weights (4x the blocks),
              built once into --work as float32 safetensors shards
  smollm2-offload  SmolLM2 with --max-memory small enough that the activations live on disk
Settings: GPTQ 4-bit, group 128, sym, true-sequential; calibration "shakespeare", seed 0.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def _child(a) -> None:
    import torch
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    out: dict = {}
    if a.child == "floor":
        from gptqkit.api import load_tokenizer
        from gptqkit.data import calibration_batches
        cal = calibration_batches(load_tokenizer(a.model), "shakespeare", nsamples=a.nsamples, seqlen=a.seqlen)
        out["calib_shape"] = list(cal.input_ids.shape)
    else:
        # the same steps as gptqkit.quantize, with the peak reset between calibration and quantization
        import gc

        from gptqkit import QuantizeConfig
        from gptqkit.api import load_tokenizer
        from gptqkit.data import calibration_batches
        from gptqkit.pipeline import quantize_model
        from gptqkit.heap import release_heap
        from gptqkit.models.source import ModelHandle
        handle = ModelHandle(a.model)
        tok = load_tokenizer(handle.path)
        cal = calibration_batches(tok, "shakespeare", nsamples=a.nsamples, seqlen=a.seqlen, seed=0)
        gc.collect()
        release_heap()
        out["rss_before_quantize_mb"] = round(_status("VmRSS"), 1)
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM (the peak) to the current RSS
            f.write("5")
        t1 = time.perf_counter()
        rep = quantize_model(handle, cal.input_ids, QuantizeConfig(bits=4, group_size=128), a.out,
                             attention_mask=cal.attention_mask, tokenizer=tok, progress=False, overwrite=True,
                             max_memory=a.max_memory)
        out["quantize_seconds"] = round(time.perf_counter() - t1, 1)
        out["quantize_peak_rss_mb"] = round(_status("VmHWM"), 1)
        out["quantize_peak_above_start_mb"] = round(out["quantize_peak_rss_mb"] - out["rss_before_quantize_mb"], 1)
        out.update(layers=len(rep.layers), forwards=rep.forwards, mean_loss=rep.to_dict()["mean_loss"])
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print("RESULT " + json.dumps(out))


def _status(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB -> MiB
    return float("nan")


def build_deep(src: Path, dst: Path, layers: int, shard_bytes: int = 512 << 20) -> Path:
    """SmolLM2's config with `layers` blocks, random weights (same shapes, std 0.02, norms 1),
    written shard by shard so building it never holds the whole model."""
    import shutil

    import torch
    from safetensors import safe_open

    from gptqkit.formats.checkpoint import INDEX_FILE, write_safetensors
    if (dst / "done").is_file():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "generation_config", "chat_template", "special_tokens")):
            shutil.copy(f, dst / f.name)
    with safe_open(str(src / "model.safetensors"), framework="pt") as sf:
        shapes = {k: (sf.get_slice(k).get_shape(), sf.get_slice(k).get_dtype()) for k in sf.keys()}
    block0 = {k[len("model.layers.0."):]: v for k, v in shapes.items() if k.startswith("model.layers.0.")}
    names = [k for k in shapes if not k.startswith("model.layers.")]
    names += [f"model.layers.{i}.{n}" for i in range(layers) for n in block0]
    g = torch.Generator().manual_seed(0)
    shard: dict = {}
    size = 0
    files: list[tuple[str, list[str]]] = []

    def flush():
        nonlocal shard, size
        if shard:
            name = f"part-{len(files):05d}.safetensors"
            write_safetensors(dst / name, shard, fsync=False)
            files.append((name, list(shard)))
            shard, size = {}, 0

    for k in names:
        short = k.split("model.layers.")[-1].split(".", 1)[-1] if k.startswith("model.layers.") else k
        shape = block0[short][0] if k.startswith("model.layers.") else shapes[k][0]
        t = torch.ones(shape) if k.endswith("norm.weight") else torch.randn(shape, generator=g) * 0.02
        nbytes = t.numel() * 4
        if shard and size + nbytes > shard_bytes:
            flush()
        shard[k] = t
        size += nbytes
    flush()
    n = len(files)
    wm = {}
    for i, (name, keys) in enumerate(files):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(dst / name, dst / final)
        wm.update({k: final for k in keys})
    (dst / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": wm}, indent=1))
    (dst / "done").write_text("")
    return dst


def _model_bytes(folder: Path) -> int:
    from gptqkit.formats.checkpoint import read_header, shard_files
    total = 0
    for f in shard_files(folder):
        head, _ = read_header(f)
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in head.items() if k != "__metadata__")
    return total


def _run_case(a, name: str, model: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", "floor" if name == "floor" else "quantize", "--model", str(model),
           "--out", str(Path(a.work) / f"out-{name}"), "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen),
           "--threads", str(a.threads), *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        return {"error": r.stderr[-2000:]}
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", type=int, default=120)
    ap.add_argument("--work", default="/tmp/gptqkit-memory-bench")
    ap.add_argument("--offload-budget", default="8MB")
    ap.add_argument("--cases", default="floor,smollm2,deep120,smollm2-offload")
    ap.add_argument("--child", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--max-memory", default=None)
    a = ap.parse_args()
    if a.child:
        return _child(a)

    from gptqkit.models.default import default_model_dir
    small = default_model_dir()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    deep = build_deep(small, work / f"deep{a.layers}", a.layers)
    cfg = json.loads((small / "config.json").read_text())
    act = a.nsamples * a.seqlen * cfg["hidden_size"] * 4
    res: dict = {"nsamples": a.nsamples, "seqlen": a.seqlen, "threads": a.threads,
                 "fp32_model_mb": {"smollm2": round(_model_bytes(small) / 2**20, 1),
                                   f"deep{a.layers}": round(_model_bytes(deep) / 2**20, 1)},
                 "hidden_states_mb": round(act / 2**20, 1), "cases": {}}
    plan = {"floor": (small, []), "smollm2": (small, []), "deep120": (deep, []),
            "smollm2-offload": (small, ["--max-memory", a.offload_budget])}
    for name in a.cases.split(","):
        model, extra = plan[name]
        res["cases"][name] = _run_case(a, name, model, extra)
        print(f"{name}: {res['cases'][name]}", file=sys.stderr)
    c = res["cases"]
    rss = {k: v.get("peak_rss_mb") for k, v in c.items()}
    if rss.get("smollm2") and rss.get("deep120"):
        res["deep_over_shallow_rss"] = round(rss["deep120"] / rss["smollm2"], 3)
        q = {k: c[k].get("quantize_peak_rss_mb") for k in ("smollm2", "deep120")}
        res["deep_over_shallow_quantize_peak"] = round(q["deep120"] / q["smollm2"], 3)
    if rss.get("smollm2"):
        # what holding the model would cost: the fp32 weights plus the block inputs and outputs
        res["fp32_model_plus_activations_mb"] = round(res["fp32_model_mb"]["smollm2"] + 2 * act / 2**20, 1)
        if rss.get("floor"):
            res["smollm2_rss_above_floor_mb"] = round(rss["smollm2"] - rss["floor"], 1)
            res["deep_rss_above_floor_mb"] = round(rss["deep120"] - rss["floor"], 1) if rss.get("deep120") else None
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
