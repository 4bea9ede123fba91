"""gptqkit vs GPTQModel, side by side: same model, same calibration ids, same settings. Prints JSON.

    python benchmarks/vs_gptqmodel.py --nsamples 64 --seqlen 512 --windows 40 [--desc-act]
    python benchmarks/vs_gptqmodel.py --model gemma3-270m --windows 16 --desc-act --skip-ours

Model: `--model`, resolved as benchmarks/quality.py resolves it (`gptqkit.api.resolve_model`):
none for the built-in SmolLM2-135M folder, the name of another built-in model (`gemma3-270m`),
or a model folder. Calibration: `--nsamples` x `--seqlen` token ids from
`gptqkit.data.calibration_batches(tok, "shakespeare", ..., seed=--seed)`, made once and handed to
both tools. Settings, explicit for both: bits, group size, sym, desc_act, damp_percent 0.01,
damp_auto_increment 0.0025, true_sequential, mse off, v1 ("gptq") format, float32 compute
(on a CPU GPTQModel otherwise picks bfloat16) and, for GPTQModel, act_group_aware off (its
default turns it on when desc_act is off; gptqkit has no such reordering; `--peer-gar` keeps
GPTQModel's default instead).

Every step runs in its own subprocess of this same Python (so torch is identical and each
peak RSS is that step's own): gptqkit's quantization, GPTQModel's quantization, then each
checkpoint's perplexity on the held-out "shakespeare-eval" text (`--windows` windows of 512
tokens, gptqkit's `perplexity`), loaded both with `gptqkit.load(dir, backend="torch")` and with
GPTQModel's own loader -- so each tool also reads the other's checkpoint. The float model's
perplexity is the reference row. The evaluation is quality.py's (same text, same `perplexity`
call, the first `--windows` windows of 512), so with the same `--windows` (40 for SmolLM2, 16 for
Gemma 3 in BENCHMARKS.md) and `--seed` the figures sit in the same table as quality.py's, whose
`gptqkit.quantize(..., seed=S)` draws the same calibration ids (`calibration.ids_sha256` here).

Times: `load_s` (model load), `quantize_s` (the quantize call alone), `save_s`, and
`quantize_save_s` (their sum). gptqkit writes the checkpoint while it quantizes (one block at a
time), so its `quantize_s` already includes writing and its `save_s` is only the side files;
compare `quantize_save_s` for the like-for-like figure.

When `gptqmodel` is not importable the peer rows are skipped (and say so). GPTQModel is
installed apart from gptqkit's own environment (it pins other versions); see
BENCHMARKS.md (gptqkit vs GPTQModel). GPTQMODEL_CPU_WORKERS, when unset, is set to max(2, --threads or the
core count): GPTQModel refuses to start with fewer than 2.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DAMP_PERCENT = 0.01
DAMP_AUTO_INCREMENT = 0.0025


def _peak_rss_mb() -> float:
    """Peak RSS of this process and of any children it waited for, in MiB (Linux: KiB units)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, kids) / 1024, 1)


def _setup_threads(threads: int | None) -> None:
    import torch
    if threads:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- workers
def worker_gptqkit(a: argparse.Namespace) -> dict:
    import torch
    _setup_threads(a.threads)
    import gptqkit
    from gptqkit.api import load_tokenizer
    from gptqkit.pipeline import quantize_model
    from gptqkit.models.source import ModelHandle

    ids = torch.load(a.ids)
    cfg = gptqkit.QuantizeConfig(bits=a.bits, group_size=a.group_size, sym=True, desc_act=a.desc_act,
                                 static_groups=False, damp_percent=DAMP_PERCENT, damp_auto_increment=DAMP_AUTO_INCREMENT,
                                 true_sequential=True, mse=False, checkpoint_format="gptq")
    t0 = time.perf_counter()
    handle = ModelHandle(a.model, dtype=torch.float32, device="cpu")
    tok = load_tokenizer(handle.path)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = quantize_model(handle, ids, cfg, a.out, tokenizer=tok, overwrite=True, progress=False)
    total = time.perf_counter() - t0
    # quantize_model streams the tensors while quantizing; report.seconds stops before the
    # side files (config, tokenizer, report) are written.
    return {"tool": "gptqkit", "version": gptqkit.__version__, "load_s": round(load_s, 2),
            "quantize_s": round(report.seconds, 2), "save_s": round(total - report.seconds, 2),
            "quantize_save_s": round(total, 2), "torch_threads": torch.get_num_threads(),
            "config": cfg.to_dict()}


