"""The `gptqkit` command: quantize | eval | generate | inspect. The only module that prints."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from .errors import CheckpointError, GPTQKitError, InterruptedRunError

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "float64": "float64"}


def _dtype(name: str):
    import torch
    return getattr(torch, DTYPES[name])


def _peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _eval_ppl(model, tok, text: str, seqlen: int, max_windows: int | None, progress: bool) -> dict:
    from .eval.perplexity import perplexity
    return perplexity(model, tok, text, seqlen=seqlen, max_windows=max_windows, progress=progress)


def _load_any(path: str, backend: str | None, device: str):
    """A quantized checkpoint through gptqkit.load, a float model through transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    from .api import load, load_tokenizer, resolve_model
    from .config import QuantizeConfig
    from .errors import CheckpointError
    from .models.source import resolve_model_path

    p = resolve_model_path(resolve_model(path))
    try:
        QuantizeConfig.load(p)
        model = load(p, backend=backend, device=device)
    except CheckpointError as e:
        if "holds no GPTQ quantization config" not in str(e):
            raise
        model = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).to(device).eval()
    return model, load_tokenizer(p)


def _check_out(out: Path, model_path, overwrite: bool, resume: bool) -> Path:
    """Refuse a bad --out before any work (loading, float perplexity) is spent on it (issue 14)."""
    out = out.resolve()  # `--out .` has an empty name; the resolved path does not
    src = Path(str(model_path))
    if src.is_dir() and (out == src.resolve() or src.resolve() in out.parents):
        raise CheckpointError(f"--out {out} is the input model folder or inside it; choose another folder")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file, not a folder; choose another path")
    if out.is_dir() and any(out.iterdir()) and not (overwrite or resume):
        raise CheckpointError(f"--out {out} exists and is not empty; pass --overwrite or --resume, or choose another folder")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise CheckpointError(f"cannot write --out {out}: {parent} is not writable")
    return out


def cmd_quantize(a) -> int:
    import torch

    from . import QuantizeConfig
    from .api import load, load_tokenizer, quantize, resolve_model

    cfg = QuantizeConfig(bits=a.bits, group_size=a.group_size, sym=a.sym, desc_act=a.desc_act,
                         static_groups=a.static_groups, damp_percent=a.damp, true_sequential=not a.no_true_sequential,
                         mse=a.mse, checkpoint_format=a.format, lm_head=a.lm_head, method=a.method)
    model_path = resolve_model(a.model)
    out = Path(a.out or f"{Path(str(model_path)).name}-gptq-{cfg.bits}bit-g{cfg.group_size}"
               + ("-act" if cfg.desc_act else "") + ("-rtn" if cfg.method == "rtn" else ""))
    out = _check_out(out, model_path, a.overwrite, a.resume)
    result: dict = {"model": str(model_path), "out": str(out), "config": cfg.to_dict()}
    tok = None
    # under torchrun every process quantizes its share; only rank 0 evaluates and prints
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if a.eval_text and not a.no_eval and rank0:
        from transformers import AutoModelForCausalLM
        tok = load_tokenizer(model_path)
        fp = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        result["ppl_before"] = _eval_ppl(fp, tok, a.eval_text, a.eval_seqlen, a.max_windows, not a.json)
        del fp
    t0 = time.perf_counter()
    rep = quantize(model_path, a.calib, out, cfg, nsamples=a.nsamples, seqlen=a.seqlen, seed=a.seed,
                   batch_size=a.batch_size, overwrite=a.overwrite, dtype=_dtype(a.dtype), progress=not a.json,
                   resume=a.resume, max_memory=a.max_memory)
    if not rank0:
        return 0
    result["quantize_seconds"] = round(time.perf_counter() - t0, 2)
    result["block_forwards"] = rep.forwards
    result["calib_tokens"] = rep.calib_tokens
    result["mean_layer_loss"] = rep.to_dict()["mean_loss"]
    result["peak_rss_mb_quantize"] = round(_peak_rss_mb(), 1)
    if a.eval_text and not a.no_eval:
        qm = load(out, backend=a.backend)
        result["ppl_after"] = _eval_ppl(qm, tok, a.eval_text, a.eval_seqlen, a.max_windows, not a.json)
        (out / "eval.json").write_text(json.dumps({"text": a.eval_text, "seqlen": a.eval_seqlen, **{
            k: result[k] for k in ("ppl_before", "ppl_after")}}, indent=2) + "\n")  # for report / model card
    if a.push_to_hub:
        from .hub import push_to_hub
        base = None if Path(str(model_path)).exists() else str(model_path)  # a hub id names the base model
        result["pushed"] = str(push_to_hub(out, a.push_to_hub, base_model=base, private=a.private))
    result["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"\ncheckpoint: {out}")
        print(f"quantized {len(rep.layers)} layers in {result['quantize_seconds']} s "
              f"({rep.forwards:g} block forwards over {rep.calib_tokens} calibration tokens)")
        if "ppl_before" in result:
            print(f"perplexity on {a.eval_text} (windows of {a.eval_seqlen}): "
                  f"before {result['ppl_before']['perplexity']:.3f}  after {result['ppl_after']['perplexity']:.3f}")
        print(f"peak memory (RSS): {result['peak_rss_mb']:.0f} MB")
    return 0


def cmd_eval(a) -> int:
    model, tok = _load_any(a.model, a.backend, a.device)
    if a.tasks:  # lm-evaluation-harness tasks (optional package lm_eval)
        from .eval.harness import run_tasks
        r = run_tasks(model, tok, a.tasks.split(","), include_path=a.include_path, limit=a.limit,
                      batch_size=a.batch_size, num_fewshot=a.num_fewshot)
        print(json.dumps(r, indent=2, default=str) if a.json else "\n".join(
            f"{t}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float))
            for t, m in r["results"].items()))
        return 0
    r = _eval_ppl(model, tok, a.text, a.seqlen, a.max_windows, not a.json)
    r["model"] = a.model
    print(json.dumps(r, indent=2) if a.json else f"perplexity {r['perplexity']:.4f} over {r['tokens']} tokens "
          f"({r['windows']} windows of {r['seqlen']})")
    return 0


def cmd_generate(a) -> int:
    import torch

    from .errors import ConfigError
    if a.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {a.max_new_tokens}")
    model, tok = _load_any(a.model, a.backend, a.device)
    enc = tok(a.prompt, return_tensors="pt")
    if enc["input_ids"].shape[1] == 0:  # empty prompt: start from BOS, or say what is wrong
        if tok.bos_token_id is None:
            raise ConfigError("the prompt is empty and the tokenizer has no BOS token to start from; give a prompt")
        enc = {"input_ids": torch.tensor([[tok.bos_token_id]]), "attention_mask": torch.ones(1, 1, dtype=torch.long)}
    enc = {k: v.to(a.device) for k, v in enc.items()}
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=a.max_new_tokens, do_sample=a.temperature > 0,
                             temperature=a.temperature if a.temperature > 0 else None, top_p=None, top_k=None,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    dt = time.perf_counter() - t0
    new = out[0, enc["input_ids"].shape[1]:]
    text = tok.decode(new, skip_special_tokens=True)
    if a.json:
        print(json.dumps({"prompt": a.prompt, "completion": text, "new_tokens": len(new), "seconds": round(dt, 3)}))
    else:
        print(a.prompt + text)
        print(f"\n[{len(new)} tokens in {dt:.2f} s, {len(new) / dt:.1f} tok/s]", file=sys.stderr)
    return 0


def cmd_inspect(a) -> int:
    from .config import QuantizeConfig
    from .formats.checkpoint import shard_files
    from .models.source import resolve_model_path
    from safetensors import safe_open

    p = resolve_model_path(a.dir)
    cfg = QuantizeConfig.load(p)
    files = shard_files(p)
    layers, qparams, other, nbytes = {}, 0, 0, 0
    for f in files:
        nbytes += f.stat().st_size
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                shape = sf.get_slice(k).get_shape()
                n = 1
                for s in shape:
                    n *= s
                if k.endswith(".qweight"):
                    name = k[: -len(".qweight")]
                    layers[name] = {"qweight_shape": shape}
                    qparams += n * 32  # bits-agnostic: words x 32 bits
                elif not k.endswith((".qzeros", ".scales", ".g_idx")):
                    other += n
    # parameters represented by qweight: words·32/bits
    qn = qparams // cfg.bits
    info = {"path": str(p), "config": cfg.to_dict(), "quantized_layers": len(layers),
            "quantized_params": qn, "other_params": other, "files": [f.name for f in files],
            "size_bytes": nbytes, "bits_per_param_overall": round(nbytes * 8 / max(1, qn + other), 3)}
    log = p / "quant_log.json"
    if log.is_file():
        rep = json.loads(log.read_text())
        info["mean_layer_loss"] = rep.get("mean_loss")
        info["quantize_seconds"] = rep.get("seconds")
    if a.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"{p}\n  bits={cfg.bits} group_size={cfg.group_size} sym={cfg.sym} desc_act={cfg.desc_act} "
              f"format={cfg.checkpoint_format}")
        print(f"  {len(layers)} quantized layers, {qn / 1e6:.1f}M quantized + {other / 1e6:.1f}M other params")
        print(f"  {nbytes / 2**20:.1f} MiB on disk in {len(files)} file(s): "
              f"{info['bits_per_param_overall']} bits per parameter overall")
        if "mean_layer_loss" in info:
            print(f"  mean layer loss {info['mean_layer_loss']:.4g}, quantized in {info['quantize_seconds']:.1f} s")
    return 0