def worker_gptqmodel(a: argparse.Namespace) -> dict:
    import torch
    _setup_threads(a.threads)
    from gptqmodel import GPTQModel, QuantizeConfig, __version__
    from gptqmodel.quantization import FORMAT

    ids = torch.load(a.ids)
    kw = dict(bits=a.bits, group_size=a.group_size, sym=True, desc_act=a.desc_act, static_groups=False,
              damp_percent=DAMP_PERCENT, damp_auto_increment=DAMP_AUTO_INCREMENT,
              true_sequential=True, mse=0.0, format=FORMAT.GPTQ)
    if not a.peer_gar:
        kw["act_group_aware"] = False
    qcfg = QuantizeConfig(**kw)
    calib = [{"input_ids": row.clone(), "attention_mask": torch.ones_like(row)} for row in ids]
    t0 = time.perf_counter()
    model = GPTQModel.load(str(a.model), qcfg, device="cpu", dtype=torch.float32)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.quantize(calib, batch_size=a.peer_batch_size)
    quantize_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.save(a.out)
    save_s = time.perf_counter() - t0
    return {"tool": "gptqmodel", "version": __version__, "load_s": round(load_s, 2),
            "quantize_s": round(quantize_s, 2), "save_s": round(save_s, 2),
            "quantize_save_s": round(quantize_s + save_s, 2), "torch_threads": torch.get_num_threads(),
            "cpu_workers_env": os.environ.get("GPTQMODEL_CPU_WORKERS"),
            "compute_dtype": str(next(model.model.parameters()).dtype),
            "batch_size": a.peer_batch_size,
            "config": {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                       for k, v in qcfg.to_dict().items()}}


def worker_eval(a: argparse.Namespace) -> dict:
    import torch
    _setup_threads(a.threads)
    from gptqkit.api import load_tokenizer
    from gptqkit.eval.perplexity import perplexity

    t0 = time.perf_counter()
    info: dict = {}
    if a.loader == "fp":
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(a.ckpt, dtype=torch.float32).eval()
    elif a.loader == "gptqkit":
        import gptqkit
        model = gptqkit.load(a.ckpt, backend="torch")
    else:
        from gptqmodel import GPTQModel
        # GPTQModel 7.7's CPU kernels do not run float32: its auto choice (TorchFusedLinear) fails
        # on in_features that are not a multiple of the group size (SmolLM2: 576, group 128), and
        # TorchLinear accepts only float16/bfloat16. So its loader runs in --peer-load-dtype.
        dtype = getattr(torch, a.peer_load_dtype)
        wrapped = GPTQModel.load(str(a.ckpt), device="cpu", dtype=dtype, backend=a.peer_backend)
        info["backend"], info["dtype"] = a.peer_backend, a.peer_load_dtype
        model = wrapped.model
        kinds = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})
        info["kernel"] = ",".join(kinds)
    load_s = time.perf_counter() - t0
    tok = load_tokenizer(a.model)
    t0 = time.perf_counter()
    with torch.no_grad():
        r = perplexity(model, tok, "shakespeare-eval", seqlen=512, max_windows=a.windows, progress=False)
    return {"ppl": round(r["perplexity"], 4), "windows": r["windows"], "load_s": round(load_s, 2),
            "eval_s": round(time.perf_counter() - t0, 2), **info}


WORKERS = {"gptqkit": worker_gptqkit, "gptqmodel": worker_gptqmodel, "eval": worker_eval}


# ----------------------------------------------------------------------------- driver
def run_child(a: argparse.Namespace, worker: str, tmp: Path, **extra) -> dict:
    """Run one worker in a fresh subprocess of this Python; returns its JSON plus wall time and
    peak RSS, or {"error": ...} with the tail of its output."""
    res = tmp / f"result-{worker}-{time.monotonic_ns()}.json"
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", worker, "--result", str(res),
           "--model", str(a.model), "--ids", str(a.ids), "--bits", str(a.bits), "--group-size", str(a.group_size),
           "--windows", str(a.windows), "--peer-batch-size", str(a.peer_batch_size),
           "--peer-backend", a.peer_backend, "--peer-load-dtype", a.peer_load_dtype]
    if a.desc_act:
        cmd.append("--desc-act")
    if a.peer_gar:
        cmd.append("--peer-gar")
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    log = tmp / f"{res.stem}.log"
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT)
    wall = round(time.perf_counter() - t0, 2)
    text = log.read_text(errors="replace")
    if a.verbose:
        sys.stderr.write(text)
    if rc != 0 or not res.is_file():
        return {"error": f"exit {rc}", "log_tail": text[-3000:], "process_s": wall}
    out = json.loads(res.read_text())
    out["process_s"] = wall
    warnings = sorted({ln.strip()[:200] for ln in text.splitlines()
                       if ln.lstrip().startswith(("WARN", "WARNING")) or "Warning:" in ln})
    if warnings:
        out["warnings"] = warnings[:20]
    if "JIT extension" in text and "compiling" in text:
        # GPTQModel builds its CPU extensions on first use (cached under ~/.cache/gptqmodel)
        out["jit_compiled_in_this_step"] = True
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a built-in model name (default: SmolLM2-135M; gemma3-270m) "
                    "or a model folder, resolved as in benchmarks/quality.py")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40, help="evaluation windows of 512 tokens")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--desc-act", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every step (default: torch's)")
    ap.add_argument("--peer-batch-size", type=int, default=1,
                    help="GPTQModel's quantize(batch_size=...) (its default 1); gptqkit runs all sequences at once")
    ap.add_argument("--peer-gar", action="store_true",
                    help="leave GPTQModel's act_group_aware at its default (on unless desc_act)")
    ap.add_argument("--peer-backend", default="gptq_torch",
                    help="kernel for GPTQModel's own loader (a gptqmodel BACKEND value; 'auto' = its choice)")
    ap.add_argument("--peer-load-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="compute dtype of GPTQModel's own loader (its CPU kernels reject float32)")
    ap.add_argument("--skip-peer", action="store_true", help="run gptqkit only")
    ap.add_argument("--skip-ours", action="store_true", help="run GPTQModel only (gptqkit's figures for the same "
                    "seed come from benchmarks/quality.py, which draws the same calibration ids)")
    ap.add_argument("--seed", type=int, default=0, help="calibration draw (calibration_batches seed)")
    ap.add_argument("--no-cross", action="store_true", help="load each checkpoint with gptqkit only")
    ap.add_argument("--keep", default=None, help="keep the checkpoints under this folder")
    ap.add_argument("--verbose", action="store_true", help="echo every step's output to stderr")
    # internal: one step in a subprocess
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--loader", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if "GPTQMODEL_CPU_WORKERS" not in os.environ:
        # GPTQModel's default is half the cores; below 2 it fails to start ("Virtual pool
        # 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1")
        os.environ["GPTQMODEL_CPU_WORKERS"] = str(max(2, a.threads or os.cpu_count() or 2))

    if a.worker:
        out = WORKERS[a.worker](a)
        out["peak_rss_mb"] = _peak_rss_mb()
        Path(a.result).write_text(json.dumps(out))
        return

    import torch
    import transformers

    import gptqkit
    from gptqkit.api import load_tokenizer, resolve_model
    from gptqkit.data import calibration_batches

    t_all = time.perf_counter()
    a.model = str(resolve_model(a.model))  # the workers get this resolved folder as --model
    tok = load_tokenizer(a.model)
    ids = calibration_batches(tok, "shakespeare", nsamples=a.nsamples, seqlen=a.seqlen, seed=a.seed).input_ids
    tmp = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="gptqkit-vs-gptqmodel-"))
    tmp.mkdir(parents=True, exist_ok=True)
    a.ids = str(tmp / "calib_ids.pt")
    torch.save(ids.contiguous(), a.ids)

    peer = not a.skip_peer and importlib.util.find_spec("gptqmodel") is not None
    result: dict = {
        "model": a.model, "python": sys.executable, "torch": torch.__version__,
        "transformers": transformers.__version__, "gptqkit": gptqkit.__version__,
        "gptqmodel": None, "cpu_count": os.cpu_count(), "threads": a.threads or torch.get_num_threads(),
        "gptqmodel_cpu_workers": os.environ.get("GPTQMODEL_CPU_WORKERS"),
        "calibration": {"source": "shakespeare", "seed": a.seed, "shape": list(ids.shape),
                        "ids_sha256": hashlib.sha256(ids.contiguous().numpy().tobytes()).hexdigest()},
        "settings": {"bits": a.bits, "group_size": a.group_size, "sym": True, "desc_act": a.desc_act,
                     "damp_percent": DAMP_PERCENT, "damp_auto_increment": DAMP_AUTO_INCREMENT,
                     "true_sequential": True, "mse": False, "format": "gptq (v1)", "compute_dtype": "float32",
                     "gptqmodel_act_group_aware": "default" if a.peer_gar else False,
                     "gptqmodel_batch_size": a.peer_batch_size, "gptqmodel_load_backend": a.peer_backend,
                     "gptqmodel_load_dtype": a.peer_load_dtype},
        "eval": {"text": "shakespeare-eval", "seqlen": 512, "windows": a.windows},
    }
    if not peer:
        result["peer_skipped"] = ("--skip-peer given" if a.skip_peer else
                                  "gptqmodel is not importable in this Python; gptqkit ran alone")
    else:
        from importlib.metadata import version
        result["gptqmodel"] = version("gptqmodel")

    def note(msg: str) -> None:
        print(f"[vs_gptqmodel +{time.perf_counter() - t_all:.0f}s] {msg}", file=sys.stderr, flush=True)

    tools = ([] if a.skip_ours else ["gptqkit"]) + (["gptqmodel"] if peer else [])
    loaders = ["gptqkit"] + (["gptqmodel"] if peer and not a.no_cross else [])
    result["fp"] = run_child(a, "eval", tmp, ckpt=a.model, loader="fp")
    note(f"fp ppl {result['fp'].get('ppl')}")
    result["quantize"], result["ppl"] = {}, {}
    for tool in tools:
        out = tmp / f"ckpt-{tool}"
        note(f"quantizing with {tool}")
        result["quantize"][tool] = q = run_child(a, tool, tmp, out=out)
        note(f"{tool}: " + ("failed" if "error" in q else f"quantize {q['quantize_s']} s, quantize+save "
                            f"{q['quantize_save_s']} s, peak {q['peak_rss_mb']} MiB"))
        if "error" in q:
            continue
        result["ppl"][tool] = {}
        for loader in loaders:
            note(f"perplexity of {tool}'s checkpoint loaded by {loader}")
            r = run_child(a, "eval", tmp, ckpt=out, loader=loader)
            result["ppl"][tool][f"loaded_by_{loader}"] = r
            note(f"  -> {r.get('ppl', r.get('error'))}")

    if peer and not a.skip_ours and all("error" not in result["quantize"][t] for t in tools):
        k, g = result["quantize"]["gptqkit"], result["quantize"]["gptqmodel"]
        kp = result["ppl"]["gptqkit"]["loaded_by_gptqkit"].get("ppl")
        gp = result["ppl"]["gptqmodel"]["loaded_by_gptqkit"].get("ppl")
        result["summary"] = {
            "ppl_gptqkit": kp, "ppl_gptqmodel": gp,
            "ppl_no_worse": (kp is not None and gp is not None and kp <= gp),
            "quantize_s_gptqkit": k["quantize_s"], "quantize_s_gptqmodel": g["quantize_s"],
            "quantize_save_s_gptqkit": k["quantize_save_s"], "quantize_save_s_gptqmodel": g["quantize_save_s"],
            "time_no_longer": k["quantize_save_s"] <= g["quantize_save_s"],
            "speedup_quantize_save": round(g["quantize_save_s"] / max(k["quantize_save_s"], 1e-9), 2),
            "peak_rss_mb_gptqkit": k["peak_rss_mb"], "peak_rss_mb_gptqmodel": g["peak_rss_mb"],
        }
    result["total_s"] = round(time.perf_counter() - t_all, 1)
    if not a.keep:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        result["kept"] = str(tmp)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