def cmd_report(a) -> int:
    from .report import write_report
    if not Path(a.dir, "quant_log.json").is_file():
        print(f"error: {a.dir} has no quant_log.json; point at a checkpoint written by gptqkit quantize",
              file=sys.stderr)
        return 2
    print(write_report(a.dir, a.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptqkit", description="GPTQ quantization for Hugging Face causal LMs")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="quantize a model (default: the built-in SmolLM2-135M)")
    q.add_argument("model", nargs="?", default=None, help="model folder or hub id; omitted = built-in default")
    q.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8])
    q.add_argument("--group-size", type=int, default=128, help="-1 for one group per row")
    g = q.add_mutually_exclusive_group()
    g.add_argument("--sym", dest="sym", action="store_true", default=True)
    g.add_argument("--asym", dest="sym", action="store_false")
    q.add_argument("--desc-act", action=argparse.BooleanOptionalAction, default=True,
                   help="act-order: solve columns by decreasing Hessian diagonal (default on)")
    q.add_argument("--static-groups", action=argparse.BooleanOptionalAction, default=True,
                   help="fix groups in original column order, so g_idx stays c // g (default on)")
    q.add_argument("--damp", type=float, default=0.01, help="damp_percent (grows automatically if needed)")
    q.add_argument("--mse", action="store_true", help="search clipped ranges for the scales")
    q.add_argument("--no-true-sequential", action="store_true")
    q.add_argument("--lm-head", action="store_true", help="quantize lm_head too")
    q.add_argument("--format", default="gptq", choices=["gptq", "gptq_v2"])
    q.add_argument("--method", default="gptq", choices=["gptq", "rtn"])
    q.add_argument("--calib", default="shakespeare", help="built-in corpus name, .txt or .jsonl file")
    q.add_argument("--nsamples", type=int, default=64)
    q.add_argument("--seqlen", type=int, default=512)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--batch-size", type=int, default=None,
                   help="calibration sequences per forward chunk (default: chosen from free memory and the "
                        "model's shapes, logged; every chunk size does one forward per block)")
    q.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    q.add_argument("--out", default=None)
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from <out>.partial (same command and inputs)")
    q.add_argument("--max-memory", default=None,
                   help="budget for calibration activations, e.g. 4GB; above it they stay on disk")
    q.add_argument("--eval-text", default="shakespeare-eval",
                   help="text for perplexity before/after ('' to skip)")
    q.add_argument("--no-eval", action="store_true")
    q.add_argument("--eval-seqlen", type=int, default=512)
    q.add_argument("--max-windows", type=int, default=40)
    q.add_argument("--backend", default=None)
    q.add_argument("--json", action="store_true")
    q.add_argument("--push-to-hub", metavar="REPO", default=None,
                   help="upload the checkpoint (with a model card README.md) to this Hugging Face repo")
    q.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity of a model or quantized checkpoint")
    e.add_argument("model")
    e.add_argument("--text", default="shakespeare-eval")
    e.add_argument("--seqlen", type=int, default=512)
    e.add_argument("--max-windows", type=int, default=None)
    e.add_argument("--backend", default=None)
    e.add_argument("--device", default="cpu")
    e.add_argument("--json", action="store_true")
    e.add_argument("--tasks", default=None, help="comma-separated lm-evaluation-harness tasks (needs lm_eval)")
    e.add_argument("--include-path", default=None, help="folder of extra lm_eval task YAML files")
    e.add_argument("--limit", type=float, default=None, help="lm_eval: examples per task (or fraction)")
    e.add_argument("--num-fewshot", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=1)
    e.set_defaults(func=cmd_eval)

    gen = sub.add_parser("generate", help="generate text from a checkpoint")
    gen.add_argument("model")
    gen.add_argument("prompt")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--backend", default=None)
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--json", action="store_true")
    gen.set_defaults(func=cmd_generate)

    i = sub.add_parser("inspect", help="config, layers, size and bits per parameter of a checkpoint")
    i.add_argument("dir")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    r = sub.add_parser("report", help="render a checkpoint's per-layer log as a self-contained HTML page")
    r.add_argument("dir")
    r.add_argument("--out", default=None, help="HTML file (default DIR/report.html)")
    r.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return a.func(a)
    except InterruptedRunError as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
    except GPTQKitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing incomplete was left at the output path", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
